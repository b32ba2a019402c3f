//! `ringbuf`: the log buffer against `rtrb` and `crossbeam_queue::ArrayQueue`.
//!
//! For records of 64 B, 256 B and 1 KiB, with the producer and the consumer pinned to different
//! cores and every implementation moving the same payloads (a template with the record's number
//! in its first 8 bytes) and the consumer really reading them (an XOR fold of every 8-byte word
//! plus a sum of the numbers that must come out right):
//! - throughput in million records per second. Each implementation is driven through its own
//!   batch interface where it has one, with the same batch size `B` (`--batch`, default 128
//!   records) on the producer side and "everything available" on the consumer side:
//!   - ours: claim → fill in place → `commit_deferred`, and `publish` every `B` records (one
//!     Release store per batch); the consumer takes every committed record up to the end of the
//!     data area as one batch and releases it with one store (`ours_claim_mps`);
//!     `ours_reserve_mps`: `Producer::reserve` for `B` records, each appended with
//!     `Reservation::claim` and filled in place, committed once (one look at the consumer's
//!     position per batch, as rtrb's chunks); `ours_mps` is the better of the two.
//!     `ours_per_record_publish_mps` publishes at every commit (`Claim::commit`) instead.
//!   - rtrb chunks: `write_chunk_uninit(min(free slots, B))` filled with `fill_from_iter` and
//!     committed once (`rtrb_chunk_mps`), and the same with every free slot in one chunk
//!     (`rtrb_chunk_free_mps`); the consumer takes `read_chunk(all available)` and commits it
//!     once. `rtrb_push_pop_mps`: `push`/`pop` one record at a time.
//!   - `ArrayQueue` has no batch interface: `push`/`pop`.
//!
//!   `rtrb_mps` is the best of rtrb's three uses, so "ours vs rtrb" is against rtrb at its best.
//!   For reference, `rtrb_chunk_record_sized_mps` runs rtrb's chunk API (batches as ours) with
//!   items of `size + 8` bytes: as many bytes per record as ours moves with its header, which
//!   separates the cost of the header bytes from the cost of the buffer's mechanics. It runs
//!   right after rtrb's chunks of `size` bytes, and two paired ratios come of it:
//!   `rtrb_record_sized_vs_rtrb_paired` (what eight more bytes per item cost rtrb itself) and
//!   `ours_vs_rtrb_record_sized_paired` (ours against rtrb moving the same bytes per record).
//!   Both batch paths do the same work per batch: one read of the other side's index when the
//!   cached one runs out, one Release store to publish, one to free.
//! - ping-pong round-trip time (one record there, one back; hdrhistogram p50 / p99) for all
//!   three, spinning.
//!
//! `--icount ROUNDS` runs, instead, a single-threaded driver of the same producer and consumer
//! code (ours and rtrb's chunks) for counting instructions per record under callgrind (see
//! [`icount`]).
//!
//! Every measurement is repeated (`--reps`, default 3 quick / 7 full), the implementations
//! interleaved in alternating order within each repetition (ours next to rtrb's chunks); the
//! JSON holds the medians, and `ours_vs_rtrb_paired` the median of each repetition's own
//! ours / rtrb ratio (with its minimum), which the host's slow phases disturb less. Each
//! queue holds the same payload bytes: 4096 records of 64 B / 256 B, 1024 of 1 KiB (ours: a data
//! area of that many payload bytes, so it holds fewer records because of the 8-byte headers).

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use crossbeam_queue::ArrayQueue;
use hdrhistogram::Histogram;
use serde::Serialize;

use ftvm_ringbuf::layout::RECORD_HEADER_LEN;

use crate::report::{self, Panel, Series};
use crate::Opts;

/// One row of `results/ringbuf.json`.
#[derive(Debug, Clone, Serialize)]
struct Row {
    size: usize,
    records_per_run: u64,
    reps: usize,
    ours_mps: f64,
    ours_claim_mps: f64,
    ours_reserve_mps: f64,
    ours_per_record_publish_mps: f64,
    batch: u64,
    rtrb_mps: f64,
    rtrb_push_pop_mps: f64,
    rtrb_chunk_mps: f64,
    rtrb_chunk_free_mps: f64,
    /// rtrb's chunk API (batches as ours) with items of `size + 8` bytes — as many bytes per
    /// record as ours moves (payload and header) — for reference; not part of `rtrb_mps`.
    rtrb_chunk_record_sized_mps: f64,
    /// Median over the repetitions of (rtrb with items of `size + 8` bytes / rtrb with items of
    /// `size` bytes), both through chunks of `batch`, run back to back: what eight more bytes
    /// per record cost rtrb itself, the bytes our header adds to every record.
    rtrb_record_sized_vs_rtrb_paired: f64,
    /// Median over the repetitions of (ours / rtrb with items of `size + 8` bytes): the two
    /// buffers moving the same bytes per record.
    ours_vs_rtrb_record_sized_paired: f64,
    crossbeam_mps: f64,
    ours_vs_rtrb: f64,
    /// Median over the repetitions of (ours / rtrb's best) within each repetition: robust to the
    /// host's slow phases, which move both figures of one repetition alike.
    ours_vs_rtrb_paired: f64,
    /// The lowest of those per-repetition ratios.
    ours_vs_rtrb_paired_min: f64,
    ours_vs_crossbeam: f64,
    ours_rtt_p50_ns: f64,
    ours_rtt_p99_ns: f64,
    rtrb_rtt_p50_ns: f64,
    rtrb_rtt_p99_ns: f64,
    crossbeam_rtt_p50_ns: f64,
    crossbeam_rtt_p99_ns: f64,
}

