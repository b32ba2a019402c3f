//! The record/replay seams: every nondeterministic input of the VM passes through here.
//!
//! [`handle_exit`](crate::vcpu::handle_exit) is the only place that calls these hooks, with the
//! index of the current exit (the clock of record/replay: `DESIGN.md`, "Where nondeterminism is
//! captured"):
//! - an MMIO read whose value comes from outside the guest (the system device's `CLOCK_NS`,
//!   `ENTROPY` and `WAIT`) goes to [`Recorder::external_read`] when live, and comes from
//!   [`ReplaySource::external_read`] instead of the device backend when replaying;
//! - every write of a device into guest memory (received packets, disk read data, used-ring
//!   updates) goes to [`Recorder::guest_write`]; when replaying, the writes logged for an exit
//!   are handed out by [`ReplaySource::guest_writes`] and applied at the end of that exit, and
//!   the devices' own sources of outside data (the TAP receive queue) stay silent.
//!
//! - every **output** a device produces (console bytes, transmitted frames, shared-disk writes)
//!   is digested ([`OutputDigest`]) and handed to [`Recorder::output`] when live — *before* the
//!   output is tagged for the output rule, so that its digest is in the log at a position no
//!   later than the output's tag — and to [`ReplaySource::output`] when replaying, which
//!   compares it with the digest the primary logged at the same exit (output-verified replay:
//!   `ft/LOG_FORMAT.md`, "Output digests"). One digest per device per exit (all the
//!   frames of one transmit notify together; only a shared-disk write request has its own,
//!   since each waits for the backup's acknowledgement before the next), not one per frame:
//!   the exit is the unit both
//!   sides agree on, and it keeps the cost to one 40-byte log record per exit that produced
//!   output (about 30 bytes of log per `kv` request) and one XXH3 pass over bytes the device
//!   has just copied, on the vCPU thread.
//!
//! `impl Recorder for ()` is the no-op used by a plain run.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::memory::GuestMem;

/// Receives the nondeterministic inputs of a live run.
pub trait Recorder: Send {
    /// The value `value` was returned for an MMIO read of `addr` at exit `exit`.
    fn external_read(&mut self, exit: u64, addr: u64, value: u64);
    /// A device wrote `data` at guest-physical `gpa` during exit `exit`.
    fn guest_write(&mut self, exit: u64, gpa: u64, data: &[u8]);
    /// A device produced the outputs digested in `out` during exit `exit` (called before the
    /// outputs leave the device). The default ignores them.
    fn output(&mut self, exit: u64, out: &OutputDigest) {
        let _ = (exit, out);
    }
    /// Whether [`Recorder::output`] wants the digests (devices skip hashing otherwise).
    fn wants_outputs(&self) -> bool {
        false
    }
    /// This recorder as [`Any`](std::any::Any), so that the run that installed it can reach it
    /// between two runs of the VM ([`Vm::recorder_mut`](crate::vm::Vm::recorder_mut)); `None`
    /// (the default): it cannot be reached.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
    /// The same, to take it back ([`Vm::take_recorder`](crate::vm::Vm::take_recorder)).
    fn into_any(self: Box<Self>) -> Option<Box<dyn std::any::Any>> {
        None
    }
}

impl Recorder for () {
    #[inline]
    fn external_read(&mut self, _exit: u64, _addr: u64, _value: u64) {}
    #[inline]
    fn guest_write(&mut self, _exit: u64, _gpa: u64, _data: &[u8]) {}
}

/// The device an output came from (the `source` of a logged output digest, LOG_FORMAT.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OutputSource {
    /// Console bytes (the system device's `CONSOLE_LEN`, a virtio-console transmit).
    Console = 1,
    /// Frames transmitted by virtio-net.
    Net = 2,
    /// A disk write request in shared-disk mode (the data and the sector it goes to).
    Disk = 3,
}

