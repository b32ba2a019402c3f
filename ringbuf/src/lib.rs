//! # ftvm-ringbuf — the log buffer
//!
//! A lock-free single-producer single-consumer buffer of **variable-length records**, written in
//! place and read in contiguous batches, over memory the caller supplies: the heap, or a
//! `memfd`/file mapping that a second process maps as well. It carries every nondeterministic
//! event of a primary VM from the vCPU thread (producer) to the sender poller (consumer), and on
//! the backup from the receiver poller to the replaying vCPU.
//!
//! - [`Producer::claim`] → fill the returned slice in place → [`Claim::commit`] (assigns the
//!   record's sequence number and publishes it). A full buffer is a [`ClaimError::Full`], never a
//!   block; [`Producer::claim_blocking`] waits with an [`IdleStrategy`].
//! - [`Producer::reserve`] takes space for several records at once; [`Reservation::claim`] /
//!   [`Reservation::push`] append them and [`Reservation::commit`] commits them together (the
//!   backup's receiver writes each DATA frame's records this way).
//! - [`Consumer::read`] returns a [`Batch`]: every committed record up to the end of the data
//!   area as one contiguous slice; [`Batch::release`] frees them in one store.
//! - Layout and protocol: [`layout`] (the bytes) and `ring.rs` (the orderings); see also
//!   `ringbuf/DESIGN.md`.
//!
//! ```
//! use ftvm_ringbuf::{with_capacity, ClaimError};
//!
//! let (mut tx, mut rx) = with_capacity(4096)?;
//! let mut claim = tx.claim(7, 5)?;
//! claim.copy_from_slice(b"hello");
//! let seq = claim.commit();
//! assert_eq!(tx.push(7, b"")?, seq + 1); // zero-length records work
//!
//! let batch = rx.read();
//! let got: Vec<_> = batch.records().map(|r| r.unwrap().payload().to_vec()).collect();
//! assert_eq!(got, [b"hello".to_vec(), vec![]]);
//! batch.release();
//! assert!(matches!(tx.claim(7, 1 << 20), Err(ClaimError::TooLarge { .. })));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod doorbell;
mod error;
pub mod idle;
pub mod layout;
mod region;
mod ring;
mod sync;

pub use doorbell::Doorbell;
pub use error::{ClaimError, CorruptRecord, RegionError, RingError};
pub use idle::{BackoffPark, BusySpin, IdleKind, IdleStrategy, SpinThenYield};
pub use region::{HeapRegion, Region, SharedRegion};
pub use ring::{
    with_capacity, Batch, Claim, Consumer, Producer, Record, Records, Reservation, Ring, FIRST_SEQ,
};
