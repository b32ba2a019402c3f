//! The log buffer across two processes sharing a memfd.
//!
//! The parent creates the buffer in a memfd and takes the consumer role; a child process (this
//! test binary re-executed with `FTVM_RINGBUF_CHILD=<role>`, running only the `#[ignore]`d
//! entry point `child_process_entry` with `--ignored --exact`) maps the same memory through
//! `/proc/<parent>/fd/<n>` and produces.

#![allow(clippy::drop_non_drop)] // `drop(batch)` marks where a borrow ends

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_ringbuf::layout::region_len;
use ftvm_ringbuf::{Consumer, Producer, Ring, RingError, SharedRegion, SpinThenYield, FIRST_SEQ};
use std::os::fd::AsRawFd;

const CHILD_ENV: &str = "FTVM_RINGBUF_CHILD";
const REGION_ENV: &str = "FTVM_RINGBUF_REGION";
const COUNT_ENV: &str = "FTVM_RINGBUF_COUNT";
/// The payload byte of the record a crashing producer never commits.
const POISON: u8 = 0xEE;

fn len_of(seq: u64) -> usize {
    (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize * 3 // 0..=189
}

fn fill(seq: u64, dst: &mut [u8]) {
    for (i, b) in dst.iter_mut().enumerate() {
        *b = (seq as u8).wrapping_mul(13).wrapping_add(i as u8) & 0x7F; // never POISON
    }
}

fn check(seq: u64, got: &[u8]) -> bool {
    let mut want = vec![0; got.len()];
    fill(seq, &mut want);
    want == got
}

fn push(tx: &mut Producer, seq: u64, idle: &mut SpinThenYield) {
    let mut c = tx.claim_blocking(1, len_of(seq), idle).expect("claim");
    fill(seq, &mut c);
    assert_eq!(c.commit(), seq);
}

/// The child's side: not a test of its own (in the normal run it would pass without checking
/// anything), so ignored there; [`spawn_child`] runs it. Without `FTVM_RINGBUF_CHILD` it fails.
#[test]
#[ignore = "child process entry point, run by its parent test"]
fn child_process_entry() {
    let role = std::env::var(CHILD_ENV)
        .unwrap_or_else(|_| panic!("a child entry point: its parent test sets {CHILD_ENV}"));
    let region = SharedRegion::open(Path::new(&std::env::var(REGION_ENV).expect("region path")))
        .expect("map the parent's memfd");
    let ring = Ring::attach(region).expect("attach");
    let count: u64 = std::env::var(COUNT_ENV)
        .expect("count")
        .parse()
        .expect("count");
    let mut tx = Producer::new(ring).expect("producer role");
    let mut idle = SpinThenYield::new(1000);
    let first = tx.next_seq();
    for seq in first..first + count {
        push(&mut tx, seq, &mut idle);
    }
    match role.as_str() {
        "producer" => {}
        "crash" => {
            // A record committed but not published, then one claimed and filled: neither
            // may ever reach the consumer.
            let mut c = tx.claim_blocking(1, 64, &mut idle).expect("claim");
            c.fill(POISON);
            c.commit_deferred();
            let mut c = tx.claim_blocking(1, 100, &mut idle).expect("claim");
            c.fill(POISON);
            // Tell the parent, then wait to be killed (SIGKILL) with the claim open.
            let mut out = std::io::stdout();
            out.write_all(b"\nFTVM-CHILD-CLAIMED\n").expect("stdout");
            out.flush().expect("stdout");
            let mut byte = [0u8; 1];
            let _ = std::io::stdin().read(&mut byte);
            // The parent kills us before this point; if it did not, die the same way.
            // SAFETY: kill(2) on our own pid with SIGKILL has no memory-safety preconditions.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            unreachable!("SIGKILL");
        }
        other => panic!("unknown child role {other}"),
    }
}

/// A ring in a fresh memfd and the `/proc` path a child opens it by.
fn shared_ring(capacity: usize) -> (Arc<Ring>, PathBuf) {
    let region = SharedRegion::memfd("ftvm-two-process", region_len(capacity)).expect("memfd");
    let path = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        region.fd().as_raw_fd()
    ));
    (Ring::init(region, capacity).expect("init"), path)
}

/// A child process that is killed and reaped if the test fails before it is waited for.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl std::ops::Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