/// The record payload sizes measured.
const SIZES: &[usize] = &[64, 256, 1024];

/// Parameters of one run.
#[derive(Debug, Clone, Copy)]
struct Params {
    records: u64,
    rtt_samples: u64,
    reps: usize,
    batch: u64,
    /// Record sizes to measure (a subset of 64, 256, 1024).
    sizes: &'static [usize],
    /// `--icount R`: instead of measuring, run the single-threaded instruction-count driver
    /// ([`icount`]) for `R` rounds.
    icount: Option<u64>,
}

/// The cores the two threads are pinned to (the first two the OS offers), if any.
fn cores() -> (Option<core_affinity::CoreId>, Option<core_affinity::CoreId>) {
    let ids = core_affinity::get_core_ids().unwrap_or_default();
    match ids.as_slice() {
        [a, b, ..] => (Some(*a), Some(*b)),
        [a] => (Some(*a), Some(*a)),
        [] => (None, None),
    }
}

fn pin(core: Option<core_affinity::CoreId>) {
    if let Some(c) = core {
        // Best effort: an unpinned thread still gives a (noisier) figure.
        let _ = core_affinity::set_for_current(c);
    }
}

/// Slots per queue for records of `N` bytes: the same payload bytes for every implementation.
const fn slots(n: usize) -> usize {
    if n >= 1024 {
        1024
    } else {
        4096
    }
}

/// The payload of record `i`: the template with `i` in its first 8 bytes.
#[inline(always)]
fn fill<const N: usize>(dst: &mut [u8], template: &[u8; N], i: u64) {
    dst.copy_from_slice(template);
    dst[..8].copy_from_slice(&i.to_le_bytes());
}

/// Our producer's step (the throughput run and the `--icount` driver share it): fills record
/// `i` in place and commits it, publishing every `batch` records (`left` counts down to the
/// next publication).
#[inline(always)]
fn put<const N: usize>(
    mut c: ftvm_ringbuf::Claim<'_>,
    template: &[u8; N],
    i: u64,
    left: &mut u64,
    batch: u64,
) {
    fill(&mut c, template, i);
    *left -= 1;
    if *left == 0 {
        c.commit();
        *left = batch;
    } else {
        c.commit_deferred();
    }
}

/// Reads a payload: returns its record number and folds every word into `acc`.
#[inline(always)]
fn digest(p: &[u8], acc: &mut u64) -> u64 {
    let mut x = 0u64;
    for w in p.chunks_exact(8) {
        x ^= u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
    }
    *acc = acc.rotate_left(1) ^ x;
    u64::from_le_bytes([p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]])
}

fn template<const N: usize>() -> [u8; N] {
    let mut t = [0u8; N];
    for (i, b) in t.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(7);
    }
    t
}

/// Runs `producer` and `consumer` on the two cores, started together; returns the consumer's
/// elapsed time and checks the sum of record numbers it saw.
fn run_pair<P, C>(n: u64, producer: P, consumer: C) -> anyhow::Result<Duration>
where
    P: FnOnce() + Send + 'static,
    C: FnOnce() -> u64 + Send + 'static,
{
    let (c0, c1) = cores();
    let barrier = Arc::new(Barrier::new(2));
    let b = barrier.clone();
    let prod = std::thread::spawn(move || {
        pin(c0);
        b.wait();
        producer();
    });
    let cons = std::thread::spawn(move || {
        pin(c1);
        barrier.wait();
        let t = Instant::now();
        let sum = consumer();
        (t.elapsed(), sum)
    });
    prod.join()
        .map_err(|_| anyhow!("producer thread panicked"))?;
    let (elapsed, sum) = cons
        .join()
        .map_err(|_| anyhow!("consumer thread panicked"))?;
    let expected = n * (n - 1) / 2;
    if sum != expected {
        bail!("consumer saw record numbers summing to {sum}, expected {expected}");
    }
    Ok(elapsed)
}

fn mps(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64() / 1e6
}

// ---------------------------------------------------------------------------------------------
// Throughput

/// Our consumer (both throughput runs): takes every committed record up to the end of the data
/// area as one batch, reads each, releases the batch with one store; returns the sum of the
/// record numbers (`u64::MAX` on a malformed record).
fn consume_ours<const N: usize>(mut rx: ftvm_ringbuf::Consumer, n: u64) -> u64 {
    let (mut got, mut sum, mut acc) = (0u64, 0u64, 0u64);
    while got < n {
        let batch = rx.read();
        if batch.is_empty() {
            std::hint::spin_loop();
            continue;
        }
        for r in batch.records() {
            // A consumer of fixed-size records views them as arrays, as rtrb hands them out.
            let Some(p) = r.ok().and_then(|r| <&[u8; N]>::try_from(r.payload()).ok()) else {
                return u64::MAX;
            };
            sum = sum.wrapping_add(digest(p, &mut acc));
            got += 1;
        }
        batch.release();
    }
    black_box(acc);
    sum
}

