//! tcpxshim: an NCCL net plugin (ncclNet_v7) that wraps GPUDirect-TCPX, any v5/v6/v7 plugin, or
//! its own built-in kernel-TCP transport, adding visibility and robustness.

pub mod config;
pub(crate) mod control;
pub mod error;
pub mod ffi;
pub mod p2p;
pub mod tcp;
pub mod transport;

pub mod export;
pub mod logging;
pub mod metrics;
pub mod plugin;
pub mod stack;

pub use error::{Error, Result};
