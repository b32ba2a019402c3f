//! Is a guest deterministic given its logged inputs? (`ftvm run --check-determinism`)
//!
//! Record/replay rests on one assumption: given the inputs that pass through the record seams
//! ([`crate::record`]), the guest's execution is determined. A guest that executes an
//! instruction whose result the VMM cannot log (RDRAND, RDTSC where the host does not trap it:
//! `guests/README.md`) breaks it, and a primary/backup pair of it fails over to a different
//! state (output-verified replay then stops the backup: `ftvm_ft::golive`). [`check`] finds out
//! before: it runs the guest twice with the same inputs — the first run live, every input
//! recorded in memory ([`MemRecorder`]), the second a replay of that recording ([`MemReplay`],
//! which verifies every output digest against the first run's and goes on after a difference)
//! — and compares, at power-off, what a pair would compare: exit code, number of exits,
//! register and memory digests, the digests of every output (console, transmitted frames), the
//! console bytes, and the disk image.
//!
//! Devices: the first run uses the configuration as given (TAP, disk). The second never opens
//! the TAP (its received packets come from the recording, its transmits are dropped; the device
//! set stays the same) and runs on a copy of the disk image taken before the first run
//! (`<image>.check-<pid>`, removed afterwards), so that both start from the same disk and their
//! final images can be compared. A guest with a network serves its clients during the first
//! run as usual; the check happens when it powers off (the recording, every packet included,
//! is kept in memory until then).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use xxhash_rust::xxh3::xxh3_64;

use crate::digest::{file_digest, register_digest};
use crate::record::memlog::{Event, MemRecorder, MemReplay, OutputCheck};
use crate::record::{Inputs, OutputTotals};
use crate::vm::{buffer_console, RunOutcome, Vm, VmConfig, VmError};

