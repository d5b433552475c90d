//! The object table behind every pointer the shim hands NCCL.
//!
//! A comm NCCL holds is not an address but a key: a tag byte, a slot index and the slot's
//! generation, packed into a pointer-sized value that is never dereferenced. Looking a key up
//! reads only the table itself, so a stale, closed, foreign or made-up pointer finds nothing (or
//! a newer object whose generation does not match) and becomes an error, never a read of freed
//! memory. Requests and registrations are keys of the same kind that also name their comm.
//!
//! The records themselves are allocated once per slot, on first use, and reused by later
//! objects in that slot; they are freed only with the table. Everything in a record that a
//! lookup may read is an atomic or behind a lock, so a lookup is two plain atomic loads (the
//! slot's record, its state) and no reference count: this is what keeps the shim's cost per
//! message small.

use crate::transport::Opaque;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

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
    #[inline]
    pub fn to_opaque(self) -> Opaque {
        raw(TAG_COMM << TAG_SHIFT | (self.gen as u64) << 16 | self.index as u64)
    }
    /// The key a pointer from NCCL stands for, if it looks like a comm key at all.
    #[inline]
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
    #[inline]
    pub fn new(c: CommKey, slot: usize, gen: u16) -> ReqKey {
        ReqKey {
            comm: c.index,
            comm_gen: c.gen16(),
            slot: slot as u8,
            gen,
        }
    }
    /// The pointer NCCL sees.
    #[inline]
    pub fn to_opaque(self) -> Opaque {
        raw(TAG_REQ << TAG_SHIFT
            | (self.slot as u64) << 48
            | (self.gen as u64) << 32
            | (self.comm_gen as u64) << 16
            | self.comm as u64)
    }
    /// The key a pointer from NCCL stands for, if it looks like a request key.
    #[inline]
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
    #[inline]
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
    #[inline]
    pub fn new(c: CommKey, index: usize, gen: u16) -> MrKey {
        MrKey {
            comm: c.index,
            comm_gen: c.gen16(),
            index: index as u16,
            gen: gen & 0xfff,
        }
    }
    /// The pointer NCCL sees.
    #[inline]
    pub fn to_opaque(self) -> Opaque {
        raw(TAG_MR << TAG_SHIFT
            | (self.index as u64 & 0xfff) << 44
            | (self.gen as u64 & 0xfff) << 32
            | (self.comm_gen as u64) << 16
            | self.comm as u64)
    }
    /// The key a pointer from NCCL stands for, if it looks like a registration key.
    #[inline]
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
    #[inline]
    pub fn of(self, c: CommKey) -> bool {
        self.comm == c.index && self.comm_gen == c.gen16()
    }
}

#[inline]
fn raw(v: u64) -> Opaque {
    // Every key has a non-zero tag byte, so it is never NULL.
    Opaque::from_addr(v as usize).unwrap_or_else(|| unreachable!("keys have a non-zero tag"))
}

/// A record that a [`Table`] slot holds and reuses.
pub trait Record: Send + Sync {
    /// What a new object in the slot is made from.
    type Spec;
    /// An empty record for slot `index`.
    fn empty() -> Self;
    /// The slot's state word: `generation << 1 | live`.
    fn state(&self) -> &AtomicU64;
    /// Takes on `spec` as a new object (the slot is not live while this runs).
    fn reset(&self, key: CommKey, spec: Self::Spec);
}

#[inline]
fn live(gen: u32) -> u64 {
    (gen as u64) << 1 | 1
}

/// The key a record stands under now, if it is live.
#[inline]
pub fn key_of<T: Record>(index: u16, rec: &T) -> Option<CommKey> {
    let s = rec.state().load(Ordering::Acquire);
    (s & 1 == 1).then_some(CommKey {
        index,
        gen: (s >> 1) as u32,
    })
}

/// A fixed-capacity table of records addressed by [`CommKey`].
pub struct Table<T> {
    slots: Box<[OnceLock<Box<T>>]>,
    free: Mutex<Free>,
}

/// Released slots waiting before the oldest is reused.
const REUSE_AFTER: usize = 64;

struct Free {
    /// Slots never used yet start here.
    next_unused: usize,
    /// Released slots, reused oldest first so a stale key meets a new generation late.
    released: VecDeque<u16>,
}

