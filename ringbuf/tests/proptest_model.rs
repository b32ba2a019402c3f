//! Random sequences of claim / commit / commit_len / commit_deferred / abort / reserve (several
//! records committed or dropped together) / publish / read / release against a `VecDeque` model
//! of the buffer. The model computes the space a claim needs
//! from `record_span` and the padding at the wrap point, so `Full` must come exactly when the
//! model says the space is short, and every record must come back with its kind, sequence
//! number, position and content.

#![allow(clippy::drop_non_drop)] // `drop(x)` marks where a borrow ends

use std::collections::VecDeque;

use ftvm_ringbuf::layout::{
    max_payload, record_span, KIND_PADDING, RECORD_ALIGN, RECORD_HEADER_LEN,
};
use ftvm_ringbuf::{with_capacity, ClaimError, FIRST_SEQ};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Finish {
    Commit,
    /// Shrink to this fraction (0..=255 / 255) of the claimed length.
    CommitLen(u8),
    Deferred,
    Abort,
}

#[derive(Debug, Clone)]
enum Op {
    Claim {
        kind: u16,
        len: usize,
        finish: Finish,
    },
    /// Reserve the spans of `lens` plus `extra` bytes, append the records (and then one that
    /// must not fit when `overflow`), finish with Commit, Deferred or Abort (drop).
    Reserve {
        kind: u16,
        lens: Vec<usize>,
        extra: usize,
        overflow: bool,
        finish: Finish,
    },
    Publish,
    /// Read a batch and release the first `keep` records of it (all of it when `None`).
    Read {
        release: Option<usize>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    seq: u64,
    kind: u16,
    payload: Vec<u8>,
    position: u64,
    next_position: u64,
}

/// The model: positions and records, the way the design describes them.
#[derive(Debug)]
struct Model {
    cap: u64,
    head: u64,
    tail: u64,
    published: u64,
    next_seq: u64,
    /// Committed records not yet released (published and deferred), oldest first.
    records: VecDeque<Rec>,
}

impl Model {
    /// Bytes a claim of `len` advances the tail by at the current tail (padding included).
    fn advance(&self, len: usize) -> u64 {
        self.advance_span(record_span(len) as u64)
    }

    /// The `Full` error a claim or reservation advancing the tail by `advance` gets, if the
    /// space is short; such a claim publishes the deferred records, as the model then does.
    fn full(&mut self, advance: u64) -> Option<ClaimError> {
        let used = self.tail - self.head;
        if used + advance <= self.cap {
            return None;
        }
        self.published = self.tail;
        Some(ClaimError::Full {
            needed: advance as usize,
            available: (self.cap - used) as usize,
        })
    }

