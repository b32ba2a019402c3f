//! The io_uring transport's non-default configurations still move records exactly once and in
//! order: one-shot receives instead of multishot, no COOP_TASKRUN, SQPOLL (or its logged
//! fallback where the kernel refuses it), every send on an io-wq worker (pinned to one core),
//! and every send inline.

mod common;

use std::time::Duration;

use common::{payload, stream_records, Stream};
use ftvm_channel::uring::{UringConfig, UringTransport};
use ftvm_ringbuf::IdleKind;

const RECORDS: u64 = 20_000;

fn run(cfg: UringConfig) {
    // Parked when idle: with SQPOLL a kernel thread already takes a core.
    let stream = Stream {
        records: RECORDS,
        ring: 1 << 22,
        idle: IdleKind::Park,
        within: Duration::from_secs(60),
        payload,
    };
    stream_records(
        &stream,
        |a| Box::new(UringTransport::from_stream(a, cfg).expect("uring primary")),
        move |b| Box::new(UringTransport::from_stream(b, cfg).expect("uring backup")),
    );
}

#[test]
fn uring_one_shot_receive() {
    run(UringConfig {
        multishot: false,
        ..UringConfig::default()
    });
}

#[test]
fn uring_without_coop_taskrun() {
    run(UringConfig {
        coop_taskrun: false,
        ..UringConfig::default()
    });
}

#[test]
fn uring_sqpoll_or_fallback() {
    run(UringConfig {
        sqpoll: Some(10),
        ..UringConfig::default()
    });
}

#[test]
fn uring_every_send_on_a_worker() {
    run(UringConfig {
        async_send_min: Some(0),
        worker_cpu: Some(0),
        ..UringConfig::default()
    });
}

#[test]
fn uring_every_send_inline() {
    run(UringConfig {
        async_send_min: None,
        ..UringConfig::default()
    });
}