impl<T: Record> Table<T> {
    /// An empty table with room for `capacity` (at most [`MAX_COMMS`]) records.
    pub fn new(capacity: usize) -> Table<T> {
        let capacity = capacity.min(MAX_COMMS);
        Table {
            slots: (0..capacity).map(|_| OnceLock::new()).collect(),
            free: Mutex::new(Free {
                next_unused: 0,
                released: VecDeque::new(),
            }),
        }
    }

    /// Makes a new object from `spec` in a free slot; `None` when the table is full.
    pub fn insert(&self, spec: T::Spec) -> Option<(CommKey, &T)> {
        let mut f = crate::lock(&self.free);
        // A released slot is reused once REUSE_AFTER others were released since (its record is
        // allocated already and its memory warm; a stale key meets a new generation); before
        // that, or while none is, a slot never used.
        let index = if f.next_unused < self.slots.len() && f.released.len() < REUSE_AFTER {
            f.next_unused += 1;
            f.next_unused - 1
        } else {
            f.released.pop_front()? as usize
        };
        let rec: &T = self.slots[index].get_or_init(|| Box::new(T::empty()));
        let gen = ((rec.state().load(Ordering::Acquire) >> 1) as u32).wrapping_add(1);
        let key = CommKey {
            index: index as u16,
            gen,
        };
        rec.reset(key, spec);
        rec.state().store(live(gen), Ordering::Release);
        Some((key, rec))
    }

    /// The live record for `key`, if there is one.
    #[inline]
    pub fn get(&self, key: CommKey) -> Option<&T> {
        let rec = self.slots.get(key.index as usize)?.get()?;
        (rec.state().load(Ordering::Acquire) == live(key.gen)).then_some(&**rec)
    }

    /// The live record in slot `index` whose generation ends in `gen16` (request and
    /// registration keys carry 16 bits of it), with its full key.
    #[inline]
    pub fn get16(&self, index: u16, gen16: u16) -> Option<(CommKey, &T)> {
        let rec = self.slots.get(index as usize)?.get()?;
        let key = key_of(index, &**rec)?;
        (key.gen as u16 == gen16).then_some((key, &**rec))
    }

    /// Ends the object `key`: later lookups of it find nothing. `false` if it was not (or no
    /// longer) live.
    pub fn remove(&self, key: CommKey) -> bool {
        let Some(rec) = self.slots.get(key.index as usize).and_then(|s| s.get()) else {
            return false;
        };
        let ended = rec
            .state()
            .compare_exchange(live(key.gen), live(key.gen) - 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if ended {
            crate::lock(&self.free).released.push_back(key.index);
        }
        ended
    }

    /// Every live record.
    pub fn live(&self) -> impl Iterator<Item = &T> {
        self.slots
            .iter()
            .filter_map(|s| s.get())
            .filter(|r| r.state().load(Ordering::Acquire) & 1 == 1)
            .map(|r| &**r)
    }

    /// How many objects are live.
    pub fn live_count(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|s| s.get())
            .filter(|r| r.state().load(Ordering::Acquire) & 1 == 1)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[derive(Default)]
    struct Rec {
        state: AtomicU64,
        value: AtomicU32,
    }
    impl Record for Rec {
        type Spec = u32;
        fn empty() -> Self {
            Rec::default()
        }
        fn state(&self) -> &AtomicU64 {
            &self.state
        }
        fn reset(&self, _key: CommKey, spec: u32) {
            self.value.store(spec, Ordering::Relaxed);
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
        let (a, _) = t.insert(1).unwrap();
        let (b, _) = t.insert(2).unwrap();
        assert!(t.insert(3).is_none(), "full");
        assert_eq!(t.get(a).unwrap().value.load(Ordering::Relaxed), 1);
        assert!(t.remove(a));
        assert!(!t.remove(a), "double remove");
        assert!(t.get(a).is_none(), "use after remove");
        let (c, _) = t.insert(4).unwrap();
        assert_eq!(c.index, a.index, "slot reused");
        assert_ne!(c.gen, a.gen);
        assert!(t.get(a).is_none(), "the stale key does not find the new record");
        assert_eq!(t.get(c).unwrap().value.load(Ordering::Relaxed), 4);
        assert!(t.get(b).is_some());
        assert!(t.get(CommKey { index: 9, gen: 1 }).is_none(), "out of range");
        assert_eq!(t.get16(c.index, c.gen as u16).map(|(k, _)| k), Some(c));
        assert!(t.get16(a.index, a.gen as u16).is_none());
        assert_eq!(t.live_count(), 2);
    }
}