impl OutputSource {
    /// The source with wire code `code`, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(OutputSource::Console),
            2 => Some(OutputSource::Net),
            3 => Some(OutputSource::Disk),
            _ => None,
        }
    }

    /// A name for messages (`the console`, `virtio-net`, `the shared disk`).
    pub fn name(self) -> &'static str {
        match self {
            OutputSource::Console => "the console",
            OutputSource::Net => "virtio-net",
            OutputSource::Disk => "the shared disk",
        }
    }
}

/// The digest of the outputs one device produced in one exit: how many (`count`: console
/// writes, frames, disk write requests), their total length, and a hash over each of them in
/// order.
///
/// The hash is XXH3-64 (`xxhash-rust`), chained: each output is hashed with the previous
/// value as the seed (`h = xxh3_64_with_seed(output, h)`, starting from 0), and values that
/// belong to an output without being its bytes (a disk write's sector) are chained the same
/// way ([`OutputDigest::mix`]). Why XXH3: it is a specified, portable algorithm — the same
/// input gives the same value on every host and every version of the crate, which the two
/// sides of a pair on different machines need (`ahash`, also fast, is neither: its output
/// depends on the CPU's AES support and may change between versions) — and one of the fastest
/// 64-bit hashes (tens of GB/s on long inputs, a few nanoseconds on a short console line),
/// so digesting every output costs little next to the exit that produced it (~27 µs here).
/// It detects accidents (a replay that went astray), not adversaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputDigest {
    /// Which device.
    pub source: OutputSource,
    /// Outputs digested.
    pub count: u32,
    /// Their total length in bytes.
    pub bytes: u64,
    /// The chained XXH3-64 hash.
    pub hash: u64,
}

impl OutputDigest {
    /// An empty digest of `source`.
    pub fn new(source: OutputSource) -> Self {
        OutputDigest {
            source,
            count: 0,
            bytes: 0,
            hash: 0,
        }
    }

    /// Adds one output.
    pub fn add(&mut self, output: &[u8]) {
        self.hash = xxh3_64_with_seed(output, self.hash);
        self.count = self.count.saturating_add(1);
        self.bytes += output.len() as u64;
    }

    /// Chains a value that belongs to the next output without being part of its bytes (the
    /// sector of a disk write).
    pub fn mix(&mut self, value: u64) {
        self.hash = xxh3_64_with_seed(&value.to_le_bytes(), self.hash);
    }

    /// Whether no output was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl std::fmt::Display for OutputDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} output{} of {} bytes, digest {:#018x}",
            self.count,
            if self.count == 1 { "" } else { "s" },
            self.bytes,
            self.hash
        )
    }
}

/// Running totals over every output digest of a run (for end-of-run comparisons).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputTotals {
    /// Output digests folded in (one per device per exit that produced output).
    pub digests: u64,
    /// Outputs.
    pub outputs: u64,
    /// Bytes.
    pub bytes: u64,
    /// The digests' hashes chained in order (with their source and exit).
    pub hash: u64,
}

impl OutputTotals {
    /// Folds in the digest `out` of exit `exit`.
    pub fn fold(&mut self, exit: u64, out: &OutputDigest) {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&exit.to_le_bytes());
        b[8..16].copy_from_slice(&out.hash.to_le_bytes());
        b[16..].copy_from_slice(&(out.source as u64).to_le_bytes());
        self.hash = xxh3_64_with_seed(&b, self.hash);
        self.digests += 1;
        self.outputs += u64::from(out.count);
        self.bytes += out.bytes;
    }
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
    /// The run was kicked (asked to pause) while the source waited for the log's next entry:
    /// the exit is left incomplete and the run ends (a replaying VM cannot pause inside an
    /// exit whose input has not arrived; nothing says it ever will).
    #[error("replay interrupted at exit {exit} while waiting for the log")]
    Interrupted {
        /// The exit index.
        exit: u64,
    },
}

