//! Transparent recovery of broken inner connections: the protocol, as sans-io state machines.
//!
//! An NCCL connection is a send comm in one process and a receive comm in another; the shim
//! wraps an inner comm of the transport beneath for each. When an inner comm fails mid-transfer,
//! the two sides make a new one (the receiving side listens, the sending side connects, over the
//! shim's control channel) and carry on: sends are numbered, the receiver acknowledges what is
//! complete in NCCL's buffers, and the sender replays the rest, so nothing is lost, duplicated or
//! reordered. [`SendSide`] and [`RecvSide`] hold the whole protocol and do no I/O: an engine feeds
//! them events (NCCL's posts, inner completions and failures, control messages, the time) and
//! carries out the actions they return. docs/design.md (Recovery protocol) has the states,
//! messages and invariants; `tests.rs` checks them on every schedule of a model of the two
//! processes, the inner links and the control channel.

mod config;
pub mod engine;
mod proto;
#[cfg(test)]
mod tests;

pub use config::{
    RecoveryConfig, RECOVERY, RECOVERY_ACK_EVERY, RECOVERY_ATTEMPTS, RECOVERY_COPY_MAX, RECOVERY_COPY_RING,
    RECOVERY_TIMEOUT,
};
pub use proto::{
    Cause, Control, Epoch, Failure, GiveUp, Nanos, RecvAction, RecvEvent, RecvSide, ReqId, SendAction, SendEvent,
    SendSide, Seq, Sizes, Source, Stats, MAX_GROUP,
};