/// Ours. `batch == 1`: every record published at commit; otherwise records are committed with
/// `commit_deferred` and published every `batch` records (and whenever a claim finds the buffer
/// full).
fn tput_ours<const N: usize>(n: u64, batch: u64) -> anyhow::Result<f64> {
    let (mut tx, rx) = ftvm_ringbuf::with_capacity(slots(N) * N)?;
    let t = template::<N>();
    let d = run_pair(
        n,
        move || {
            let mut left = batch; // records until the next publication
            for i in 0..n {
                loop {
                    match tx.claim(1, N) {
                        Ok(c) => {
                            put(c, &t, i, &mut left, batch);
                            break;
                        }
                        Err(_) => std::hint::spin_loop(),
                    }
                }
            }
            tx.publish();
        },
        move || consume_ours::<N>(rx, n),
    )?;
    Ok(mps(n, d))
}

/// Ours through reservations: `Producer::reserve` for `batch` records (fewer at the end), each
/// appended with `Reservation::claim` and filled in place, then one `commit`.
fn tput_ours_reserve<const N: usize>(n: u64, batch: u64) -> anyhow::Result<f64> {
    let (mut tx, rx) = ftvm_ringbuf::with_capacity(slots(N) * N)?;
    let t = template::<N>();
    let d = run_pair(
        n,
        move || {
            let mut i = 0u64;
            while i < n {
                let k = batch.min(n - i);
                if reserve_put(&mut tx, &t, i, k) {
                    i += k;
                } else {
                    std::hint::spin_loop();
                }
            }
        },
        move || consume_ours::<N>(rx, n),
    )?;
    Ok(mps(n, d))
}

/// One reservation of `k` records `first..first + k` (the reserve producer and its `--icount`
/// driver share it); false when the buffer is full.
#[inline(always)]
fn reserve_put<const N: usize>(
    tx: &mut ftvm_ringbuf::Producer,
    t: &[u8; N],
    first: u64,
    k: u64,
) -> bool {
    let span = ftvm_ringbuf::layout::record_span(N);
    let Ok(mut r) = tx.reserve(k as usize * span) else {
        return false;
    };
    for i in first..first + k {
        match r.claim(1, N) {
            Ok(c) => fill(c, t, i),
            Err(_) => return false, // cannot happen: the reservation holds k records
        }
    }
    r.commit();
    true
}

fn tput_rtrb<const N: usize>(n: u64) -> anyhow::Result<f64> {
    let (mut tx, mut rx) = rtrb::RingBuffer::<[u8; N]>::new(slots(N));
    tput_array(
        n,
        move |a| tx.push(a).map_err(|rtrb::PushError::Full(back)| back),
        move || rx.pop().ok(),
    )
}

/// An array queue of `[u8; N]` items moved one by one (rtrb's push/pop, crossbeam's
/// `ArrayQueue`; their APIs differ only in their signatures): `push` hands the item back when
/// the queue is full. The closures are generic parameters, so each queue's calls are inlined as
/// if written out.
fn tput_array<const N: usize, Push, Pop>(
    n: u64,
    mut push: Push,
    mut pop: Pop,
) -> anyhow::Result<f64>
where
    Push: FnMut([u8; N]) -> Result<(), [u8; N]> + Send + 'static,
    Pop: FnMut() -> Option<[u8; N]> + Send + 'static,
{
    let t = template::<N>();
    let d = run_pair(
        n,
        move || {
            for i in 0..n {
                let mut a = t;
                fill(&mut a, &t, i);
                while let Err(back) = push(a) {
                    a = back;
                    std::hint::spin_loop();
                }
            }
        },
        move || {
            let (mut got, mut sum, mut acc) = (0u64, 0u64, 0u64);
            while got < n {
                match pop() {
                    Some(a) => {
                        sum = sum.wrapping_add(digest(&a, &mut acc));
                        got += 1;
                    }
                    None => std::hint::spin_loop(),
                }
            }
            black_box(acc);
            sum
        },
    )?;
    Ok(mps(n, d))
}

/// rtrb's chunk API: chunks of at most `max_chunk` records (`u64::MAX`: every free slot).
fn tput_rtrb_chunk<const N: usize>(n: u64, max_chunk: u64) -> anyhow::Result<f64> {
    tput_rtrb_chunk_in::<N>(n, max_chunk, slots(N))
}

