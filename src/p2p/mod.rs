//! A small endpoint API over any [`Transport`](crate::transport::Transport): listen, connect,
//! accept, register memory, send and receive with timeouts, and a TCP bootstrap that sets up a
//! two-way [`Endpoint`] between two processes. `tcpxshim serve/connect/demo` are built on it.
//!
//! Transfers only ever use memory the API owns: [`RegBuf`], host memory registered on one
//! connection. A send or receive takes its buffer by value and hands it back when it completes
//! or fails, so no borrowed memory is ever in flight: a pending transfer that is dropped closes
//! the connection before its buffer is freed, and one that is leaked leaks its buffer.
//!
//! ```no_run
//! # fn main() -> tcpxshim::Result<()> {
//! use std::time::Duration;
//! use tcpxshim::p2p;
//! let net = tcpxshim::tcp::TcpTransport::new(&tcpxshim::tcp::TcpConfig::from_env()?)?;
//! let t = Duration::from_secs(10);
//! let listener = p2p::Listener::listen(&net, 0)?;
//! let handle = *listener.handle(); // normally carried to the peer
//! let send = p2p::connect(&net, 0, handle, t)?;
//! let recv = listener.accept(t)?;
//! let a = p2p::reg(&send, vec![7u8; 4096])?; // registered, owned by `a` from now on
//! let b = p2p::reg(&recv, vec![0u8; 4096])?;
//! let pending = recv.irecv(b, 4096, t)?; // the pending receive owns `b` meanwhile
//! let _a = send.send(a, 4096, t)?; // sends hand their buffer back too
//! let (n, b) = pending.wait(t)?;
//! assert_eq!((n, b[0]), (4096, 7));
//! # Ok(()) }
//! ```
//!
//! Rules the API enforces for TCPX-like transports: every connect call for one connection gets
//! the same, unchanged handle buffer; accept gets a valid pointer to a device-handle pointer;
//! requests of a connection complete in posting order. Every wait has a timeout, and errors
//! name the transport, the device, the peer and what was being waited for.

mod buf;
mod conn;
mod endpoint;
#[cfg(test)]
mod mock;
mod stream;
mod xfer;

pub use buf::{RecvBuf, RegBuf, SendBuf};
pub use conn::{connect, handle_digest, reg, Conn, Connector, DevHandleInfo, Handle, Listener, RecvConn, SendConn};
pub use endpoint::{connect_to, serve, Endpoint, PeerInfo, Server, HELLO_LEN, MAGIC, MAX_PENDING, PROTOCOL_VERSION};
pub use stream::{FillFn, StreamResult};
pub use xfer::{OpError, Pending, PendingRecv, PendingSend, PostResult, Posted, MAX_INFLIGHT};

#[cfg(test)]
mod tests;
