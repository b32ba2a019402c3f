//! Loom model tests of the index protocol: every interleaving (up to `LOOM_MAX_PREEMPTIONS`) of a
//! producer and a consumer thread, with loom's weak-memory model for `head`/`tail`/`next_seq`
//! and loom's data-race tracking of the data area (the ring marks every claimed byte as written
//! by the producer and every byte handed out in a batch as read by the consumer), so an
//! ordering that lets the consumer see a record before its bytes, or the producer overwrite a
//! record still being read, fails here.
//!
//! Run: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p ftvm-ringbuf --release
//! --target-dir target/loom --test loom -- --test-threads=2`
#![cfg(loom)]
#![allow(clippy::drop_non_drop)] // `drop(batch)` marks where a borrow ends

use ftvm_ringbuf::{with_capacity, ClaimError, Consumer, Producer, FIRST_SEQ};
use loom::thread;

/// Payload of record number `i` (0-based): `len` bytes derived from `i`.
fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| (i as u8).wrapping_mul(17).wrapping_add(k as u8))
        .collect()
}

/// Pushes `lens.len()` records, retrying (with a loom yield) while the buffer is full.
fn produce(mut tx: Producer, lens: &[usize], deferred: bool) {
    for (i, &len) in lens.iter().enumerate() {
        loop {
            match tx.claim(1, len) {
                Ok(mut c) => {
                    c.copy_from_slice(&payload(i as u64, len));
                    let seq = if deferred {
                        c.commit_deferred()
                    } else {
                        c.commit()
                    };
                    assert_eq!(seq, FIRST_SEQ + i as u64);
                    break;
                }
                Err(ClaimError::Full { .. }) => thread::yield_now(),
                Err(e) => panic!("claim: {e}"),
            }
        }
    }
    tx.publish();
}

/// Reads until `lens.len()` records arrived, checking order, seq and content. With
/// `one_by_one`, releases each record separately instead of whole batches.
fn consume(mut rx: Consumer, lens: &[usize], one_by_one: bool) {
    let mut next = 0u64;
    while (next as usize) < lens.len() {
        let batch = rx.read();
        if batch.is_empty() {
            drop(batch);
            thread::yield_now();
            continue;
        }
        let mut ends = Vec::new();
        for r in batch.records() {
            let r = r.expect("well-formed record");
            assert_eq!(r.seq(), FIRST_SEQ + next);
            assert_eq!(r.kind(), 1);
            assert_eq!(r.payload(), &payload(next, lens[next as usize])[..]);
            ends.push(r.next_position());
            next += 1;
        }
        let end = batch.end_position();
        drop(batch);
        if one_by_one {
            for e in ends {
                rx.release_to(e);
            }
        }
        rx.release_to(end);
    }
    assert!(rx.read().is_empty(), "no record beyond those produced");
}

fn model(capacity: usize, lens: &'static [usize], deferred: bool, one_by_one: bool) {
    loom::model(move || {
        let (tx, rx) = with_capacity(capacity).expect("ring");
        let p = thread::spawn(move || produce(tx, lens, deferred));
        consume(rx, lens, one_by_one);
        p.join().expect("producer");
    });
}

/// Two records that fit: plain publication and batch read.
#[test]
fn two_records_arrive_in_order() {
    model(64, &[8, 0], false, false);
}

/// Spans 24, 24, then 24 at offset 48: a 16-byte padding record and a wrap to offset 0, which
/// also needs the consumer to have released the first record (buffer full until then).
#[test]
fn wrap_around_with_padding() {
    model(64, &[16, 16, 16], false, false);
}

/// Spans 32 + 32 fill a 64-byte buffer; the third record waits for a release of one record.
#[test]
fn full_buffer_waits_for_release() {
    model(64, &[24, 24, 24], false, true);
}

/// Deferred commits become visible together at publish (or when a claim finds the buffer
/// full), never half-written.
#[test]
fn deferred_publication() {
    model(64, &[16, 16, 16], true, false);
}

/// Records appended to reservations of two, committed together: spans 16 + 16, then a
/// reservation of 32 at offset 32, then one that wraps (padding) once the first is released.
#[test]
fn reservations_commit_their_records_together() {
    const LENS: &[usize] = &[8, 8, 8, 8, 8];
    loom::model(|| {
        let (mut tx, rx) = with_capacity(64).expect("ring");
        let p = thread::spawn(move || {
            let mut i = 0;
            while i < LENS.len() {
                let n = 2.min(LENS.len() - i);
                let bytes = LENS[i..i + n].iter().map(|&l| l + 8).sum();
                match tx.reserve(bytes) {
                    Ok(mut r) => {
                        for k in i..i + n {
                            let seq = r.push(1, &payload(k as u64, LENS[k])).expect("fits");
                            assert_eq!(seq, FIRST_SEQ + k as u64);
                        }
                        r.commit();
                        i += n;
                    }
                    Err(ClaimError::Full { .. }) => thread::yield_now(),
                    Err(e) => panic!("reserve: {e}"),
                }
            }
        });
        consume(rx, LENS, false);
        p.join().expect("producer");
    });
}

/// A larger buffer, mixed sizes, records released one by one.
#[test]
fn mixed_sizes_in_a_128_byte_buffer() {
    model(128, &[40, 0, 24, 48], false, true);
}

// --- Doorbell: no lost wake-up -----------------------------------------------------------------
//
// Under loom the sleeper parks without a timeout, so a ring that fails to wake it (the
// ringer missing `sleeping`, and the sleeper missing the data) is a deadlock loom reports.

mod doorbell {
    use ftvm_ringbuf::Doorbell;
    use loom::sync::atomic::{AtomicU64, Ordering};
    use loom::sync::Arc;
    use loom::thread;
    use std::time::Duration;

    /// A sleeper thread waits (sleeping on the bell while the value is short) until `value`
    /// reaches `ringers * rings_each`; each ringer (the model's main thread, and more spawned
    /// ones) adds one and rings, `rings_each` times. The main thread only rings and joins,
    /// so nobody unparks a thread blocked in `join` (loom cannot model that: tokio-rs/loom#249).
    fn model(ringers: usize, rings_each: u64) {
        loom::model(move || {
            let bell = Arc::new(Doorbell::new());
            let value = Arc::new(AtomicU64::new(0));
            let target = ringers as u64 * rings_each;
            let sleeper = {
                let (bell, value) = (Arc::clone(&bell), Arc::clone(&value));
                thread::spawn(move || {
                    let mut sleeps = 0;
                    while value.load(Ordering::Acquire) < target {
                        if bell.sleep(Duration::from_millis(1), || {
                            value.load(Ordering::Acquire) >= target
                        }) {
                            sleeps += 1;
                        }
                    }
                    sleeps
                })
            };
            let ring = {
                let (bell, value) = (Arc::clone(&bell), Arc::clone(&value));
                move || {
                    for _ in 0..rings_each {
                        value.fetch_add(1, Ordering::Release);
                        bell.ring();
                    }
                }
            };
            let others: Vec<_> = (1..ringers).map(|_| thread::spawn(ring.clone())).collect();
            ring();
            for h in others {
                h.join().expect("ringer");
            }
            let sleeps = sleeper.join().expect("sleeper");
            // Every sleep but a last one ends in a ring (loom parks without a timeout).
            assert!(sleeps <= target, "{sleeps} sleeps for {target} rings");
        });
    }

    #[test]
    fn one_ring_wakes_the_sleeper() {
        model(1, 1);
    }

    #[test]
    fn the_bell_rearms_after_a_wake_up() {
        model(1, 2);
    }

    #[test]
    fn two_ringers() {
        model(2, 1);
    }
}