/// As [`tput_rtrb_chunk`], with `slots` items in the queue.
fn tput_rtrb_chunk_in<const N: usize>(n: u64, max_chunk: u64, slots: usize) -> anyhow::Result<f64> {
    let (mut tx, mut rx) = rtrb::RingBuffer::<[u8; N]>::new(slots);
    let t = template::<N>();
    let d = run_pair(
        n,
        move || {
            let mut i = 0u64;
            while i < n {
                let want = (tx.slots() as u64).min(n - i).min(max_chunk) as usize;
                if want == 0 {
                    std::hint::spin_loop();
                    continue;
                }
                let Ok(chunk) = tx.write_chunk_uninit(want) else {
                    continue;
                };
                let start = i;
                let moved = chunk.fill_from_iter((start..start + want as u64).map(|k| {
                    let mut a = t;
                    fill(&mut a, &t, k);
                    a
                }));
                i += moved as u64;
            }
        },
        move || {
            let (mut got, mut sum, mut acc) = (0u64, 0u64, 0u64);
            while got < n {
                let avail = rx.slots();
                if avail == 0 {
                    std::hint::spin_loop();
                    continue;
                }
                let Ok(chunk) = rx.read_chunk(avail) else {
                    continue;
                };
                let (a, b) = chunk.as_slices();
                for p in a.iter().chain(b) {
                    sum = sum.wrapping_add(digest(p, &mut acc));
                }
                got += avail as u64;
                chunk.commit_all();
            }
            black_box(acc);
            sum
        },
    )?;
    Ok(mps(n, d))
}

fn tput_crossbeam<const N: usize>(n: u64) -> anyhow::Result<f64> {
    let q = Arc::new(ArrayQueue::<[u8; N]>::new(slots(N)));
    let qc = q.clone();
    tput_array(n, move |a| q.push(a), move || qc.pop())
}

// ---------------------------------------------------------------------------------------------
// Instruction counts

/// Records per round of [`icount`] for records of `N` bytes: a quarter of the queue, so
/// neither side ever waits.
const fn icount_round(n: usize) -> u64 {
    (slots(n) / 4) as u64
}

/// The per-record work of ours and of rtrb's chunk API on one thread, for counting
/// instructions: `valgrind --tool=callgrind ftvm-bench ringbuf --icount 200 --size 64`, then
/// `callgrind_annotate --inclusive=yes` gives each `icount_*` function's instructions; divide
/// by the records it reports. Each round fills a quarter of the queue (the throughput runs'
/// producer code: claim → fill → `commit_deferred`, publish every `batch`; then the same
/// records again through reservations of `batch`; rtrb chunks of `batch`), then drains them
/// (the throughput runs' consumer code; `icount_ours_consume` runs twice per round, so halve
/// its count). No thread ever waits, so
/// the counts are the buffers' own work per record, with the same fill and digest for both.
fn icount<const N: usize>(rounds: u64, batch: u64) -> anyhow::Result<()> {
    let t = template::<N>();
    let (mut tx, mut rx) = ftvm_ringbuf::with_capacity(slots(N) * N)?;
    let (mut rtx, mut rrx) = rtrb::RingBuffer::<[u8; N]>::new(slots(N));
    let (mut ours_sum, mut rtrb_sum, mut acc) = (0u64, 0u64, 0u64);
    for r in 0..rounds {
        let first = r * icount_round(N);
        icount_ours_produce(&mut tx, &t, first, batch);
        ours_sum = ours_sum.wrapping_add(icount_ours_consume::<N>(&mut rx, &mut acc)?);
        icount_ours_reserve_produce(&mut tx, &t, first, batch);
        ours_sum = ours_sum.wrapping_add(icount_ours_consume::<N>(&mut rx, &mut acc)?);
        icount_rtrb_produce(&mut rtx, &t, first, batch);
        rtrb_sum = rtrb_sum.wrapping_add(icount_rtrb_consume(&mut rrx, &mut acc)?);
    }
    black_box(acc);
    let n = rounds * icount_round(N);
    let expected = n.wrapping_mul(n.wrapping_sub(1)) / 2;
    if ours_sum != expected.wrapping_mul(2) || rtrb_sum != expected {
        bail!("icount: sums {ours_sum} / {rtrb_sum}, expected {expected}");
    }
    println!("icount {N} B: {n} records through ours and rtrb (divide callgrind counts by {n})");
    Ok(())
}

#[inline(never)]
fn icount_ours_produce<const N: usize>(
    tx: &mut ftvm_ringbuf::Producer,
    t: &[u8; N],
    first: u64,
    batch: u64,
) {
    let mut left = batch;
    for i in first..first + icount_round(N) {
        let Ok(c) = tx.claim(1, N) else {
            return; // cannot happen: a round fills a quarter of the buffer
        };
        put(c, t, i, &mut left, batch);
    }
    tx.publish();
}

#[inline(never)]
fn icount_ours_reserve_produce<const N: usize>(
    tx: &mut ftvm_ringbuf::Producer,
    t: &[u8; N],
    first: u64,
    batch: u64,
) {
    let end = first + icount_round(N);
    let mut i = first;
    while i < end {
        let k = batch.min(end - i);
        if !reserve_put(tx, t, i, k) {
            return; // cannot happen: a round fills a quarter of the buffer
        }
        i += k;
    }
}

