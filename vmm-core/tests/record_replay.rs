//! A recorded `kv` run (network input through a TAP, clock reads, disk I/O) replayed on a
//! second VM that has no network backend: the replay ends in the same state.

use ftvm_testkit::kv as common;

use ftvm_vmm_core::record::memlog::{Event, MemRecorder, MemReplay};
use ftvm_vmm_core::record::Inputs;
use ftvm_vmm_core::vm::{buffer_console, RunOutcome, Vm, VmConfig};

#[test]
fn kv_session_replays_to_the_same_state() {
    if ftvm_testkit::skip::if_missing(
        "kv_session_replays_to_the_same_state",
        common::net_missing(),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk_a = dir.path().join("primary.img");
    let disk_b = dir.path().join("backup.img");
    for d in [&disk_a, &disk_b] {
        std::fs::File::create(d).unwrap().set_len(8 << 20).unwrap();
    }
    let ns = common::namespace("rr");
    let elf = ftvm_vmm_core::guests::by_name("kv").unwrap();
    let cmdline = format!("ip={}/24 gw=10.0.2.1 port=6379", common::GUEST_IP);

    // Primary: live, recorded.
    let rec = MemRecorder::default();
    let (console, primary_out) = buffer_console();
    let cfg = VmConfig {
        mem_size: 64 << 20,
        cmdline: cmdline.clone(),
        disk: Some(disk_a.clone()),
        tap: Some(common::TAP.into()),
        console,
        ..Default::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let rec2 = rec.clone();
    let primary = ns
        .spawn("primary", move || {
            let mut vm = Vm::new(&cfg, elf).expect("primary vm");
            vm.set_inputs(Inputs::Live(Box::new(rec2)));
            tx.send(vm.control()).expect("control");
            let r = vm.run().map_err(|e| format!("{e:?}"));
            (r, vm.memory_digest(), vm.stats().total())
        })
        .unwrap();
    let control = rx.recv().unwrap();
    let session = std::panic::catch_unwind(|| {
        common::wait_ready_with(&ns, &primary_out);
        assert_eq!(common::redis_reply(&ns, &["SET", "k", "v1"]), "OK");
        assert_eq!(common::redis_reply(&ns, &["INCR", "n"]), "1");
        assert_eq!(common::redis_reply(&ns, &["GET", "k"]), "v1");
        common::redis_shutdown(&ns);
    });
    if session.is_err() {
        control.kick();
    }
    let (p_result, p_digest, p_exits) = primary.join().unwrap().unwrap();
    session.unwrap();
    assert_eq!(p_result, Ok(RunOutcome::PoweredOff(0)));
    let log = rec.log.lock().unwrap().clone();
    let writes = log
        .iter()
        .filter(|e| matches!(e, Event::Write { .. }))
        .count();
    assert!(
        writes > 10,
        "expected RX/disk/used-ring writes in the log, got {writes}"
    );

    // Backup: no TAP (a net device without backend), a replica disk, inputs from the log.
    let (console, backup_out) = buffer_console();
    let cfg = VmConfig {
        mem_size: 64 << 20,
        cmdline,
        disk: Some(disk_b.clone()),
        tap: None,
        net_without_backend: true,
        console,
    };
    let mut backup = Vm::new(&cfg, elf).unwrap();
    backup.set_inputs(Inputs::Replay(Box::new(MemReplay::new(log))));
    let b_result = backup.run().map_err(|e| format!("{e:?}"));
    assert_eq!(b_result, Ok(RunOutcome::PoweredOff(0)));
    assert_eq!(backup.stats().total(), p_exits, "same number of exits");
    assert_eq!(
        String::from_utf8_lossy(&backup_out.lock().unwrap()),
        String::from_utf8_lossy(&primary_out.lock().unwrap()),
    );
    assert_eq!(
        backup.memory_digest(),
        p_digest,
        "guest memory differs after replay"
    );
    assert_eq!(
        std::fs::read(&disk_a).unwrap(),
        std::fs::read(&disk_b).unwrap(),
        "disks differ"
    );
}