/// Supplies logged inputs to a replaying VM instead of the device backends.
///
/// Ordering: within one exit, a live run reports the device writes of that exit *before* the
/// value of its external read (a WAIT first delivers received packets, then returns its event
/// bits). A source must therefore hand out the read of exit `k` even when writes of exit `k`
/// come before it in the log; [`ReplaySource::guest_writes`] is called after the read.
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
    /// The replayed VM produced the outputs digested in `out` at exit `exit` (they are
    /// dropped); a source that verifies outputs compares them with the logged digest of that
    /// exit. The default accepts them unverified.
    ///
    /// # Errors
    /// [`ReplayError::Diverged`] if the log has another output (or none) here;
    /// [`ReplayError::Exhausted`] if the log ended before it (the primary never released an
    /// output whose digest the backup does not hold: its tag follows the digest).
    fn output(&mut self, exit: u64, out: &OutputDigest) -> Result<(), ReplayError> {
        let _ = (exit, out);
        Ok(())
    }
    /// Whether [`ReplaySource::output`] verifies outputs (devices skip hashing otherwise).
    fn verifies_outputs(&self) -> bool {
        false
    }
    /// The vCPU was taken out of guest code between two exits (it was asked to:
    /// [`VcpuKick::interrupt_replay`](crate::vcpu::VcpuKick::interrupt_replay)): `exit` exits
    /// are complete, the next one has not begun, and this is no exit (the exit index does not
    /// move). `Err(`[`ReplayError::Exhausted`]`)` if the log has ended and holds nothing for
    /// exit `exit` or later: the run then returns to its driver right here
    /// ([`RunExit::ReplayExhausted`](crate::vcpu::RunExit::ReplayExhausted)), and a run that
    /// continues live does so from this point of the guest's instruction stream.
    /// `Ok(())` (the default): replay on.
    ///
    /// # Errors
    /// As above; [`ReplayError::Diverged`] if the log is inconsistent.
    fn between_exits(&mut self, exit: u64) -> Result<(), ReplayError> {
        let _ = exit;
        Ok(())
    }
    /// This source as [`Any`](std::any::Any), so that the run that installed it can reach it
    /// between two runs of the VM ([`Vm::replay_mut`](crate::vm::Vm::replay_mut)); `None` (the
    /// default): it cannot be reached.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
    /// The same, to take it back ([`Vm::take_replay`](crate::vm::Vm::take_replay)).
    fn into_any(self: Box<Self>) -> Option<Box<dyn std::any::Any>> {
        None
    }
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

/// A recorder and replay source over an in-memory log, for tests and the determinism check
/// ([`crate::determinism`]).
pub mod memlog {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::{OutputDigest, OutputTotals, Recorder, ReplayError, ReplaySource};