#[inline(never)]
fn icount_ours_consume<const N: usize>(
    rx: &mut ftvm_ringbuf::Consumer,
    acc: &mut u64,
) -> anyhow::Result<u64> {
    let (mut got, mut sum) = (0u64, 0u64);
    while got < icount_round(N) {
        let batch = rx.read();
        if batch.is_empty() {
            bail!(
                "icount: ours is empty after {got} of {} records",
                icount_round(N)
            );
        }
        for r in batch.records() {
            let Some(p) = r.ok().and_then(|r| <&[u8; N]>::try_from(r.payload()).ok()) else {
                bail!("icount: malformed record");
            };
            sum = sum.wrapping_add(digest(p, acc));
            got += 1;
        }
        batch.release();
    }
    Ok(sum)
}

#[inline(never)]
fn icount_rtrb_produce<const N: usize>(
    tx: &mut rtrb::Producer<[u8; N]>,
    t: &[u8; N],
    first: u64,
    batch: u64,
) {
    let end = first + icount_round(N);
    let mut i = first;
    while i < end {
        let want = (tx.slots() as u64).min(end - i).min(batch) as usize;
        let Ok(chunk) = tx.write_chunk_uninit(want) else {
            return;
        };
        let start = i;
        let moved = chunk.fill_from_iter((start..start + want as u64).map(|k| {
            let mut a = *t;
            fill(&mut a, t, k);
            a
        }));
        i += moved as u64;
    }
}

#[inline(never)]
fn icount_rtrb_consume<const N: usize>(
    rx: &mut rtrb::Consumer<[u8; N]>,
    acc: &mut u64,
) -> anyhow::Result<u64> {
    let (mut got, mut sum) = (0u64, 0u64);
    while got < icount_round(N) {
        let avail = rx.slots();
        if avail == 0 {
            bail!(
                "icount: rtrb is empty after {got} of {} records",
                icount_round(N)
            );
        }
        let Ok(chunk) = rx.read_chunk(avail) else {
            bail!("icount: rtrb read_chunk");
        };
        let (a, b) = chunk.as_slices();
        for p in a.iter().chain(b) {
            sum = sum.wrapping_add(digest(p, acc));
        }
        got += avail as u64;
        chunk.commit_all();
    }
    Ok(sum)
}

// ---------------------------------------------------------------------------------------------
// Ping-pong round trip

/// Runs a pinger (records `samples` round trips into a histogram) against an echoer.
fn run_pingpong<P, E>(ping: P, echo: E) -> anyhow::Result<Histogram<u64>>
where
    P: FnOnce(&mut Histogram<u64>) + Send + 'static,
    E: FnOnce() + Send + 'static,
{
    let (c0, c1) = cores();
    let barrier = Arc::new(Barrier::new(2));
    let b = barrier.clone();
    let echoer = std::thread::spawn(move || {
        pin(c1);
        b.wait();
        echo();
    });
    let pinger = std::thread::spawn(move || -> anyhow::Result<Histogram<u64>> {
        pin(c0);
        let mut h =
            Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).context("histogram bounds")?;
        barrier.wait();
        ping(&mut h);
        Ok(h)
    });
    let h = pinger.join().map_err(|_| anyhow!("pinger panicked"))??;
    echoer.join().map_err(|_| anyhow!("echoer panicked"))?;
    Ok(h)
}

/// Warm-up round trips not recorded.
const WARMUP: u64 = 1000;

