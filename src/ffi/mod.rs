//! The NCCL net plugin ABI, generated from `nccl_headers/ncclnet.h`, with its layouts asserted.

#![allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code)]

#[rustfmt::skip]
mod bindings;
pub use bindings::*;

use static_assertions::{assert_eq_size, const_assert_eq};
use std::mem::{offset_of, size_of};

/// `ncclResult_t` values as Rust constants of the ABI's integer type.
pub type NcclResult = ncclResult_t::Type;
/// The v7 device handle NCCL allocates for UNPACK-type receive comms.
pub type DevHandle = ncclNetDeviceHandle_v7_t;

/// Size of the opaque handle NCCL carries between ranks.
pub const HANDLE_SIZE: usize = NCCL_NET_HANDLE_MAXSIZE as usize;

// Properties: v5 == v6 (72 bytes on LP64), v7 appends two ints, v8 inserts regIsGlobal.
assert_eq_size!(ncclNetProperties_v6_t, [u8; 48]);
const_assert_eq!(offset_of!(ncclNetProperties_v6_t, guid), 16);
const_assert_eq!(offset_of!(ncclNetProperties_v6_t, ptrSupport), 24);
const_assert_eq!(offset_of!(ncclNetProperties_v6_t, speed), 28);
const_assert_eq!(offset_of!(ncclNetProperties_v6_t, port), 32);
const_assert_eq!(offset_of!(ncclNetProperties_v6_t, latency), 36);
const_assert_eq!(offset_of!(ncclNetProperties_v6_t, maxComms), 40);
const_assert_eq!(offset_of!(ncclNetProperties_v6_t, maxRecvs), 44);
assert_eq_size!(ncclNetProperties_v7_t, [u8; 56]);
const_assert_eq!(offset_of!(ncclNetProperties_v7_t, netDeviceType), 48);
const_assert_eq!(offset_of!(ncclNetProperties_v7_t, netDeviceVersion), 52);
assert_eq_size!(ncclNetProperties_v8_t, [u8; 64]);
const_assert_eq!(offset_of!(ncclNetProperties_v8_t, regIsGlobal), 28);
const_assert_eq!(offset_of!(ncclNetProperties_v8_t, speed), 32);
const_assert_eq!(offset_of!(ncclNetProperties_v8_t, netDeviceVersion), 56);

// Device handle.
assert_eq_size!(ncclNetDeviceHandle_v7_t, [u8; 32]);
const_assert_eq!(offset_of!(ncclNetDeviceHandle_v7_t, handle), 8);
const_assert_eq!(offset_of!(ncclNetDeviceHandle_v7_t, size), 16);
const_assert_eq!(offset_of!(ncclNetDeviceHandle_v7_t, needsProxyProgress), 24);

// Function tables: a name pointer followed by function pointers, in ABI order.
const P: usize = size_of::<usize>();
assert_eq_size!(ncclNet_v5_t, [usize; 16]);
assert_eq_size!(ncclNet_v6_t, [usize; 17]);
assert_eq_size!(ncclNet_v7_t, [usize; 19]);
assert_eq_size!(ncclNet_v8_t, [usize; 19]);
const_assert_eq!(offset_of!(ncclNet_v5_t, regMr), 7 * P);
const_assert_eq!(offset_of!(ncclNet_v5_t, deregMr), 8 * P);
const_assert_eq!(offset_of!(ncclNet_v5_t, closeListen), 15 * P);
const_assert_eq!(offset_of!(ncclNet_v6_t, regMrDmaBuf), 8 * P);
const_assert_eq!(offset_of!(ncclNet_v6_t, isend), 10 * P);
const_assert_eq!(offset_of!(ncclNet_v6_t, closeListen), 16 * P);
const_assert_eq!(offset_of!(ncclNet_v7_t, connect), 5 * P);
const_assert_eq!(offset_of!(ncclNet_v7_t, accept), 6 * P);
const_assert_eq!(offset_of!(ncclNet_v7_t, test), 13 * P);
const_assert_eq!(offset_of!(ncclNet_v7_t, closeListen), 16 * P);
const_assert_eq!(offset_of!(ncclNet_v7_t, getDeviceMr), 17 * P);
const_assert_eq!(offset_of!(ncclNet_v7_t, irecvConsumed), 18 * P);
const_assert_eq!(offset_of!(ncclNet_v8_t, irecvConsumed), 18 * P);

const_assert_eq!(NCCL_NET_HANDLE_MAXSIZE, 128);
const_assert_eq!(ncclResult_t::ncclInProgress, 7);
const_assert_eq!(ncclDebugLogSubSys::NCCL_NET, 16);
