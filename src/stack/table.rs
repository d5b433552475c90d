//! The object table behind every pointer the shim hands NCCL.
//!
//! A comm NCCL holds is not an address but a key: a tag byte, a slot index and the slot's
//! generation, packed into a pointer-sized value that is never dereferenced. Looking a key up
//! reads only the table itself, so a stale, closed, foreign or made-up pointer finds nothing (or
//! a newer object whose generation does not match) and becomes an error, never a read of freed
//! memory. Requests and registrations are keys of the same kind that also name their comm.
//!
//! Slots hold `ArcSwapOption`s: a lookup is a lock-free load, a record stays alive while a call
//! that found it still runs, and closing a comm only empties its slot.

use crate::transport::Opaque;
use arc_swap::ArcSwapOption;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// Most comms one process can hold open at once (TCPX allows 65536 per device).
pub const MAX_COMMS: usize = 1 << 16;

const TAG_SHIFT: u32 = 56;
const TAG_COMM: u64 = 0xC0;
const TAG_REQ: u64 = 0xE0;
const TAG_MR: u64 = 0xA0;

/// Where a comm lives in the table: slot index and generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CommKey {
    /// Slot index.
    pub index: u16,
    /// Generation of the slot when the comm was made.
    pub gen: u32,
}

impl CommKey {
    /// The pointer NCCL sees.
    pub fn to_opaque(self) -> Opaque {
        raw(TAG_COMM << TAG_SHIFT | (self.gen as u64) << 16 | self.index as u64)
    }
    /// The key a pointer from NCCL stands for, if it looks like a comm key at all.
    pub fn from_opaque(o: Opaque) -> Option<CommKey> {
        let v = o.as_ptr() as u64;
        (v >> TAG_SHIFT == TAG_COMM && (v >> 48) & 0xff == 0).then_some(CommKey {
            index: v as u16,
            gen: (v >> 16) as u32,
        })
    }
    /// The low 16 bits of the generation, as request and registration keys carry it.
    fn gen16(self) -> u16 {
        self.gen as u16
    }
}

/// A request: its comm, the request slot of that comm and the slot's generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReqKey {
    /// The comm's slot index.
    pub comm: u16,
    /// Low 16 bits of the comm's generation.
    pub comm_gen: u16,
    /// Request slot within the comm (0..64).
    pub slot: u8,
    /// Generation of the request slot.
    pub gen: u16,
}

impl ReqKey {
    /// A key for request slot `slot` (generation `gen`) of comm `c`.
    pub fn new(c: CommKey, slot: usize, gen: u16) -> ReqKey {
        ReqKey {
            comm: c.index,
            comm_gen: c.gen16(),
            slot: slot as u8,
            gen,
        }
    }
    /// The pointer NCCL sees.
    pub fn to_opaque(self) -> Opaque {
        raw(TAG_REQ << TAG_SHIFT
            | (self.slot as u64) << 48
            | (self.gen as u64) << 32
            | (self.comm_gen as u64) << 16
            | self.comm as u64)
    }
    /// The key a pointer from NCCL stands for, if it looks like a request key.
    pub fn from_opaque(o: Opaque) -> Option<ReqKey> {
        let v = o.as_ptr() as u64;
        (v >> TAG_SHIFT == TAG_REQ).then_some(ReqKey {
            comm: v as u16,
            comm_gen: (v >> 16) as u16,
            gen: (v >> 32) as u16,
            slot: (v >> 48) as u8,
        })
    }
    /// Whether this request belongs to comm `c`.
    pub fn of(self, c: CommKey) -> bool {
        self.comm == c.index && self.comm_gen == c.gen16()
    }
}

/// A memory registration: its comm, the registration's index in that comm and its generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MrKey {
    /// The comm's slot index.
    pub comm: u16,
    /// Low 16 bits of the comm's generation.
    pub comm_gen: u16,
    /// Index in the comm's registrations (0..4096).
    pub index: u16,
    /// Generation of that entry (12 bits).
    pub gen: u16,
}