fn record_rtt(h: &mut Histogram<u64>, i: u64, t: Instant) {
    if i >= WARMUP {
        let ns = u64::try_from(t.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        h.saturating_record(ns);
    }
}

fn rtt_ours<const N: usize>(samples: u64) -> anyhow::Result<Histogram<u64>> {
    let (mut atx, mut arx) = ftvm_ringbuf::with_capacity(slots(N) * N)?;
    let (mut btx, mut brx) = ftvm_ringbuf::with_capacity(slots(N) * N)?;
    let t = template::<N>();
    let total = samples + WARMUP;
    run_pingpong(
        move |h| {
            let mut acc = 0u64;
            for i in 0..total {
                let start = Instant::now();
                if let Ok(mut c) = atx.claim(1, N) {
                    fill(&mut c, &t, i);
                    c.commit();
                }
                // A batch may hold only the padding record at the end of the area.
                let mut got = 0;
                while got == 0 {
                    let batch = brx.read();
                    if batch.is_empty() {
                        std::hint::spin_loop();
                        continue;
                    }
                    for r in batch.records().flatten() {
                        digest(r.payload(), &mut acc);
                        got += 1;
                    }
                    batch.release();
                }
                record_rtt(h, i, start);
            }
            black_box(acc);
        },
        move || {
            let mut acc = 0u64;
            let mut done = 0;
            while done < total {
                let batch = arx.read();
                if batch.is_empty() {
                    std::hint::spin_loop();
                    continue;
                }
                let (mut k, mut got) = (0u64, 0);
                for r in batch.records().flatten() {
                    k = digest(r.payload(), &mut acc);
                    got += 1;
                }
                batch.release();
                if got == 0 {
                    continue; // only the padding record at the end of the area
                }
                done += got;
                if let Ok(mut c) = btx.claim(1, N) {
                    fill(&mut c, &t, k);
                    c.commit();
                }
            }
            black_box(acc);
        },
    )
}

fn rtt_rtrb<const N: usize>(samples: u64) -> anyhow::Result<Histogram<u64>> {
    let (mut atx, mut arx) = rtrb::RingBuffer::<[u8; N]>::new(slots(N));
    let (mut btx, mut brx) = rtrb::RingBuffer::<[u8; N]>::new(slots(N));
    rtt_array(
        samples,
        move |a| {
            let _ = atx.push(a);
        },
        move || brx.pop().ok(),
        move || arx.pop().ok(),
        move |b| {
            let _ = btx.push(b);
        },
    )
}

fn rtt_crossbeam<const N: usize>(samples: u64) -> anyhow::Result<Histogram<u64>> {
    let qa = Arc::new(ArrayQueue::<[u8; N]>::new(slots(N)));
    let qb = Arc::new(ArrayQueue::<[u8; N]>::new(slots(N)));
    let (qa2, qb2) = (qa.clone(), qb.clone());
    rtt_array(
        samples,
        move |a| {
            let _ = qa.push(a);
        },
        move || qb.pop(),
        move || qa2.pop(),
        move |b| {
            let _ = qb2.push(b);
        },
    )
}

/// Ping-pong over two queues of `[u8; N]` items (rtrb's and crossbeam's differ only in their
/// signatures): the pinger pushes onto queue A and pops the echo from B; the echoer pops from A
/// and pushes onto B. The closures are generic parameters, so each queue's calls are inlined as
/// if written out.
fn rtt_array<const N: usize, PushA, PopB, PopA, PushB>(
    samples: u64,
    mut push_a: PushA,
    mut pop_b: PopB,
    mut pop_a: PopA,
    mut push_b: PushB,
) -> anyhow::Result<Histogram<u64>>
where
    PushA: FnMut([u8; N]) + Send + 'static,
    PopB: FnMut() -> Option<[u8; N]> + Send + 'static,
    PopA: FnMut() -> Option<[u8; N]> + Send + 'static,
    PushB: FnMut([u8; N]) + Send + 'static,
{
    let t = template::<N>();
    let total = samples + WARMUP;
    run_pingpong(
        move |h| {
            let mut acc = 0u64;
            for i in 0..total {
                let start = Instant::now();
                let mut a = t;
                fill(&mut a, &t, i);
                push_a(a);
                loop {
                    if let Some(b) = pop_b() {
                        digest(&b, &mut acc);
                        break;
                    }
                    std::hint::spin_loop();
                }
                record_rtt(h, i, start);
            }
            black_box(acc);
        },
        move || {
            let mut acc = 0u64;
            for _ in 0..total {
                let a = loop {
                    if let Some(a) = pop_a() {
                        break a;
                    }
                    std::hint::spin_loop();
                };
                let k = digest(&a, &mut acc);
                let mut b = t;
                fill(&mut b, &t, k);
                push_b(b);
            }
            black_box(acc);
        },
    )
}

// ---------------------------------------------------------------------------------------------

/// Medians over the repetitions for one record size: `N` payload bytes, `M = N + 8` bytes per
/// record in our buffer (the header).
fn measure<const N: usize, const M: usize>(
    p: Params,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Row> {
    let (mut ours, mut ours1, mut rtrb_pp, mut rtrb_ch, mut rtrb_chf, mut cb, mut rtrb_hdr) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut ours_res = vec![];
    let (mut o50, mut o99, mut r50, mut r99, mut c50, mut c99) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    // Same bytes moved at every size: fewer, larger records.
    let records = (p.records * 64 / N as u64).max(1);
    type Run = fn(u64, u64) -> anyhow::Result<f64>;
    // Ours and rtrb's chunks run back to back (in either order), so that each repetition's
    // ratio of the two compares runs the host treated alike.
    let runs: [(Run, u64, usize); 8] = [
        (tput_ours::<N>, p.batch, 0),
        (tput_rtrb_chunk::<N>, p.batch, 3),
        // Items as large as our records (payload + 8-byte header), in the same queue bytes,
        // next to rtrb's chunks of `N` bytes so that their ratio pairs runs the host treated
        // alike.
        (
            |n, b| tput_rtrb_chunk_in::<M>(n, b, slots(N) * N / M),
            p.batch,
            6,
        ),
        (tput_ours_reserve::<N>, p.batch, 7),
        (tput_ours::<N>, 1, 1),
        (|n, _| tput_rtrb::<N>(n), 0, 2),
        (tput_rtrb_chunk::<N>, u64::MAX, 4),
        (|n, _| tput_crossbeam::<N>(n), 0, 5),
    ];
    for rep in 0..p.reps {
        bar.set_message(format!("{N} B, rep {}/{}", rep + 1, p.reps));
        // Alternate the order so slow drift (other processes) does not favour one side.
        let order: Vec<&(Run, u64, usize)> = if rep % 2 == 0 {
            runs.iter().collect()
        } else {
            runs.iter().rev().collect()
        };
        for &(run, arg, slot) in order {
            let v = run(records, arg)?;
            [
                &mut ours,
                &mut ours1,
                &mut rtrb_pp,
                &mut rtrb_ch,
                &mut rtrb_chf,
                &mut cb,
                &mut rtrb_hdr,
                &mut ours_res,
            ][slot]
                .push(v);
        }
        bar.inc(1);
        let h = rtt_ours::<N>(p.rtt_samples)?;
        o50.push(h.value_at_quantile(0.5) as f64);
        o99.push(h.value_at_quantile(0.99) as f64);
        let h = rtt_rtrb::<N>(p.rtt_samples)?;
        r50.push(h.value_at_quantile(0.5) as f64);
        r99.push(h.value_at_quantile(0.99) as f64);
        let h = rtt_crossbeam::<N>(p.rtt_samples)?;
        c50.push(h.value_at_quantile(0.5) as f64);
        c99.push(h.value_at_quantile(0.99) as f64);
        bar.inc(1);
    }
    let m = report::median;
    // Per repetition: ours against rtrb's best use in the same repetition.
    let ratios = |num: &[f64], den: &[f64]| -> Vec<f64> {
        num.iter().zip(den).map(|(a, b)| a / b).collect()
    };
    let ours_best: Vec<f64> = ours.iter().zip(&ours_res).map(|(a, b)| a.max(*b)).collect();
    let rtrb_best: Vec<f64> = (0..ours.len())
        .map(|k| rtrb_pp[k].max(rtrb_ch[k]).max(rtrb_chf[k]))
        .collect();
    let mut paired = ratios(&ours_best, &rtrb_best);
    let mut header_cost = ratios(&rtrb_hdr, &rtrb_ch);
    let mut same_bytes = ratios(&ours_best, &rtrb_hdr);
    let (ours_claim_mps, ours_reserve_mps) = (m(&mut ours), m(&mut ours_res));
    let ours_mps = ours_claim_mps.max(ours_reserve_mps);
    let (rtrb_pp_mps, rtrb_ch_mps, rtrb_chf_mps, crossbeam_mps) = (
        m(&mut rtrb_pp),
        m(&mut rtrb_ch),
        m(&mut rtrb_chf),
        m(&mut cb),
    );
    let rtrb_mps = rtrb_pp_mps.max(rtrb_ch_mps).max(rtrb_chf_mps);
    Ok(Row {
        size: N,
        records_per_run: records,
        reps: p.reps,
        ours_mps,
        ours_claim_mps,
        ours_reserve_mps,
        ours_per_record_publish_mps: m(&mut ours1),
        batch: p.batch,
        rtrb_mps,
        rtrb_push_pop_mps: rtrb_pp_mps,
        rtrb_chunk_mps: rtrb_ch_mps,
        rtrb_chunk_free_mps: rtrb_chf_mps,
        rtrb_chunk_record_sized_mps: m(&mut rtrb_hdr),
        rtrb_record_sized_vs_rtrb_paired: m(&mut header_cost),
        ours_vs_rtrb_record_sized_paired: m(&mut same_bytes),
        crossbeam_mps,
        ours_vs_rtrb: ours_mps / rtrb_mps,
        ours_vs_rtrb_paired: m(&mut paired),
        ours_vs_rtrb_paired_min: paired.iter().copied().fold(f64::INFINITY, f64::min),
        ours_vs_crossbeam: ours_mps / crossbeam_mps,
        ours_rtt_p50_ns: m(&mut o50),
        ours_rtt_p99_ns: m(&mut o99),
        rtrb_rtt_p50_ns: m(&mut r50),
        rtrb_rtt_p99_ns: m(&mut r99),
        crossbeam_rtt_p50_ns: m(&mut c50),
        crossbeam_rtt_p99_ns: m(&mut c99),
    })
}

/// Options of `ftvm-bench ringbuf`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Repetitions of each measurement (medians reported) [default: 7, 3 with --quick].
    #[arg(long)]
    pub reps: Option<u64>,
    /// Records per throughput measurement [default: 20000000, 1000000 with --quick].
    #[arg(long)]
    pub records: Option<u64>,
    /// Round trips per latency measurement [default: 200000, 10000 with --quick].
    #[arg(long)]
    pub rtt_samples: Option<u64>,
    /// Records the producer commits before it publishes them.
    #[arg(long, alias = "publish-every", default_value_t = 128)]
    pub batch: u64,
    /// Measure one record size only: 64, 256 or 1024 [default: all three].
    #[arg(long)]
    pub size: Option<u64>,
    /// Instead of measuring, run the single-threaded instruction-count driver for this many
    /// rounds (for callgrind).
    #[arg(long, value_name = "ROUNDS")]
    pub icount: Option<u64>,
}

fn apply(args: &Args, p: &mut Params) -> anyhow::Result<()> {
    if let Some(r) = args.reps {
        p.reps = usize::try_from(r.max(1))?;
    }
    if let Some(r) = args.records {
        p.records = r.max(1);
    }
    if let Some(r) = args.rtt_samples {
        p.rtt_samples = r.max(1);
    }
    p.batch = args.batch.max(1);
    p.icount = args.icount.map(|r| r.max(1));
    if let Some(size) = args.size {
        p.sizes = match SIZES.iter().position(|&s| s as u64 == size) {
            Some(i) => &SIZES[i..=i],
            None => bail!("--size must be one of {SIZES:?}"),
        };
    }
    Ok(())
}

/// The `ringbuf` benchmark.
pub fn run(opts: &Opts, args: &Args) -> anyhow::Result<()> {
    let mut p = if opts.quick {
        Params {
            records: 1_000_000,
            rtt_samples: 10_000,
            reps: 3,
            batch: 128,
            sizes: SIZES,
            icount: None,
        }
    } else {
        Params {
            records: 20_000_000,
            rtt_samples: 200_000,
            reps: 7,
            batch: 128,
            sizes: SIZES,
            icount: None,
        }
    };
    apply(args, &mut p)?;
    if let Some(rounds) = p.icount {
        for &size in p.sizes {
            match size {
                64 => icount::<64>(rounds, p.batch)?,
                256 => icount::<256>(rounds, p.batch)?,
                _ => icount::<1024>(rounds, p.batch)?,
            }
        }
        return Ok(());
    }
    let bar = report::progress(p.sizes.len() as u64 * 2 * p.reps as u64, "ringbuf");
    let mut rows = Vec::new();
    for &size in p.sizes {
        rows.push(match size {
            64 => measure::<64, { 64 + RECORD_HEADER_LEN }>(p, &bar)?,
            256 => measure::<256, { 256 + RECORD_HEADER_LEN }>(p, &bar)?,
            _ => measure::<1024, { 1024 + RECORD_HEADER_LEN }>(p, &bar)?,
        });
    }
    bar.finish_and_clear();

    let json = report::write_json(opts, "ringbuf", &rows)?;
    let series = |label: &str, f: fn(&Row) -> f64| Series {
        label: label.into(),
        points: rows.iter().map(|r| (r.size as f64, f(r))).collect(),
    };
    let svg = report::plot_svg(
        opts,
        "ringbuf",
        &[
            Panel {
                title: "throughput, producer → consumer on 2 cores".into(),
                x_label: "record payload (bytes)".into(),
                y_label: "million records / s".into(),
                log_x: true,
                log_y: false,
                categories: Vec::new(),
                series: vec![
                    series("ftvm-ringbuf", |r| r.ours_mps),
                    series("rtrb (best of push/pop, chunks)", |r| r.rtrb_mps),
                    series("crossbeam ArrayQueue", |r| r.crossbeam_mps),
                ],
            },
            Panel {
                title: "ping-pong round trip, p50".into(),
                x_label: "record payload (bytes)".into(),
                y_label: "ns".into(),
                log_x: true,
                log_y: false,
                categories: Vec::new(),
                series: vec![
                    series("ftvm-ringbuf", |r| r.ours_rtt_p50_ns),
                    series("rtrb", |r| r.rtrb_rtt_p50_ns),
                    series("crossbeam ArrayQueue", |r| r.crossbeam_rtt_p50_ns),
                ],
            },
        ],
    )?;

    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.size.to_string(),
                format!("{:.1}", r.ours_claim_mps),
                format!("{:.1}", r.ours_reserve_mps),
                format!("{:.1}", r.ours_per_record_publish_mps),
                format!("{:.1}", r.rtrb_push_pop_mps),
                format!("{:.1}", r.rtrb_chunk_mps),
                format!("{:.1}", r.rtrb_chunk_free_mps),
                format!("{:.1}", r.rtrb_chunk_record_sized_mps),
                format!("{:.1}", r.crossbeam_mps),
                format!("{:.2}", r.ours_vs_rtrb),
                format!(
                    "{:.2} (≥{:.2})",
                    r.ours_vs_rtrb_paired, r.ours_vs_rtrb_paired_min
                ),
                format!("{:.2}", r.rtrb_record_sized_vs_rtrb_paired),
                format!("{:.2}", r.ours_vs_rtrb_record_sized_paired),
                format!("{:.2}", r.ours_vs_crossbeam),
                format!("{:.0}/{:.0}", r.ours_rtt_p50_ns, r.ours_rtt_p99_ns),
                format!("{:.0}/{:.0}", r.rtrb_rtt_p50_ns, r.rtrb_rtt_p99_ns),
                format!(
                    "{:.0}/{:.0}",
                    r.crossbeam_rtt_p50_ns, r.crossbeam_rtt_p99_ns
                ),
            ]
        })
        .collect();
    report::print_table(
        &format!(
            "ringbuf (medians of {} runs; M records/s, batches of {} records, rtrb chunk* = \
             all free slots, rtrb chunk+8 = items of size+8 B; paired = median (min) of each \
             run's own ours/rtrb; rtrb+8/rtrb, ours/rtrb+8: the same per run; RTT p50/p99 ns)",
            p.reps, p.batch
        ),
        &[
            "bytes",
            "ours claim",
            "ours res",
            "ours 1by1",
            "rtrb push",
            "rtrb chunk",
            "rtrb chunk*",
            "rtrb chunk+8",
            "crossbeam",
            "ours/rtrb",
            "paired",
            "rtrb+8/rtrb",
            "ours/rtrb+8",
            "ours/cb",
            "ours rtt",
            "rtrb rtt",
            "cb rtt",
        ],
        &table,
    );
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}
