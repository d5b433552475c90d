//! A small endpoint API over any [`Transport`](crate::transport::Transport): listen, connect,
//! accept, register memory, send and receive with timeouts, and a TCP bootstrap that sets up a
//! two-way [`Endpoint`] between two processes. `tcpxshim serve/connect/demo` are built on it.
//!
//! ```no_run
//! # fn main() -> tcpxshim::Result<()> {
//! use std::time::Duration;
//! use tcpxshim::p2p;
//! let net = tcpxshim::tcp::TcpTransport::new(&tcpxshim::config::TcpConfig::from_env()?)?;
//! let t = Duration::from_secs(10);
//! let listener = p2p::Listener::listen(&net, 0)?;
//! let handle = *listener.handle(); // normally carried to the peer
//! let send = p2p::connect(&net, 0, handle, t)?;
//! let recv = listener.accept(t)?;
//! let (mut a, mut b) = (vec![7u8; 4096], vec![0u8; 4096]);
//! let (mr_a, mr_b) = (p2p::reg(&send, &mut a)?, p2p::reg(&recv, &mut b)?);
//! let pending = recv.irecv(&mut b[..], &mr_b, t)?;
//! send.send(&a, &mr_a, t)?;
//! let (n, data) = pending.wait(t)?;
//! assert_eq!((n, data[0]), (4096, 7));
//! # Ok(()) }
//! ```
//!
//! Rules the API enforces for TCPX-like transports: every connect call for one connection gets
//! the same, unchanged handle buffer; accept gets a valid pointer to a device-handle pointer;
//! requests of a connection complete in posting order. Every wait has a timeout, and errors
//! name the transport, the device, the peer and what was being waited for.

pub mod bench;
mod conn;
mod endpoint;
#[cfg(test)]
mod mock;

pub use conn::{
    connect, handle_digest, reg, Conn, Connector, DevHandleInfo, FillFn, Handle, Listener, Mr, Pending, PendingRecv,
    PendingSend, Posted, RecvBuf, RecvConn, SendBuf, SendConn, MAX_INFLIGHT,
};
pub use endpoint::{connect_to, serve, Endpoint, PeerInfo, Server, HELLO_LEN, MAGIC, PROTOCOL_VERSION};

#[cfg(test)]
mod tests;