/// Most registrations one comm can hold at once.
pub const MAX_MRS: usize = 1 << 12;

impl MrKey {
    /// A key for registration `index` (generation `gen`, 12 bits used) of comm `c`.
    pub fn new(c: CommKey, index: usize, gen: u16) -> MrKey {
        MrKey {
            comm: c.index,
            comm_gen: c.gen16(),
            index: index as u16,
            gen: gen & 0xfff,
        }
    }
    /// The pointer NCCL sees.
    pub fn to_opaque(self) -> Opaque {
        raw(TAG_MR << TAG_SHIFT
            | (self.index as u64 & 0xfff) << 44
            | (self.gen as u64 & 0xfff) << 32
            | (self.comm_gen as u64) << 16
            | self.comm as u64)
    }
    /// The key a pointer from NCCL stands for, if it looks like a registration key.
    pub fn from_opaque(o: Opaque) -> Option<MrKey> {
        let v = o.as_ptr() as u64;
        (v >> TAG_SHIFT == TAG_MR).then_some(MrKey {
            comm: v as u16,
            comm_gen: (v >> 16) as u16,
            gen: ((v >> 32) & 0xfff) as u16,
            index: ((v >> 44) & 0xfff) as u16,
        })
    }
    /// Whether this registration belongs to comm `c`.
    pub fn of(self, c: CommKey) -> bool {
        self.comm == c.index && self.comm_gen == c.gen16()
    }
}

fn raw(v: u64) -> Opaque {
    // Every key has a non-zero tag byte, so it is never NULL.
    Opaque::from_addr(v as usize).unwrap_or_else(|| unreachable!("keys have a non-zero tag"))
}

/// Records that know their own key.
pub trait Keyed {
    /// The key the record was made with.
    fn key(&self) -> CommKey;
}

/// A record found in a [`Table`]; it stays alive while this is held (a cheap, lock-free borrow
/// of the slot's `Arc`, no reference count touched in the common case).
pub struct Entry<T>(arc_swap::Guard<Option<Arc<T>>>);

impl<T> std::ops::Deref for Entry<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match &*self.0 {
            Some(rec) => rec,
            None => unreachable!("entries are made from occupied slots only"),
        }
    }
}

/// A fixed-capacity table of records addressed by [`CommKey`].
pub struct Table<T> {
    slots: Box<[ArcSwapOption<T>]>,
    gens: Box<[AtomicU32]>,
    free: Mutex<Free>,
}

struct Free {
    /// Slots never used yet start here.
    next_unused: usize,
    /// Released slots, reused oldest first so a stale key meets a new generation late.
    released: VecDeque<u16>,
}

impl<T: Keyed> Table<T> {
    /// An empty table with room for `capacity` (at most [`MAX_COMMS`]) records.
    pub fn new(capacity: usize) -> Table<T> {
        let capacity = capacity.min(MAX_COMMS);
        Table {
            slots: (0..capacity).map(|_| ArcSwapOption::const_empty()).collect(),
            gens: (0..capacity).map(|_| AtomicU32::new(0)).collect(),
            free: Mutex::new(Free {
                next_unused: 0,
                released: VecDeque::new(),
            }),
        }
    }

    /// Puts the record `make(key)` in a free slot and returns it; `None` when the table is full.
    pub fn insert(&self, make: impl FnOnce(CommKey) -> T) -> Option<Arc<T>> {
        let index = {
            let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if f.next_unused < self.slots.len() {
                f.next_unused += 1;
                f.next_unused - 1
            } else {
                f.released.pop_front()? as usize
            }
        };
        let gen = self.gens[index].fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let key = CommKey {
            index: index as u16,
            gen,
        };
        let rec = Arc::new(make(key));
        self.slots[index].store(Some(rec.clone()));
        Some(rec)
    }

    /// The live record for `key`, if there is one.
    pub fn get(&self, key: CommKey) -> Option<Entry<T>> {
        self.find(key.index, |k| k == key)
    }

