//! The vCPU thread state machine: pause, save while paused, resume, stop.

use ftvm_vmm_core::vm::{buffer_console, RunOutcome, Vm, VmConfig, VmState, VmThread};
use ftvm_vmm_core::{guests, require_kvm};

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

#[test]
fn pause_save_resume_then_power_off() {
    require_kvm!("pause_save_resume_then_power_off");
    let (reference, ref_out) = cpu_vm(64);
    let (_, outcome) = VmThread::spawn(reference).unwrap().join().unwrap();
    assert_eq!(outcome, RunOutcome::PoweredOff(0));

    let (vm, out) = cpu_vm(64);
    let t = VmThread::spawn(vm).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let state = t.pause();
    let dir = tempfile::tempdir().unwrap();
    if state == VmState::Paused {
        assert_eq!(t.state(), VmState::Paused);
        t.save(&dir.path().join("snap")).unwrap();
        assert!(std::fs::metadata(dir.path().join("snap")).unwrap().len() > 32 << 20);
        t.resume();
        assert_ne!(t.state(), VmState::Paused);
    } else {
        assert_eq!(state, VmState::Stopped, "finished before the pause");
        assert!(
            t.save(&dir.path().join("snap")).is_err(),
            "a stopped VM cannot be saved"
        );
    }
    let (vm, outcome) = t.join().unwrap();
    assert_eq!(outcome, RunOutcome::PoweredOff(0));
    assert_eq!(&*out.lock().unwrap(), &*ref_out.lock().unwrap());
    assert!(vm.stats().total() >= 5);
}

#[test]
fn stop_ends_a_running_vm() {
    require_kvm!("stop_ends_a_running_vm");
    let (vm, _) = cpu_vm(100_000);
    let t = VmThread::spawn(vm).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let start = std::time::Instant::now();
    let (_, outcome) = t.stop().unwrap();
    assert_eq!(outcome, RunOutcome::Paused);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "stop took {:?}",
        start.elapsed()
    );
}
