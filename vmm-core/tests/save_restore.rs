//! Save → restore → the restored VM continues and ends exactly like an uninterrupted run.

use std::time::Duration;

use ftvm_vmm_core::vm::{buffer_console, RunOutcome, Vm, VmConfig};
use ftvm_vmm_core::{guests, require_kvm};

const CMDLINE: &str = "size=4M rounds=480 seed=7";

fn config() -> (VmConfig, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let (console, out) = buffer_console();
    (
        VmConfig {
            mem_size: 32 << 20,
            cmdline: CMDLINE.into(),
            console,
            ..Default::default()
        },
        out,
    )
}

fn uninterrupted() -> (RunOutcome, Vec<u8>, u64) {
    let (cfg, out) = config();
    let mut vm = Vm::new(&cfg, guests::by_name("cpu").unwrap()).unwrap();
    let r = vm.run().unwrap();
    let text = out.lock().unwrap().clone();
    (r, text, vm.memory_digest())
}

fn restore_and_finish(path: &std::path::Path, mut before: Vec<u8>) -> (RunOutcome, Vec<u8>, u64) {
    let (cfg, out) = config();
    let mut vm = Vm::restore(&cfg, path).unwrap();
    let r = vm.run().unwrap();
    before.extend_from_slice(&out.lock().unwrap());
    (r, before, vm.memory_digest())
}

#[test]
fn restore_at_an_exit_continues_identically() {
    require_kvm!("restore_at_an_exit_continues_identically");
    let reference = uninterrupted();
    assert_eq!(reference.0, RunOutcome::PoweredOff(0));
    let text = String::from_utf8_lossy(&reference.1).into_owned();
    assert!(text.contains("cpu: checksum="), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let (cfg, out) = config();
    let mut vm = Vm::new(&cfg, guests::by_name("cpu").unwrap()).unwrap();
    // The first console line is printed with two exits; stop right after it.
    assert_eq!(vm.run_until(Some(2)).unwrap(), RunOutcome::ExitLimit);
    vm.save(&path).unwrap();
    let before = out.lock().unwrap().clone();
    assert!(String::from_utf8_lossy(&before).starts_with("cpu: size="));
    drop(vm);
    let restored = restore_and_finish(&path, before);
    assert_eq!(restored, reference);
}

#[test]
fn pause_mid_computation_save_restore() {
    require_kvm!("pause_mid_computation_save_restore");
    let reference = uninterrupted();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let (cfg, out) = config();
    let mut vm = Vm::new(&cfg, guests::by_name("cpu").unwrap()).unwrap();
    let control = vm.control();
    let kicker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        control.kick();
    });
    let r = vm.run().unwrap();
    kicker.join().unwrap();
    if r != RunOutcome::Paused {
        // The guest finished before the kick: nothing to test on this (fast) machine.
        eprintln!("SKIP pause_mid_computation_save_restore: guest finished in under 30 ms");
        return;
    }
    vm.save(&path).unwrap();
    // The paused VM itself can also go on.
    let r2 = vm.run().unwrap();
    assert_eq!(r2, reference.0);
    assert_eq!(&*out.lock().unwrap(), &reference.1);
    assert_eq!(vm.memory_digest(), reference.2);
    // And so can its restored copy.
    let before = {
        let all = out.lock().unwrap().clone();
        let s = String::from_utf8_lossy(&all).into_owned();
        s.lines()
            .next()
            .map(|l| format!("{l}\n"))
            .unwrap_or_default()
            .into_bytes()
    };
    let restored = restore_and_finish(&path, before);
    assert_eq!(restored, reference);
}

#[test]
fn corrupt_snapshot_is_rejected() {
    require_kvm!("corrupt_snapshot_is_rejected");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.snap");
    // Format version 2 (the typed sections), then 6 bytes: less than one section header.
    std::fs::write(&path, b"FTVMSNAP\x02\0\0\0\x01\0\0\0\xff\xff").unwrap();
    let (cfg, _) = config();
    let e = Vm::restore(&cfg, &path).unwrap_err();
    assert!(format!("{e:?}").contains("Truncated"), "{e:?}");
    let e = Vm::restore(&cfg, &dir.path().join("missing.snap")).unwrap_err();
    assert!(format!("{e:?}").contains("NotFound"), "{e:?}");
}
