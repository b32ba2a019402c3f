//! TCP/IP for the ftvm guests: [smoltcp] over the virtio-net device at `0xD000_1000`
//! (DEVICES.md), configured from the command line.
//!
//! The VMM raises no interrupts: received frames are placed in the RX queue only while the VMM
//! handles a WAIT read (or an RX `QueueNotify`), and a transmitted frame is processed
//! synchronously at the TX `QueueNotify`. So the event loop of a guest is:
//!
//! ```ignore
//! let mut stack = Stack::new(&NetConfig::from_cmdline(&boot.cmdline)?)?;
//! loop {
//!     let now = Stack::now();
//!     stack.poll(now);          // frames in and out, timers
//!     /* serve the sockets in stack.sockets */
//!     stack.poll(now);          // send what the application queued
//!     stack.wait(now);          // WAIT until a frame arrives or smoltcp's next timer
//! }
//! ```
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod config;
pub mod phy;
pub mod stack;

pub use config::{ConfigError, NetConfig};
pub use stack::{NetError, Stack};
