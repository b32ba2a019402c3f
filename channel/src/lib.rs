//! Reliable log shipping between primary and backup over shm, TCP, io_uring and AF_XDP.
//!
//! (Under construction: see `PROTOCOL.md`.)
#![deny(missing_docs)]

pub mod error;
pub mod netns;
pub mod transport;
#[cfg(feature = "xdp")]
pub mod xdp;

pub use error::TransportError;
pub use transport::Transport;
