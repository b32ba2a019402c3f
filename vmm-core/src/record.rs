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
    /// The source ran out of entries at exit `exit` (one of its methods just returned
    /// [`ReplayError::Exhausted`]). Returns the recorder of live inputs if the run continues
    /// **live** from this point (a backup that won the take-over after its primary failed), or
    /// `None` to end the replay with the error (the default).
    ///
    /// Where the VMM asks (see [`try_go_live`]): at an external read (the read, and the rest of
    /// the exit, are then answered live: the writes logged for this exit before the missing read
    /// are discarded), at the end of an exit (the writes of the exit received so far have
    /// been applied; the next exit runs live), and between two exits
    /// ([`ReplaySource::between_exits`]).
    fn go_live(&mut self, exit: u64) -> Option<Box<dyn Recorder>> {
        let _ = exit;
        None
    }
    /// The vCPU was taken out of guest code between two exits (it was asked to:
    /// [`VcpuKick::interrupt_replay`](crate::vcpu::VcpuKick::interrupt_replay)): `exit` exits
    /// are complete, the next one has not begun, and this is no exit (the exit index does not
    /// move). `Err(`[`ReplayError::Exhausted`]`)` if the log has ended and holds nothing for
    /// exit `exit` or later: the VMM then asks [`ReplaySource::go_live`] right here, and a run
    /// that goes live continues live from this point of the guest's instruction stream.
    /// `Ok(())` (the default): replay on.
    ///
    /// # Errors
    /// As above; [`ReplayError::Diverged`] if the log is inconsistent.
    fn between_exits(&mut self, exit: u64) -> Result<(), ReplayError> {
        let _ = exit;
        Ok(())
    }
}

/// After the replay source of `inputs` returned [`ReplayError::Exhausted`] at exit `exit`: asks
/// it whether the run goes live ([`ReplaySource::go_live`]); if so, `inputs` becomes
/// [`Inputs::Live`] with the recorder it returned, and this returns `true`.
pub fn try_go_live(inputs: &mut Inputs, exit: u64) -> bool {
    let Inputs::Replay(src) = inputs else {
        return false;
    };
    match src.go_live(exit) {
        Some(rec) => {
            *inputs = Inputs::Live(rec);
            true
        }
        None => false,
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

/// A recorder and replay source over an in-memory log, for tests.
pub mod memlog {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::{Recorder, ReplayError, ReplaySource};

    /// One logged input.
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
    }

    /// Records into a shared `Vec<Event>`.
    #[derive(Debug, Clone, Default)]
    pub struct MemRecorder {
        /// The log.
        pub log: Arc<Mutex<Vec<Event>>>,
    }

    impl Recorder for MemRecorder {
        fn external_read(&mut self, exit: u64, addr: u64, value: u64) {
            self.log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Event::Read { exit, addr, value });
        }
        fn guest_write(&mut self, exit: u64, gpa: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Event::Write {
                    exit,
                    gpa,
                    data: data.to_vec(),
                });
        }
    }

    /// Replays a `Vec<Event>` in order.
    #[derive(Debug, Clone, Default)]
    pub struct MemReplay {
        events: VecDeque<Event>,
    }

    impl MemReplay {
        /// A source over `events`.
        pub fn new(events: Vec<Event>) -> Self {
            MemReplay {
                events: events.into(),
            }
        }
        /// Events not consumed yet.
        pub fn remaining(&self) -> usize {
            self.events.len()
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
            while let Some(Event::Write { exit: e, .. }) = self.events.front() {
                if *e != exit {
                    break;
                }
                if let Some(Event::Write { gpa, data, .. }) = self.events.pop_front() {
                    apply(gpa, &data);
                }
            }
            Ok(())
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
    use crate::testing::{Asm, Reg};
    use crate::vm::{buffer_console, RunOutcome, Vm, VmConfig};

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

    /// A replay source with no entries at all: its log ended before the run began; it goes live
    /// at the first point it is asked, and notes where.
    #[derive(Debug, Default)]
    struct EndedLog {
        asked_between: Arc<Mutex<Vec<u64>>>,
        went_live: Arc<Mutex<Option<u64>>>,
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
        fn go_live(&mut self, exit: u64) -> Option<Box<dyn Recorder>> {
            *self.went_live.lock().unwrap() = Some(exit);
            Some(Box::new(()))
        }
    }

    /// A replaying vCPU inside a long loop without exits is interrupted
    /// ([`VmControl::interrupt_replay`](crate::vm::VmControl::interrupt_replay)): its source is
    /// asked between exit 1 and exit 2, goes live there, and the run continues live from that
    /// point of the loop to the power-off. The interruption is no exit: the run makes exactly
    /// the exits of a plain run.
    #[test]
    fn an_interrupt_between_exits_goes_live_without_counting_an_exit() {
        crate::require_kvm!("an_interrupt_between_exits_goes_live_without_counting_an_exit");
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
        let (asked, live) = (src.asked_between.clone(), src.went_live.clone());
        let mut vm = Vm::new(&cfg, &elf).unwrap();
        vm.set_inputs(Inputs::Replay(Box::new(src)));
        let ctl = vm.control();
        let interrupter = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            ctl.interrupt_replay();
        });
        assert_eq!(vm.run().unwrap(), RunOutcome::PoweredOff(7));
        interrupter.join().unwrap();
        assert_eq!(
            *asked.lock().unwrap(),
            vec![2],
            "asked between exits 1 and 2 only"
        );
        assert_eq!(*live.lock().unwrap(), Some(2));
        assert_eq!(
            vm.stats().total(),
            plain,
            "the interruption counted as an exit"
        );
        assert!(vm.stats().interrupts >= 1, "KVM_RUN was not interrupted");
    }

    #[test]
    fn replay_reproduces_a_recorded_run() {
        crate::require_kvm!("replay_reproduces_a_recorded_run");
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
                Event::Write { .. } => None,
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
