//! tcpxshim: an NCCL net plugin (ncclNet_v7) that wraps GPUDirect-TCPX, any v5/v6/v7 plugin, or
//! its own built-in kernel-TCP transport, adding visibility and robustness.

pub mod config;
pub mod error;
pub mod ffi;
pub mod handle;
pub mod tcp;
pub mod transport;

pub use error::{Error, Result};
