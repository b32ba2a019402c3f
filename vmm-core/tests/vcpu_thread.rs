//! The vCPU thread state machine: pause, save while paused, resume, stop.

use ftvm_testkit::require_kvm;
use ftvm_vmm_core::guests;
use ftvm_vmm_core::vm::{buffer_console, RunOutcome, Vm, VmConfig, VmError, VmState, VmThread};

fn cpu_vm(rounds: u32) -> (Vm, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let (console, out) = buffer_console();
    let cfg = VmConfig {
        mem_size: 32 << 20,
        cmdline: format!("size=4M rounds={rounds} seed=3"),
        console,
        ..Default::default()
    };
    (Vm::new(&cfg, guests::by_name("cpu").unwrap()).unwrap(), out)
}

/// Waits (at most 30 s) until `done`; panics with `what` otherwise.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let t = std::time::Instant::now();
    while !done() {
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "{what}");
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

#[test]
fn pause_save_resume_then_power_off() {
    require_kvm!("pause_save_resume_then_power_off");
    let (reference, ref_out) = cpu_vm(480);
    let (_, outcome) = VmThread::spawn(reference).unwrap().join().unwrap();
    assert_eq!(outcome, RunOutcome::PoweredOff(0));

    let (vm, out) = cpu_vm(480);
    let t = VmThread::spawn(vm).unwrap();
    // Paused once the guest is provably mid-run (its first line is out).
    wait_until("no output", || out.lock().unwrap().contains(&b'\n'));
    assert_eq!(t.pause(), VmState::Paused, "finished before the pause");
    assert_eq!(t.state(), VmState::Paused);
    let dir = tempfile::tempdir().unwrap();
    t.save(&dir.path().join("snap")).unwrap();
    assert!(std::fs::metadata(dir.path().join("snap")).unwrap().len() > 32 << 20);
    t.resume();
    assert_ne!(t.state(), VmState::Paused);
    let (vm, outcome) = t.join().unwrap();
    assert_eq!(outcome, RunOutcome::PoweredOff(0));
    assert_eq!(&*out.lock().unwrap(), &*ref_out.lock().unwrap());
    assert!(vm.stats().total() >= 5);
}

#[test]
fn a_stopped_vm_cannot_be_saved() {
    require_kvm!("a_stopped_vm_cannot_be_saved");
    let (vm, _) = cpu_vm(1);
    let t = VmThread::spawn(vm).unwrap();
    wait_until("never stopped", || t.state() == VmState::Stopped);
    let dir = tempfile::tempdir().unwrap();
    let e = t.save(&dir.path().join("snap")).unwrap_err();
    assert!(
        matches!(
            e,
            VmError::NotPaused {
                state: VmState::Stopped
            }
        ),
        "{e:?}"
    );
    assert!(!dir.path().join("snap").exists());
    assert_eq!(t.join().unwrap().1, RunOutcome::PoweredOff(0));
}

#[test]
fn stop_ends_a_running_vm() {
    require_kvm!("stop_ends_a_running_vm");
    let (vm, _) = cpu_vm(100_000);
    let t = VmThread::spawn(vm).unwrap();
    wait_until("never ran", || t.exits() > 0);
    let start = std::time::Instant::now();
    let (_, outcome) = t.stop().unwrap();
    assert_eq!(outcome, RunOutcome::Paused);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "stop took {:?}",
        start.elapsed()
    );
}