fn spawn_child(role: &str, region: &Path, count: u64) -> ChildGuard {
    let child = Command::new(std::env::current_exe().expect("current_exe"))
        .args([
            "--exact",
            "--ignored",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, role)
        .env(REGION_ENV, region)
        .env(COUNT_ENV, count.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    ChildGuard(child)
}

/// Reads records until `want` arrived (or the deadline), checking each; returns the next
/// expected sequence number.
fn consume(rx: &mut Consumer, mut expected: u64, want: u64, child: &mut Child) -> u64 {
    let end = expected + want;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut idle = 0u32;
    while expected < end {
        let batch = rx.read();
        if batch.is_empty() {
            drop(batch);
            idle += 1;
            if idle % 4096 == 0 {
                std::thread::yield_now();
                if let Ok(Some(status)) = child.try_wait() {
                    // Drain what it committed before exiting, then stop.
                    if rx.read().is_empty() {
                        panic!("child exited ({status}) after {expected} of {end} records");
                    }
                }
                assert!(Instant::now() < deadline, "timed out at record {expected}");
            }
            continue;
        }
        idle = 0;
        for r in batch.records() {
            let r = r.expect("well-formed record");
            assert_eq!(r.seq(), expected, "order");
            assert_eq!(r.payload().len(), len_of(expected), "length of {expected}");
            assert!(check(expected, r.payload()), "content of record {expected}");
            expected += 1;
        }
        batch.release();
    }
    expected
}

#[test]
fn a_child_process_produces_a_million_records_the_parent_checks_them_all() {
    const N: u64 = 1_000_000;
    let (ring, path) = shared_ring(1 << 16);
    let mut rx = Consumer::new(ring.clone()).expect("consumer role");
    let mut child = spawn_child("producer", &path, N);
    let next = consume(&mut rx, FIRST_SEQ, N, &mut child);
    assert_eq!(next, FIRST_SEQ + N);
    let status = child.wait().expect("wait");
    assert!(status.success(), "child: {status}");
    assert!(rx.read().is_empty(), "nothing beyond the records produced");
    // The child released the producer role when it exited normally.
    let tx = Producer::new(ring).expect("role free after the child exited");
    assert_eq!(tx.next_seq(), FIRST_SEQ + N);
}

#[test]
fn a_producer_killed_before_commit_publishes_nothing_and_a_new_producer_continues() {
    const N: u64 = 1000;
    let (ring, path) = shared_ring(1 << 16);
    let mut rx = Consumer::new(ring.clone()).expect("consumer role");
    let mut child = spawn_child("crash", &path, N);
    let pid = child.id();
    let next = consume(&mut rx, FIRST_SEQ, N, &mut child);
    assert_eq!(next, FIRST_SEQ + N);
    // Wait until the child has a record claimed and filled, and one committed unpublished
    // (its stdout also carries the test harness's lines).
    let stdout = child.stdout.take().expect("stdout");
    let claimed = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("FTVM-CHILD-CLAIMED"));
    assert!(claimed, "the child never reported its open claim");
    assert!(
        rx.read().is_empty(),
        "an uncommitted or unpublished record is visible"
    );
    // While the child lives, the producer role is its.
    match Producer::new(ring.clone()) {
        Err(RingError::RoleTaken {
            role: "producer",
            pid: holder,
        }) => {
            assert_eq!(holder, u64::from(pid));
        }
        other => panic!("expected RoleTaken by {pid}, got {other:?}"),
    }
    child.kill().expect("SIGKILL the child");
    // Before the child is reaped it is a zombie, which counts as dead: the role can be taken.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tx = loop {
        match Producer::new(ring.clone()) {
            Ok(tx) => break tx,
            Err(RingError::RoleTaken { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("taking over from the killed producer: {e}"),
        }
    };
    let status = child.wait().expect("wait");
    assert!(!status.success(), "child was killed");
    assert!(
        rx.read().is_empty(),
        "the dead producer's open claim stays invisible"
    );
    // The new producer continues the sequence where the last published record left it.
    assert_eq!(tx.next_seq(), FIRST_SEQ + N);
    let mut idle = SpinThenYield::new(100);
    for seq in FIRST_SEQ + N..FIRST_SEQ + N + 100 {
        push(&mut tx, seq, &mut idle);
    }
    let next = consume(&mut rx, FIRST_SEQ + N, 100, &mut child);
    assert_eq!(next, FIRST_SEQ + N + 100);
    let batch = rx.read();
    assert!(batch.is_empty());
    assert!(!batch.as_bytes().contains(&POISON));
}
