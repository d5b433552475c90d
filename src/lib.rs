//! tcpxshim: an NCCL net plugin (ncclNet_v7) that wraps GPUDirect-TCPX, any v5/v6/v7 plugin, or
//! its own built-in kernel-TCP transport, adding visibility and robustness.

pub mod config;
pub mod control;
pub mod error;
pub mod ffi;
pub mod p2p;
pub mod tcp;
pub mod transport;

#[cfg(test)]
mod fuzzing;

pub mod export;
pub mod logging;
pub mod metrics;
pub mod plugin;
pub mod recovery;
pub mod sockdrop;
pub mod stack;

pub use error::{Error, Result};

/// Locks `m`, taking over a lock whose holder panicked: the shim's locks guard plain data that a
/// panic leaves whole, and a panic is already reported (and its comm poisoned) by the guard.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
