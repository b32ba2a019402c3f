//! The record/replay seams: every nondeterministic input of the VM passes through here.
//!
//! [`handle_exit`](crate::vcpu::handle_exit) is the only place that calls these hooks, with the
//! index of the current exit (the clock of record/replay, DESIGN.md §3):
//! - an MMIO read whose value comes from outside the guest (the system device's `CLOCK_NS`,
//!   `ENTROPY` and `WAIT`) goes to [`Recorder::external_read`] when live, and comes from
//!   [`ReplaySource::external_read`] instead of the device backend when replaying;
//! - every write of a device into guest memory (received packets, disk read data, used-ring
//!   updates) goes to [`Recorder::guest_write`]; when replaying, the writes logged for an exit
//!   are handed out by [`ReplaySource::guest_writes`] and applied at the end of that exit, and
//!   the devices' own sources of outside data (the TAP receive queue) stay silent.
//!
//! `impl Recorder for ()` is the no-op used by a plain run.

use crate::memory::GuestMem;

/// Receives the nondeterministic inputs of a live run.
pub trait Recorder: Send {
    /// The value `value` was returned for an MMIO read of `addr` at exit `exit`.
    fn external_read(&mut self, exit: u64, addr: u64, value: u64);
    /// A device wrote `data` at guest-physical `gpa` during exit `exit`.
    fn guest_write(&mut self, exit: u64, gpa: u64, data: &[u8]);
}

impl Recorder for () {
    #[inline]
    fn external_read(&mut self, _exit: u64, _addr: u64, _value: u64) {}
    #[inline]
    fn guest_write(&mut self, _exit: u64, _gpa: u64, _data: &[u8]) {}
}

/// Why a replay source could not supply an input.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The log has a different event at this point: the replayed VM diverged.
    #[error("replay diverged at exit {exit}: {what}")]
    Diverged {
        /// The exit index.
        exit: u64,
        /// What differed.
        what: String,
    },
    /// The log has no more entries.
    #[error("replay log ended at exit {exit}")]
    Exhausted {
        /// The exit index.
        exit: u64,
    },
}

/// Supplies logged inputs to a replaying VM instead of the device backends.
pub trait ReplaySource: Send {
    /// The logged value of the MMIO read of `addr` at exit `exit`.
    ///
    /// # Errors
    /// [`ReplayError`] if the log has no such read at this exit.
    fn external_read(&mut self, exit: u64, addr: u64) -> Result<u64, ReplayError>;
    /// Calls `apply(gpa, data)` for each device write into guest memory logged at exit `exit`, in
    /// order, and consumes them.
    ///
    /// # Errors
    /// [`ReplayError`] if the log is inconsistent.
    fn guest_writes(
        &mut self,
        exit: u64,
        apply: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<(), ReplayError>;
}

/// Where the nondeterministic inputs of a run come from.
#[derive(Debug)]
pub enum Inputs {
    /// Live: from the device backends, reported to the recorder.
    Live(Box<dyn Recorder>),
    /// Replay: from a log.
    Replay(Box<dyn ReplaySource>),
}

impl std::fmt::Debug for dyn Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Recorder")
    }
}

impl std::fmt::Debug for dyn ReplaySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplaySource")
    }
}

impl Default for Inputs {
    fn default() -> Self {
        Inputs::Live(Box::new(()))
    }
}

impl Inputs {
    /// Whether this is a replay.
    pub fn is_replay(&self) -> bool {
        matches!(self, Inputs::Replay(_))
    }
}

/// Applies the writes logged for `exit` to `mem` (replay).
///
/// # Errors
/// [`ReplayError::Diverged`] if a logged write falls outside guest memory.
pub(crate) fn apply_logged_writes(
    source: &mut dyn ReplaySource,
    mem: &GuestMem,
    exit: u64,
) -> Result<(), ReplayError> {
    use vm_memory::{Bytes, GuestAddress};
    let mut bad = None;
    source.guest_writes(exit, &mut |gpa, data| {
        if mem.write_slice(data, GuestAddress(gpa)).is_err() && bad.is_none() {
            bad = Some(gpa);
        }
    })?;
    match bad {
        Some(gpa) => Err(ReplayError::Diverged {
            exit,
            what: format!("logged write at {gpa:#x} is outside guest memory"),
        }),
        None => Ok(()),
    }
}
