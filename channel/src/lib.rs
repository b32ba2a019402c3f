//! # ftvm-channel — reliable log shipping from primary to backup
//!
//! The primary's vCPU thread appends records to a log buffer (`ftvm-ringbuf`); a pinned
//! sender poller ships them, batched into checksummed frames, over a [`Transport`] to the
//! backup, whose receiver poller re-creates them — same sequence numbers, in order, exactly
//! once — in the backup's log buffer and acknowledges them. Records leave the primary's buffer
//! only once acknowledged, so a lost frame or a broken connection is repaired by sending again
//! from the buffer (go-back-N), and a reconnect resumes from the backup's next expected record.
//!
//! - [`frame`]: the wire format (see `PROTOCOL.md`); [`reliable`]: handshake, acks,
//!   retransmission, reassembly — one copy, shared by every transport; [`poller`]: the pinned
//!   threads and the API the VMM uses ([`LogSender`], [`LogReceiver`]).
//! - Transports: [`shm`] (shared-memory rings, the physical-limit reference), [`tcp`]
//!   (blocking "tcp" and busy-polled "tcp-spin"), [`uring`] (io_uring over TCP), `xdp`
//!   (AF_XDP, feature `xdp`); [`faulty`] injects seeded faults under any of them.
//! - Test support: [`netns`] (two hosts made of network namespaces), [`skip`] (the one
//!   `SKIP <test>: <reason>` line a test prints when this host lacks what it needs).
//!
//! ```
//! use std::net::TcpListener;
//! use std::time::Duration;
//! use ftvm_channel::{Config, LogReceiver, LogSender, PollerConfig};
//! use ftvm_channel::tcp::{TcpMode, TcpTransport};
//!
//! let listener = TcpListener::bind("127.0.0.1:0")?;
//! let addr = listener.local_addr()?;
//! let backup = std::thread::spawn(move || -> Result<Vec<Vec<u8>>, ftvm_channel::TransportError> {
//!     let (p, c) = ftvm_ringbuf::with_capacity(1 << 16).expect("buffer");
//!     let t = TcpTransport::accept(&listener, TcpMode::Spin)?;
//!     let mut rx = LogReceiver::start(p, c, Box::new(t), Config::default(), PollerConfig::default())?;
//!     let mut got = Vec::new();
//!     while got.len() < 3 {
//!         rx.poll_records(|r| got.push(r.payload().to_vec()))?;
//!     }
//!     Ok(got)
//! });
//! let (p, c) = ftvm_ringbuf::with_capacity(1 << 16)?;
//! let t = TcpTransport::connect(addr, TcpMode::Spin, Duration::from_secs(5))?;
//! let mut tx = LogSender::start(p, c, Box::new(t), Config::default(), PollerConfig::default())?;
//! for msg in [&b"one"[..], b"two", b"three"] {
//!     tx.producer().push(1, msg)?;
//! }
//! assert!(tx.wait_acked(3, Duration::from_secs(5))?);
//! assert_eq!(backup.join().expect("backup thread")?, [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod error;
pub mod faulty;
pub mod frame;
pub mod netns;
pub mod poller;
pub mod reliable;
pub mod shm;
pub mod skip;
pub mod stats;
pub mod tcp;
pub mod transport;
pub mod uring;
#[cfg(feature = "xdp")]
pub mod xdp;

pub use error::{Refusal, TransportError};
pub use frame::{Goodbye, GoodbyeReason};
pub use poller::{LogReceiver, LogSender, PollerConfig, SenderHandle};
pub use reliable::{Config, Receiver, Sender};
pub use stats::StatsSnapshot;
pub use transport::Transport;
