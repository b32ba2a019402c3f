//! Two threads move tens of millions of records of mixed sizes (0..=300 bytes) through a small
//! buffer, so the tail wraps hundreds of thousands of times; the consumer checks order, sequence
//! number, kind, length and every payload byte (all derived from the sequence number).
//! `FTVM_STRESS_RECORDS` overrides the count (default 20 million).

#![allow(clippy::drop_non_drop)] // `drop(batch)` marks where a borrow ends

use std::time::Instant;

use ftvm_ringbuf::{with_capacity, IdleStrategy, SpinThenYield, FIRST_SEQ};

/// Length of record `seq`: a scrambled value in 0..=300.
fn len_of(seq: u64) -> usize {
    (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 55) as usize % 301
}

fn kind_of(seq: u64) -> u16 {
    (seq % 13) as u16
}

fn fill(seq: u64, dst: &mut [u8]) {
    let base = seq.wrapping_mul(31) as u8;
    for (i, b) in dst.iter_mut().enumerate() {
        *b = base.wrapping_add(i as u8);
    }
}

fn check(seq: u64, got: &[u8]) -> bool {
    let base = seq.wrapping_mul(31) as u8;
    got.iter()
        .enumerate()
        .all(|(i, b)| *b == base.wrapping_add(i as u8))
}

#[test]
fn twenty_million_mixed_records_arrive_intact() {
    let n: u64 = std::env::var("FTVM_STRESS_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000_000);
    let (mut tx, mut rx) = with_capacity(64 * 1024).unwrap();
    let started = Instant::now();
    let producer = std::thread::spawn(move || {
        let mut idle = SpinThenYield::new(1000);
        for i in 0..n {
            let seq = FIRST_SEQ + i;
            let len = len_of(seq);
            // Mix the three ways of finishing a record; every 16th claims 17 bytes more than
            // it needs and shrinks at commit.
            let shrink = i % 16 == 15;
            let claim_len = if shrink { len + 17 } else { len };
            let mut c = tx
                .claim_blocking(kind_of(seq), claim_len, &mut idle)
                .unwrap();
            fill(seq, &mut c[..len]);
            let got = match i % 16 {
                0..=11 => c.commit(),
                12..=14 => c.commit_deferred(),
                _ => c.commit_len(len),
            };
            assert_eq!(got, seq);
            idle.reset();
        }
        tx.publish();
        tx.position()
    });

    let mut idle = SpinThenYield::new(1000);
    let mut expected = FIRST_SEQ;
    let end = FIRST_SEQ + n;
    let mut batches = 0u64;
    while expected < end {
        let batch = rx.read();
        if batch.is_empty() {
            idle.idle(0);
            continue;
        }
        batches += 1;
        let mut partial = None;
        for (k, r) in batch.records().enumerate() {
            let r = r.unwrap();
            assert_eq!(r.seq(), expected, "order");
            assert_eq!(r.kind(), kind_of(expected), "kind of {expected}");
            assert_eq!(r.payload().len(), len_of(expected), "length of {expected}");
            assert!(check(expected, r.payload()), "content of {expected}");
            expected += 1;
            // Now and then, release only part of a batch.
            if k == 2 && batches % 7 == 0 {
                partial = Some(r.next_position());
                break;
            }
        }
        match partial {
            Some(p) => {
                drop(batch);
                rx.release_to(p);
            }
            None => batch.release(),
        }
        idle.idle(1);
    }
    let tail = producer.join().unwrap();
    assert_eq!(rx.position(), tail);
    assert!(rx.read().is_empty());
    eprintln!(
        "stress: {n} records in {batches} batches, {:.2?} ({:.1} M records/s)",
        started.elapsed(),
        n as f64 / started.elapsed().as_secs_f64() / 1e6
    );
}