    /// The live record in slot `index` whose generation ends in `gen16` (request and
    /// registration keys carry 16 bits of it).
    pub fn get16(&self, index: u16, gen16: u16) -> Option<Entry<T>> {
        self.find(index, |k| k.gen as u16 == gen16)
    }

    fn find(&self, index: u16, matches: impl FnOnce(CommKey) -> bool) -> Option<Entry<T>> {
        let g = self.slots.get(index as usize)?.load();
        match &*g {
            Some(rec) if matches(rec.key()) => Some(Entry(g)),
            _ => None,
        }
    }

    /// Takes the record for `key` out of the table; `None` if it is not (or no longer) there.
    pub fn remove(&self, key: CommKey) -> Option<Arc<T>> {
        let slot = self.slots.get(key.index as usize)?;
        let cur = slot.load_full()?;
        if cur.key() != key {
            return None;
        }
        let prev = slot.compare_and_swap(&Some(cur.clone()), None);
        let taken = prev.as_ref().is_some_and(|p| Arc::ptr_eq(p, &cur));
        if !taken {
            return None;
        }
        drop(prev);
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .released
            .push_back(key.index);
        Some(cur)
    }

    /// Every live record (for summaries and tests).
    pub fn live(&self) -> Vec<Arc<T>> {
        self.slots.iter().filter_map(|s| s.load_full()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rec(CommKey);
    impl Keyed for Rec {
        fn key(&self) -> CommKey {
            self.0
        }
    }

    #[test]
    fn keys_round_trip_and_do_not_cross_kinds() {
        let c = CommKey {
            index: 513,
            gen: 0x1234_5678,
        };
        assert_eq!(CommKey::from_opaque(c.to_opaque()), Some(c));
        let r = ReqKey::new(c, 63, 0xbeef);
        assert_eq!(ReqKey::from_opaque(r.to_opaque()), Some(r));
        assert!(r.of(c) && !r.of(CommKey { gen: c.gen + 1, ..c }));
        let m = MrKey::new(c, 4095, 0xabc);
        assert_eq!(MrKey::from_opaque(m.to_opaque()), Some(m));
        assert!(m.of(c));
        assert_eq!(CommKey::from_opaque(r.to_opaque()), None);
        assert_eq!(ReqKey::from_opaque(m.to_opaque()), None);
        assert_eq!(MrKey::from_opaque(c.to_opaque()), None);
        // An ordinary heap address is none of them.
        let b = Box::new(7u64);
        let p = Opaque::from_ptr(&*b as *const u64 as *mut std::ffi::c_void).unwrap();
        assert!(
            CommKey::from_opaque(p).is_none() && ReqKey::from_opaque(p).is_none() && MrKey::from_opaque(p).is_none()
        );
    }

    #[test]
    fn stale_keys_find_nothing_after_removal_and_reuse() {
        let t: Table<Rec> = Table::new(2);
        let a = t.insert(Rec).unwrap().key();
        let b = t.insert(Rec).unwrap().key();
        assert!(t.insert(Rec).is_none(), "full");
        assert!(t.get(a).is_some());
        assert!(t.remove(a).is_some());
        assert!(t.remove(a).is_none(), "double remove");
        assert!(t.get(a).is_none(), "use after remove");
        let c = t.insert(Rec).unwrap().key();
        assert_eq!(c.index, a.index, "slot reused");
        assert_ne!(c.gen, a.gen);
        assert!(t.get(a).is_none(), "the stale key does not find the new record");
        assert!(t.get(c).is_some() && t.get(b).is_some());
        assert!(t.get(CommKey { index: 9, gen: 1 }).is_none(), "out of range");
        assert_eq!(t.live().len(), 2);
    }

    #[test]
    fn a_record_outlives_its_removal_while_a_caller_holds_it() {
        let t: Table<Rec> = Table::new(4);
        let k = t.insert(Rec).unwrap().key();
        let held = t.get(k).unwrap();
        t.remove(k).unwrap();
        assert_eq!(held.key(), k);
    }
}
