//! Two processes move one million records exactly once and in order, content verified, over
//! every transport — on a clean link and with 1% loss, duplication, reordering and truncation
//! injected under the reliability layer.

mod common;

use std::time::Duration;

use common::*;
use ftvm_channel::LogReceiver;

const RECORDS: u64 = 1_000_000;

fn transfer(test: &str, transport: &str, fault_p: f64) {
    if let Some(spec) = ChildSpec::from_env() {
        if let Err(e) = run_primary(&spec) {
            eprintln!("primary failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    let rv = Rendezvous::new(transport, test);
    let spec = ChildSpec {
        role: "primary".into(),
        transport: transport.into(),
        addr: rv.addr(),
        records: RECORDS,
        fault_p,
        generation: 3,
        digest: 0xAB,
    };
    let mut child = if transport == "shm" {
        // The rings must exist before the child opens them: create first, then spawn.
        let t = rv.accept(transport, fault_p, 2);
        let child = spawn_child(test, &spec);
        (child, t)
    } else {
        let child = spawn_child(test, &spec);
        let t = rv.accept(transport, fault_p, 2);
        (child, t)
    };
    let (p, c) = backup_buffer();
    let rx = LogReceiver::start(p, c, child.1, config(&spec), poller()).expect("handshake");
    let rx = match run_backup(rx, RECORDS, Duration::from_secs(120)) {
        Ok(rx) => rx,
        Err(e) => {
            let _ = child.0.kill();
            panic!("{transport}: {e}");
        }
    };
    let status = child.0.wait().expect("wait child");
    assert!(status.success(), "primary process failed: {status}");
    let snap = rx.snapshot();
    eprintln!("{transport} faults={fault_p}: {snap:?}");
    assert_eq!(snap.records_delivered, RECORDS);
    if fault_p > 0.0 {
        assert!(
            snap.drops() > 0,
            "faults were injected but nothing was dropped: {snap:?}"
        );
    }
}

#[test]
fn shm_clean() {
    transfer("shm_clean", "shm", 0.0);
}
#[test]
fn shm_faulty() {
    transfer("shm_faulty", "shm", 0.01);
}
#[test]
fn tcp_clean() {
    transfer("tcp_clean", "tcp", 0.0);
}
#[test]
fn tcp_faulty() {
    transfer("tcp_faulty", "tcp", 0.01);
}
#[test]
fn tcp_spin_clean() {
    transfer("tcp_spin_clean", "tcp-spin", 0.0);
}
#[test]
fn tcp_spin_faulty() {
    transfer("tcp_spin_faulty", "tcp-spin", 0.01);
}
#[test]
fn uring_clean() {
    transfer("uring_clean", "uring", 0.0);
}
#[test]
fn uring_faulty() {
    transfer("uring_faulty", "uring", 0.01);
}