    /// Bytes `span` contiguous bytes take at the current tail (padding included).
    fn advance_span(&self, span: u64) -> u64 {
        let to_end = self.cap - self.tail % self.cap;
        if span <= to_end {
            span
        } else {
            to_end + span
        }
    }
}

fn op(max: usize) -> impl Strategy<Value = Op> {
    let finish = prop_oneof![
        4 => Just(Finish::Commit),
        1 => any::<u8>().prop_map(Finish::CommitLen),
        2 => Just(Finish::Deferred),
        1 => Just(Finish::Abort),
    ];
    let kind = prop_oneof![10 => 0u16..8, 1 => Just(KIND_PADDING - 1), 1 => Just(KIND_PADDING), 1 => KIND_PADDING..=u16::MAX];
    let len = prop_oneof![
        4 => 0..=max.min(64),
        2 => 0..=max,
        1 => Just(max),
        1 => max + 1..=max + 64,
    ];
    let reserve_finish = prop_oneof![
        3 => Just(Finish::Commit),
        2 => Just(Finish::Deferred),
        1 => Just(Finish::Abort),
    ];
    let reserve = (
        prop_oneof![10 => 0u16..8, 1 => Just(KIND_PADDING)],
        proptest::collection::vec(0..=max.min(48), 0..6),
        prop_oneof![3 => Just(0usize), 1 => 0usize..=max],
        any::<bool>(),
        reserve_finish,
    )
        .prop_map(|(kind, lens, extra, overflow, finish)| Op::Reserve {
            kind,
            lens,
            extra,
            overflow,
            finish,
        });
    prop_oneof![
        6 => (kind, len, finish).prop_map(|(kind, len, finish)| Op::Claim { kind, len, finish }),
        2 => reserve,
        1 => Just(Op::Publish),
        3 => proptest::option::of(0usize..6).prop_map(|release| Op::Read { release }),
    ]
}

fn content(seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

fn run(cap: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let (mut tx, mut rx) = with_capacity(cap).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let max = max_payload(cap);
    let mut m = Model {
        cap: cap as u64,
        head: 0,
        tail: 0,
        published: 0,
        next_seq: FIRST_SEQ,
        records: VecDeque::new(),
    };
    for op in ops {
        match op {
            Op::Claim { kind, len, finish } => {
                let (kind, len) = (*kind, *len);
                let result = tx.claim(kind, len);
                if kind >= KIND_PADDING {
                    prop_assert_eq!(result.unwrap_err(), ClaimError::ReservedKind(kind));
                    continue;
                }
                if len > max {
                    prop_assert_eq!(result.unwrap_err(), ClaimError::TooLarge { len, max });
                    continue;
                }
                let advance = m.advance(len);
                let used = m.tail - m.head;
                if let Some(full) = m.full(advance) {
                    prop_assert_eq!(result.unwrap_err(), full);
                    continue;
                }
                let mut claim = match result {
                    Ok(c) => c,
                    Err(e) => {
                        return Err(TestCaseError::fail(format!(
                            "claim({len}) failed with {e} but the model has {} free, needs \
                             {advance}",
                            m.cap - used
                        )))
                    }
                };
                prop_assert_eq!(claim.len(), len);
                let seq = m.next_seq;
                claim.copy_from_slice(&content(seq, len));
                let wrapped = advance != record_span(len) as u64;
                let position = if wrapped {
                    m.tail + (advance - record_span(len) as u64)
                } else {
                    m.tail
                };
                let final_len = match finish {
                    Finish::Abort => {
                        drop(claim);
                        continue;
                    }
                    Finish::Commit => {
                        prop_assert_eq!(claim.commit(), seq);
                        len
                    }
                    Finish::CommitLen(frac) => {
                        let l = len * usize::from(*frac) / 255;
                        prop_assert_eq!(claim.commit_len(l), seq);
                        l
                    }
                    Finish::Deferred => {
                        prop_assert_eq!(claim.commit_deferred(), seq);
                        len
                    }
                };
                let next_position = position + record_span(final_len) as u64;
                m.records.push_back(Rec {
                    seq,
                    kind,
                    payload: content(seq, len)[..final_len].to_vec(),
                    position,
                    next_position,
                });
                m.next_seq += 1;
                m.tail = next_position;
                if !matches!(finish, Finish::Deferred) {
                    m.published = m.tail;
                }
                prop_assert_eq!(tx.position(), m.tail);
                prop_assert_eq!(tx.published_position(), m.published);
                prop_assert_eq!(tx.next_seq(), m.next_seq);
            }
            Op::Reserve {
                kind,
                lens,
                extra,
                overflow,
                finish,
            } => {
                let kind = *kind;
                let spans: u64 = lens.iter().map(|&l| record_span(l) as u64).sum();
                let bytes = spans as usize + extra;
                let result = tx.reserve(bytes);
                if bytes > max + RECORD_HEADER_LEN {
                    prop_assert_eq!(
                        result.unwrap_err(),
                        ClaimError::TooLarge {
                            len: bytes,
                            max: max + RECORD_HEADER_LEN
                        }
                    );
                    continue;
                }
                let span = bytes.div_ceil(RECORD_ALIGN) as u64 * RECORD_ALIGN as u64;
                let advance = m.advance_span(span);
                let used = m.tail - m.head;
                if let Some(full) = m.full(advance) {
                    prop_assert_eq!(result.unwrap_err(), full);
                    continue;
                }
                let mut r = match result {
                    Ok(r) => r,
                    Err(e) => {
                        return Err(TestCaseError::fail(format!(
                            "reserve({bytes}) failed with {e} but the model has {} free, \
                             needs {advance}",
                            m.cap - used
                        )))
                    }
                };
                prop_assert_eq!(r.remaining() as u64, span);
                let mut position = m.tail + (advance - span);
                let mut recs = Vec::new();
                let mut seq = m.next_seq;
                for &len in lens {
                    match r.push(kind, &content(seq, len)) {
                        Ok(got) if kind < KIND_PADDING => prop_assert_eq!(got, seq),
                        Err(ClaimError::ReservedKind(k)) if kind >= KIND_PADDING => {
                            prop_assert_eq!(k, kind);
                            continue;
                        }
                        other => {
                            return Err(TestCaseError::fail(format!(
                                "push({kind}, {len}): {other:?}"
                            )))
                        }
                    }
                    let next_position = position + record_span(len) as u64;
                    recs.push(Rec {
                        seq,
                        kind,
                        payload: content(seq, len),
                        position,
                        next_position,
                    });
                    position = next_position;
                    seq += 1;
                }
                if *overflow && kind < KIND_PADDING {
                    let len = r.remaining() + 1;
                    let refused = matches!(r.claim(kind, len), Err(ClaimError::Full { .. }));
                    prop_assert!(refused, "a record past the reservation was not refused");
                }
                match finish {
                    Finish::Abort => {
                        drop(r);
                        continue;
                    }
                    Finish::Deferred => prop_assert_eq!(r.commit_deferred(), seq),
                    _ => {
                        prop_assert_eq!(r.commit(), seq);
                        m.published = m.tail;
                    }
                }
                if !recs.is_empty() {
                    m.tail = position;
                    m.next_seq = seq;
                    m.records.extend(recs);
                }
                if !matches!(finish, Finish::Deferred) {
                    m.published = m.tail;
                }
                prop_assert_eq!(tx.position(), m.tail);
                prop_assert_eq!(tx.published_position(), m.published);
                prop_assert_eq!(tx.next_seq(), m.next_seq);
            }
            Op::Publish => {
                tx.publish();
                m.published = m.tail;
            }
            Op::Read { release } => {
                let batch = rx.read();
                let off = m.head % m.cap;
                let end = m.published.min(m.head + (m.cap - off));
                prop_assert_eq!(batch.start_position(), m.head);
                prop_assert_eq!(batch.end_position(), end);
                let got: Vec<Rec> = batch
                    .records()
                    .map(|r| {
                        let r = r.expect("well-formed record");
                        Rec {
                            seq: r.seq(),
                            kind: r.kind(),
                            payload: r.payload().to_vec(),
                            position: r.position(),
                            next_position: r.next_position(),
                        }
                    })
                    .collect();
                let want: Vec<Rec> = m
                    .records
                    .iter()
                    .take_while(|r| r.position < end)
                    .cloned()
                    .collect();
                prop_assert_eq!(&got, &want);
                let to = match release {
                    None => end,
                    Some(k) if *k < got.len() => {
                        if *k == 0 {
                            m.head
                        } else {
                            got[*k - 1].next_position
                        }
                    }
                    Some(_) => end,
                };
                drop(batch);
                rx.release_to(to);
                while m.records.front().is_some_and(|r| r.next_position <= to) {
                    m.records.pop_front();
                }
                m.head = m.head.max(to);
                prop_assert_eq!(rx.position(), m.head);
                prop_assert_eq!(rx.ring().head_position(), m.head);
            }
        }
    }
    // Drain: everything committed comes back, in order.
    tx.publish();
    m.published = m.tail;
    let mut rest = Vec::new();
    loop {
        let batch = rx.read();
        if batch.is_empty() {
            break;
        }
        rest.extend(batch.records().map(|r| r.expect("well-formed").seq()));
        batch.release();
    }
    let want: Vec<u64> = m.records.iter().map(|r| r.seq).collect();
    prop_assert_eq!(rest, want);
    prop_assert_eq!(rx.position(), m.tail);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn matches_the_model_64(ops in proptest::collection::vec(op(max_payload(64)), 1..200)) {
        run(64, &ops)?;
    }

    #[test]
    fn matches_the_model_256(ops in proptest::collection::vec(op(max_payload(256)), 1..300)) {
        run(256, &ops)?;
    }

    #[test]
    fn matches_the_model_4096(ops in proptest::collection::vec(op(max_payload(4096)), 1..300)) {
        run(4096, &ops)?;
    }

    /// Large enough that most claims of small records take the producer's fast path (which
    /// needs room for its prefetch range, ~1 KiB, after the record), so both paths and the
    /// switches between them meet the model.
    #[test]
    fn matches_the_model_16k(ops in proptest::collection::vec(op(max_payload(16384)), 1..600)) {
        run(16384, &ops)?;
    }
}