/// Errors of [`check`] (a nondeterministic guest is not an error: see [`DeterminismReport`]).
#[derive(Debug, thiserror::Error)]
pub enum DeterminismError {
    /// The disk image could not be copied for the second run.
    #[error("cannot copy the disk image {0} for the second run")]
    DiskCopy(PathBuf, #[source] std::io::Error),
    /// A disk image could not be read for its digest.
    #[error("cannot read the disk image {0}")]
    DiskRead(PathBuf, #[source] std::io::Error),
    /// The first run could not be built or failed.
    #[error("the first run failed")]
    FirstRun(#[source] VmError),
    /// The first run stopped without powering off (nothing complete to compare against).
    #[error("the first run stopped without powering off ({0:?})")]
    NotPoweredOff(RunOutcome),
    /// The second run's VM could not be built.
    #[error("the second run could not start")]
    SecondRun(#[source] VmError),
}

/// What one run ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDigests {
    /// Power-off code.
    pub code: u64,
    /// Exits handled.
    pub exits: u64,
    /// Register digest at power-off.
    pub regs: u64,
    /// Memory digest at power-off.
    pub mem: u64,
    /// Every output digest of the run, folded.
    pub outputs: OutputTotals,
    /// The console bytes: XXH3-64 and length.
    pub console: (u64, u64),
    /// The disk image's digest at the end (`None`: no disk).
    pub disk: Option<u64>,
}

/// One compared quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// What (`exit code`, `registers`, …).
    pub what: &'static str,
    /// The first run's value.
    pub first: String,
    /// The second run's value.
    pub second: String,
    /// Whether they are equal.
    pub equal: bool,
}

/// The result of [`check`].
#[derive(Debug, Clone)]
pub struct DeterminismReport {
    /// The first (live) run.
    pub first: RunDigests,
    /// The second (replayed) run; `Err`: it could not follow the first run's inputs (it made
    /// another exit than the recording has at some point, or faulted) — nondeterministic.
    pub second: Result<RunDigests, String>,
    /// Every quantity compared (empty when the second run failed).
    pub comparisons: Vec<Comparison>,
    /// How the second run's outputs compared with the first's, one by one.
    pub outputs: OutputCheck,
    /// Inputs recorded by the first run and replayed (reads, writes into guest memory).
    pub inputs: (u64, u64),
    /// The first run's console output.
    pub console: Vec<u8>,
}

impl DeterminismReport {
    /// Whether both runs ended alike: the guest is deterministic given its logged inputs (as
    /// far as these two runs show).
    pub fn is_deterministic(&self) -> bool {
        self.second.is_ok()
            && self.outputs.mismatches == 0
            && self.comparisons.iter().all(|c| c.equal)
    }
}

/// Removes the second run's disk copy when dropped.
struct DiskCopy(PathBuf);

impl Drop for DiskCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn disk_digest(path: Option<&Path>) -> Result<Option<u64>, DeterminismError> {
    path.map(|p| file_digest(p).map_err(|e| DeterminismError::DiskRead(p.to_path_buf(), e)))
        .transpose()
}

fn digests(
    vm: &Vm,
    code: u64,
    outputs: OutputTotals,
    console: &[u8],
    disk: Option<&Path>,
) -> Result<RunDigests, DeterminismError> {
    Ok(RunDigests {
        code,
        exits: vm.stats().total(),
        regs: register_digest(vm),
        mem: vm.memory_digest(),
        outputs,
        console: (xxh3_64(console), console.len() as u64),
        disk: disk_digest(disk)?,
    })
}

fn take(buf: &Arc<Mutex<Vec<u8>>>) -> Vec<u8> {
    std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Runs the guest `elf` twice with the same inputs (see the module documentation) and
/// compares the two runs at power-off. `config.console` is not used (both runs print into
/// buffers; the first run's output is in the report).
///
/// # Errors
/// [`DeterminismError`] when the check itself cannot be made (the first run fails or does not
/// power off, a disk image cannot be copied or read). A guest that turns out nondeterministic
/// is reported in [`DeterminismReport`], not as an error.
pub fn check(config: &VmConfig, elf: &[u8]) -> Result<DeterminismReport, DeterminismError> {
    let copy = match &config.disk {
        Some(image) => {
            let mut name = image.as_os_str().to_owned();
            name.push(format!(".check-{}", std::process::id()));
            let copy = DiskCopy(PathBuf::from(name));
            std::fs::copy(image, &copy.0)
                .map_err(|e| DeterminismError::DiskCopy(image.clone(), e))?;
            Some(copy)
        }
        None => None,
    };

    // The first run: live, every input recorded.
    let (console, buf) = buffer_console();
    let first_config = VmConfig {
        console,
        ..config.clone()
    };
    let mut vm = Vm::new(&first_config, elf).map_err(DeterminismError::FirstRun)?;
    let recorder = MemRecorder::default();
    vm.set_inputs(Inputs::Live(Box::new(recorder.clone())));
    let code = match vm.run().map_err(DeterminismError::FirstRun)? {
        RunOutcome::PoweredOff(code) => code,
        other => return Err(DeterminismError::NotPoweredOff(other)),
    };
    vm.set_inputs(Inputs::default());
    let log = std::mem::take(&mut *recorder.log.lock().unwrap_or_else(|e| e.into_inner()));
    let mut outputs = OutputTotals::default();
    let (mut reads, mut writes) = (0, 0);
    for e in &log {
        match e {
            Event::Output { exit, digest } => outputs.fold(*exit, digest),
            Event::Read { .. } => reads += 1,
            Event::Write { .. } => writes += 1,
        }
    }
    let first_console = take(&buf);
    let first = digests(&vm, code, outputs, &first_console, config.disk.as_deref())?;
    drop(vm);

    // The second run: the same inputs, replayed; outputs verified one by one.
    let (console, buf) = buffer_console();
    let second_config = VmConfig {
        console,
        tap: None,
        net_without_backend: config.tap.is_some() || config.net_without_backend,
        disk: copy.as_ref().map(|c| c.0.clone()),
        ..config.clone()
    };
    let mut vm = Vm::new(&second_config, elf).map_err(DeterminismError::SecondRun)?;
    let replay = MemReplay::new(log);
    let check = replay.output_check();
    vm.set_inputs(Inputs::Replay(Box::new(replay)));
    let run = vm.run();
    vm.set_inputs(Inputs::default());
    let outputs = check.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let second = match run {
        Ok(RunOutcome::PoweredOff(code)) => Ok(digests(
            &vm,
            code,
            outputs.totals,
            &take(&buf),
            copy.as_ref().map(|c| c.0.as_path()),
        )?),
        Ok(RunOutcome::ReplayExhausted { exit, .. }) => Err(format!(
            "stopped at exit {exit}: the first run's log has no more inputs (the second run \
             took an input the first did not)"
        )),
        Ok(other) => Err(format!("stopped without powering off ({other:?})")),
        Err(e) => Err(format!(
            "stopped at exit {}: {}",
            vm.stats().total(),
            crate::error_chain(&e)
        )),
    };
    let comparisons = second
        .as_ref()
        .map(|s| compare(&first, s))
        .unwrap_or_default();
    Ok(DeterminismReport {
        first,
        second,
        comparisons,
        outputs,
        inputs: (reads, writes),
        console: first_console,
    })
}

fn compare(a: &RunDigests, b: &RunDigests) -> Vec<Comparison> {
    fn row(what: &'static str, first: String, second: String) -> Comparison {
        let equal = first == second;
        Comparison {
            what,
            first,
            second,
            equal,
        }
    }
    let hex = |v: u64| format!("{v:#018x}");
    let outputs = |o: &OutputTotals| {
        format!(
            "{} digests of {} outputs, {} bytes: {:#018x}",
            o.digests, o.outputs, o.bytes, o.hash
        )
    };
    let console = |(h, n): (u64, u64)| format!("{n} bytes: {h:#018x}");
    let disk = |d: Option<u64>| d.map_or_else(|| "none".to_string(), hex);
    vec![
        row("exit code", a.code.to_string(), b.code.to_string()),
        row("exits", a.exits.to_string(), b.exits.to_string()),
        row("registers", hex(a.regs), hex(b.regs)),
        row("memory", hex(a.mem), hex(b.mem)),
        row("outputs", outputs(&a.outputs), outputs(&b.outputs)),
        row("console", console(a.console), console(b.console)),
        row("disk", disk(a.disk), disk(b.disk)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(cmdline: &str) -> VmConfig {
        VmConfig {
            mem_size: 16 << 20,
            cmdline: cmdline.into(),
            ..Default::default()
        }
    }

    /// `cpu` (reading the clock: an input that is logged) is deterministic; `nondet` (RDRAND,
    /// where the host cannot trap it) is not, and the report says where its outputs first
    /// differ.
    #[test]
    fn cpu_is_deterministic_and_rdrand_is_not() {
        ftvm_testkit::require_kvm!("cpu_is_deterministic_and_rdrand_is_not");
        let cpu = crate::guests::by_name("cpu").expect("cpu guest");
        let r = check(&config("size=256k rounds=4 timing"), cpu).expect("check cpu");
        assert!(r.is_deterministic(), "{r:#?}");
        assert!(
            r.inputs.0 >= 2,
            "cpu timing reads the clock: {:?}",
            r.inputs
        );
        assert_eq!(r.outputs.verified, 3, "{:?}", r.outputs);
        assert!(String::from_utf8_lossy(&r.console).contains("cpu: checksum="));

        let nondet = crate::guests::by_name("nondet").expect("nondet guest");
        let r = match check(&config("insn=rdrand count=3 period_ms=1"), nondet) {
            Err(DeterminismError::FirstRun(e)) => {
                let e = crate::error_chain(&e);
                ftvm_testkit::skip::skip(
                    "cpu_is_deterministic_and_rdrand_is_not",
                    format_args!("(rdrand) the host traps RDRAND: {e}"),
                );
                return;
            }
            r => r.expect("check nondet"),
        };
        assert!(!r.is_deterministic(), "{r:#?}");
        assert_eq!(r.outputs.mismatches, 3, "{:?}", r.outputs);
        let (exit, what) = &r.outputs.first[0];
        assert_eq!(*exit, 1, "{what}");
        assert!(what.starts_with("output of the console differs"), "{what}");
        let differ: Vec<&str> = r
            .comparisons
            .iter()
            .filter(|c| !c.equal)
            .map(|c| c.what)
            .collect();
        assert!(
            differ.contains(&"outputs") && differ.contains(&"console"),
            "{differ:?}"
        );
        assert!(!differ.contains(&"exits"), "{differ:?}");
    }
}