    /// One logged input (or output digest).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Event {
        /// An MMIO read value from outside.
        Read {
            /// Exit index.
            exit: u64,
            /// MMIO address.
            addr: u64,
            /// Value.
            value: u64,
        },
        /// A device write into guest memory.
        Write {
            /// Exit index.
            exit: u64,
            /// Guest address.
            gpa: u64,
            /// Bytes.
            data: Vec<u8>,
        },
        /// The digest of the outputs a device produced.
        Output {
            /// Exit index.
            exit: u64,
            /// The digest.
            digest: OutputDigest,
        },
    }

    impl Event {
        /// The exit the event belongs to.
        pub fn exit(&self) -> u64 {
            match self {
                Event::Read { exit, .. }
                | Event::Write { exit, .. }
                | Event::Output { exit, .. } => *exit,
            }
        }
    }

    /// Records into a shared `Vec<Event>` (output digests included).
    #[derive(Debug, Clone, Default)]
    pub struct MemRecorder {
        /// The log.
        pub log: Arc<Mutex<Vec<Event>>>,
    }

    impl MemRecorder {
        fn push(&self, e: Event) {
            self.log.lock().unwrap_or_else(|e| e.into_inner()).push(e);
        }
    }

    impl Recorder for MemRecorder {
        fn external_read(&mut self, exit: u64, addr: u64, value: u64) {
            self.push(Event::Read { exit, addr, value });
        }
        fn guest_write(&mut self, exit: u64, gpa: u64, data: &[u8]) {
            self.push(Event::Write {
                exit,
                gpa,
                data: data.to_vec(),
            });
        }
        fn output(&mut self, exit: u64, out: &OutputDigest) {
            self.push(Event::Output { exit, digest: *out });
        }
        fn wants_outputs(&self) -> bool {
            true
        }
    }

    /// How the outputs of a replay compared with the recorded run's ([`MemReplay::output_check`]).
    #[derive(Debug, Clone, Default)]
    pub struct OutputCheck {
        /// Totals over the replayed run's outputs.
        pub totals: OutputTotals,
        /// Output digests equal to the recorded ones.
        pub verified: u64,
        /// Output digests that differed (or had no counterpart).
        pub mismatches: u64,
        /// The first [`KEPT_MISMATCHES`] of them: (exit, what).
        pub first: Vec<(u64, String)>,
    }

    /// How many output mismatches an [`OutputCheck`] describes.
    pub const KEPT_MISMATCHES: usize = 16;

    impl OutputCheck {
        fn mismatch(&mut self, exit: u64, what: String) {
            self.mismatches += 1;
            if self.first.len() < KEPT_MISMATCHES {
                self.first.push((exit, what));
            }
        }
    }

    /// Replays a `Vec<Event>` in order. Outputs are verified against the recorded digests;
    /// unlike a backup, a difference does not stop the replay: it is counted in the
    /// [`OutputCheck`] (a check of a whole run wants to reach its end and compare the final
    /// state as well).
    #[derive(Debug, Clone, Default)]
    pub struct MemReplay {
        events: VecDeque<Event>,
        check: Arc<Mutex<OutputCheck>>,
    }

    impl MemReplay {
        /// A source over `events`.
        pub fn new(events: Vec<Event>) -> Self {
            MemReplay {
                events: events.into(),
                check: Arc::default(),
            }
        }
        /// Events not consumed yet.
        pub fn remaining(&self) -> usize {
            self.events.len()
        }
        /// The comparison of the outputs (shared: read it after the run).
        pub fn output_check(&self) -> Arc<Mutex<OutputCheck>> {
            Arc::clone(&self.check)
        }
        fn check(&self) -> std::sync::MutexGuard<'_, OutputCheck> {
            self.check.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    impl ReplaySource for MemReplay {
        fn external_read(&mut self, exit: u64, addr: u64) -> Result<u64, ReplayError> {
            // Within one exit the live run logs device writes before the read's value (a WAIT
            // delivers packets, then returns its event bits): look past this exit's writes.
            let pos = self
                .events
                .iter()
                .take_while(|e| matches!(e, Event::Write { exit: x, .. } | Event::Read { exit: x, .. } if *x == exit))
                .position(|e| matches!(e, Event::Read { .. }));
            match pos.and_then(|p| self.events.remove(p)) {
                Some(Event::Read { addr: a, value, .. }) if a == addr => Ok(value),
                Some(other) => Err(ReplayError::Diverged {
                    exit,
                    what: format!("read of {addr:#x} but the log has {other:?}"),
                }),
                None => match self.events.front() {
                    Some(other) => Err(ReplayError::Diverged {
                        exit,
                        what: format!("read of {addr:#x} but the log has {other:?}"),
                    }),
                    None => Err(ReplayError::Exhausted { exit }),
                },
            }
        }
        fn guest_writes(
            &mut self,
            exit: u64,
            apply: &mut dyn FnMut(u64, &[u8]),
        ) -> Result<(), ReplayError> {
            while self.events.front().is_some_and(|e| e.exit() == exit) {
                match self.events.pop_front() {
                    Some(Event::Write { gpa, data, .. }) => apply(gpa, &data),
                    Some(Event::Output { digest, .. }) => self.check().mismatch(
                        exit,
                        format!(
                            "output of {}: the recording has {digest} here, the replay none",
                            digest.source.name()
                        ),
                    ),
                    Some(other) => {
                        self.events.push_front(other);
                        break;
                    }
                    None => break,
                }
            }
            Ok(())
        }
        fn output(&mut self, exit: u64, out: &OutputDigest) -> Result<(), ReplayError> {
            let pos = self
                .events
                .iter()
                .take_while(|e| e.exit() == exit)
                .position(|e| !matches!(e, Event::Write { .. }));
            let logged = match pos.map(|p| (p, &self.events[p])) {
                Some((p, Event::Output { digest, .. })) => {
                    let d = *digest;
                    self.events.remove(p);
                    Some(d)
                }
                _ => None,
            };
            let mut check = self.check();
            check.totals.fold(exit, out);
            match logged {
                Some(d) if d == *out => check.verified += 1,
                Some(d) => check.mismatch(
                    exit,
                    format!(
                        "output of {} differs: the replay's is {out}, the recording's {d}",
                        out.source.name()
                    ),
                ),
                None => check.mismatch(
                    exit,
                    format!(
                        "output of {}: the replay's is {out}, the recording has none here",
                        out.source.name()
                    ),
                ),
            }
            Ok(())
        }
        fn verifies_outputs(&self) -> bool {
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::memlog::{Event, MemRecorder, MemReplay};
    use super::*;
    use crate::bus::ExitCtx;
    use crate::devices::sys::{REG_CLOCK_NS, REG_ENTROPY, REG_WAIT};
    use crate::memory::MMIO_BASE;
    use crate::vm::{buffer_console, RunOutcome, Vm, VmConfig};
    use ftvm_testkit::{Asm, Reg};

    #[test]
    fn device_writes_reach_the_recorder() {
        let mem = crate::memory::allocate(4 << 20).unwrap();
        let rec = MemRecorder::default();
        let mut inputs = Inputs::Live(Box::new(rec.clone()));
        let mut ctx = ExitCtx {
            mem: &mem,
            exit: 7,
            inputs: &mut inputs,
        };
        ctx.write_guest(0x5000, b"abc").unwrap();
        ctx.record_written(0x5001, 2).unwrap();
        assert!(ctx.write_guest(1 << 30, b"x").is_err());
        let log = rec.log.lock().unwrap().clone();
        assert_eq!(
            log,
            vec![
                Event::Write {
                    exit: 7,
                    gpa: 0x5000,
                    data: b"abc".to_vec()
                },
                Event::Write {
                    exit: 7,
                    gpa: 0x5001,
                    data: b"bc".to_vec()
                },
            ]
        );
    }

    /// clock ^ entropy, stored in memory, printed, then WAIT, then power off with the value.
    fn nondeterministic_guest() -> Vec<u8> {
        Asm::new()
            .load(Reg::Rbx, REG_CLOCK_NS as u8)
            .load(Reg::Rcx, REG_ENTROPY as u8)
            .xor_rbx_rcx()
            .mov_imm(Reg::Rdx, 0x40000)
            .store_rbx_at_rdx()
            .print(0x40000, 8)
            .load(Reg::Rcx, REG_WAIT as u8)
            .power_off_rbx()
            .elf()
    }

    /// A replay source with no entries at all: its log ended before the run began; it notes
    /// where it is asked between exits.
    #[derive(Debug, Default)]
    struct EndedLog {
        asked_between: Arc<Mutex<Vec<u64>>>,
    }

    impl ReplaySource for EndedLog {
        fn external_read(&mut self, exit: u64, _addr: u64) -> Result<u64, ReplayError> {
            Err(ReplayError::Exhausted { exit })
        }
        fn guest_writes(
            &mut self,
            _exit: u64,
            _apply: &mut dyn FnMut(u64, &[u8]),
        ) -> Result<(), ReplayError> {
            // No write is missing after the prints (they are outputs, not inputs).
            Ok(())
        }
        fn between_exits(&mut self, exit: u64) -> Result<(), ReplayError> {
            self.asked_between.lock().unwrap().push(exit);
            Err(ReplayError::Exhausted { exit })
        }
    }

    /// A replaying vCPU inside a long loop without exits is interrupted
    /// ([`VmControl::interrupt_replay`](crate::vm::VmControl::interrupt_replay)): its source is
    /// asked between exit 1 and exit 2, the run returns to its driver there
    /// ([`RunOutcome::ReplayExhausted`]), which goes live, and the run continues live from that
    /// point of the loop to the power-off. The interruption is no exit: the run makes exactly
    /// the exits of a plain run.
    #[test]
    fn an_interrupt_between_exits_goes_live_without_counting_an_exit() {
        ftvm_testkit::require_kvm!("an_interrupt_between_exits_goes_live_without_counting_an_exit");
        // Print (exits 0 and 1), ~4e9 iterations without an exit, power off (exit 2).
        let elf = Asm::new()
            .print(0x40000, 8)
            .repeat(u32::MAX, |a| a)
            .power_off(7)
            .elf();
        let cfg = VmConfig {
            mem_size: 4 << 20,
            console: buffer_console().0,
            ..Default::default()
        };
        let plain = {
            let mut vm = Vm::new(&cfg, &elf).unwrap();
            assert_eq!(vm.run().unwrap(), RunOutcome::PoweredOff(7));
            vm.stats().total()
        };
        assert_eq!(plain, 3);
        let src = EndedLog::default();
        let asked = src.asked_between.clone();
        let mut vm = Vm::new(&cfg, &elf).unwrap();
        vm.set_inputs(Inputs::Replay(Box::new(src)));
        let ctl = vm.control();
        let interrupter = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            ctl.interrupt_replay();
        });
        // The driver (here: the test) goes live where the replay ran out, and runs on.
        let mut live = None;
        let outcome = loop {
            match vm.run().unwrap() {
                RunOutcome::ReplayExhausted { exit, at } => {
                    assert_eq!(live, None, "the replay ran out twice");
                    live = Some((exit, at));
                    vm.set_inputs(Inputs::default());
                }
                o => break o,
            }
        };
        assert_eq!(outcome, RunOutcome::PoweredOff(7));
        interrupter.join().unwrap();
        assert_eq!(
            *asked.lock().unwrap(),
            vec![2],
            "asked between exits 1 and 2 only"
        );
        assert_eq!(live, Some((2, crate::vcpu::ExhaustedAt::BetweenExits)));
        assert_eq!(
            vm.stats().total(),
            plain,
            "the interruption counted as an exit"
        );
        assert!(vm.stats().interrupts >= 1, "KVM_RUN was not interrupted");
    }

    /// The log ends before the guest's ENTROPY read (exit 1): the exit handler does not decide,
    /// the run returns with that read pending ([`RunOutcome::ReplayExhausted`], nothing counted,
    /// no state can be captured), and the driver's next run — with live inputs — answers it at
    /// the same exit index: the guest computes with the replayed clock and the live entropy, and
    /// makes exactly the exits of a plain run.
    #[test]
    fn a_read_the_replay_lacks_stays_pending_and_the_next_run_answers_it_live() {
        ftvm_testkit::require_kvm!(
            "a_read_the_replay_lacks_stays_pending_and_the_next_run_answers_it_live"
        );
        let elf = nondeterministic_guest();
        let cfg = VmConfig {
            mem_size: 4 << 20,
            ..Default::default()
        };
        let rec = MemRecorder::default();
        let mut vm = Vm::new(&cfg, &elf).unwrap();
        vm.set_inputs(Inputs::Live(Box::new(rec.clone())));
        assert!(matches!(vm.run().unwrap(), RunOutcome::PoweredOff(_)));
        let plain = vm.stats().total();
        let log = rec.log.lock().unwrap().clone();
        let Some(Event::Read { value: clock, .. }) = log.first().cloned() else {
            panic!("the first event is not the clock read: {log:?}");
        };
        // The backup holds the clock read only.
        let mut vm = Vm::new(&cfg, &elf).unwrap();
        vm.set_inputs(Inputs::Replay(Box::new(MemReplay::new(log[..1].to_vec()))));
        assert_eq!(
            vm.run().unwrap(),
            RunOutcome::ReplayExhausted {
                exit: 1,
                at: crate::vcpu::ExhaustedAt::Read
            }
        );
        assert_eq!(vm.stats().total(), 1, "the pending read was counted");
        assert!(
            matches!(
                vm.capture(),
                Err(crate::vm::VmError::ExitPending { exit: 1 })
            ),
            "a VM with a pending read was captured"
        );
        // Live from here: the pending ENTROPY read is answered by the device, at exit 1.
        let live = MemRecorder::default();
        vm.set_inputs(Inputs::Live(Box::new(live.clone())));
        let RunOutcome::PoweredOff(code) = vm.run().unwrap() else {
            panic!("the live run did not power off");
        };
        let live_log = live.log.lock().unwrap().clone();
        let Some(Event::Read {
            exit: 1,
            addr,
            value: entropy,
        }) = live_log.first().cloned()
        else {
            panic!("the pending read was not answered live at exit 1: {live_log:?}");
        };
        assert_eq!(addr, MMIO_BASE + REG_ENTROPY);
        assert_eq!(
            code,
            clock ^ entropy,
            "the guest did not get the live value"
        );
        assert_eq!(
            vm.stats().total(),
            plain,
            "an exit was counted twice or lost"
        );
        assert!(vm.capture().is_ok());
    }

    #[test]
    fn replay_reproduces_a_recorded_run() {
        ftvm_testkit::require_kvm!("replay_reproduces_a_recorded_run");
        let elf = nondeterministic_guest();
        let run = |inputs: Inputs| {
            let (console, out) = buffer_console();
            let cfg = VmConfig {
                mem_size: 4 << 20,
                console,
                ..Default::default()
            };
            let mut vm = Vm::new(&cfg, &elf).unwrap();
            vm.set_inputs(inputs);
            let outcome = vm.run().unwrap();
            let bytes = out.lock().unwrap().clone();
            (outcome, bytes, vm.memory_digest())
        };
        let rec = MemRecorder::default();
        let recorded = run(Inputs::Live(Box::new(rec.clone())));
        let log = rec.log.lock().unwrap().clone();
        let reads: Vec<(u64, u64)> = log
            .iter()
            .filter_map(|e| match e {
                Event::Read { exit, addr, .. } => Some((*exit, *addr)),
                Event::Write { .. } | Event::Output { .. } => None,
            })
            .collect();
        assert_eq!(
            reads,
            vec![
                (0, MMIO_BASE + REG_CLOCK_NS),
                (1, MMIO_BASE + REG_ENTROPY),
                (4, MMIO_BASE + REG_WAIT)
            ]
        );
        // A second live run differs (fresh entropy) ...
        let other = run(Inputs::default());
        assert_ne!(other.0, recorded.0);
        // ... the replay is identical: exit code, console output, memory.
        let replayed = run(Inputs::Replay(Box::new(MemReplay::new(log.clone()))));
        assert_eq!(replayed, recorded);
        assert!(matches!(recorded.0, RunOutcome::PoweredOff(_)));
        // A log from which one read is missing is detected as a divergence.
        let mut broken = log;
        broken.remove(1);
        let cfg = VmConfig {
            mem_size: 4 << 20,
            ..Default::default()
        };
        let mut vm = Vm::new(&cfg, &elf).unwrap();
        vm.set_inputs(Inputs::Replay(Box::new(MemReplay::new(broken))));
        let e = vm.run().unwrap_err();
        assert!(format!("{:?}", e).contains("Diverged"), "{e:?}");
    }
}
