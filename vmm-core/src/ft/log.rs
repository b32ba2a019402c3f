//! The replication log's entry format (vmm-core/LOG_FORMAT.md, version [`LOG_VERSION`]).
//!
//! Every entry is one record of the log buffer: the record's `kind` says which entry it is and
//! its payload holds little-endian fields. Entries are encoded **in place** into a claimed
//! record ([`Entry::encode`], [`encode_write`]) and decoded from a received record
//! ([`Entry::decode`]).

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::record::{OutputDigest, OutputSource};

/// Version of the entry format (LOG_FORMAT.md); the [`Entry::Header`] carries it.
/// Version 2 added [`Entry::Control`], version 3 [`Entry::Output`].
pub const LOG_VERSION: u32 = 3;

/// Record kind of [`Entry::Header`].
pub const KIND_HEADER: u16 = 1;
/// Record kind of [`Entry::Read`].
pub const KIND_READ: u16 = 2;
/// Record kind of [`Entry::Write`].
pub const KIND_WRITE: u16 = 3;
/// Record kind of [`Entry::Digest`].
pub const KIND_DIGEST: u16 = 4;
/// Record kind of [`Entry::End`].
pub const KIND_END: u16 = 5;
/// Record kind of [`Entry::Control`].
pub const KIND_CONTROL: u16 = 6;
/// Record kind of [`Entry::Output`].
pub const KIND_OUTPUT: u16 = 7;
/// Payload length of an [`Entry::Output`]: `exit`, `what` (source | count << 32), `bytes`,
/// `digest`.
pub const OUTPUT_LEN: usize = 32;

/// Fixed part of a [`Entry::Write`] payload (exit, gpa).
pub const WRITE_HEADER_LEN: usize = 16;

/// Errors decoding an entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    /// The record kind is not an entry kind.
    #[error("unknown log entry kind {0}")]
    UnknownKind(u16),
    /// The payload has the wrong length for its kind.
    #[error("log entry of kind {kind} has {len} payload bytes")]
    BadLength {
        /// The kind.
        kind: u16,
        /// The payload length.
        len: usize,
    },
    /// The header has a version this build does not understand.
    #[error("log format version {0}, this build reads version {LOG_VERSION}")]
    Version(u32),
    /// An output digest names no known source.
    #[error("output digest with unknown source {0:#x}")]
    BadOutputSource(u32),
}

/// One log entry.
#[derive(Clone, PartialEq, Eq)]
pub enum Entry {
    /// First entry of a log: format version and the replication parameters.
    Header {
        /// [`LOG_VERSION`].
        version: u32,
        /// Exits between two [`Entry::Digest`] checkpoints.
        digest_interval: u64,
        /// Every how many checkpoints the memory digest is included (0: only at the end).
        mem_digest_every: u64,
    },
    /// The value of an MMIO read whose outcome came from outside (clock, entropy, WAIT).
    Read {
        /// Exit index.
        exit: u64,
        /// MMIO address (identifies the device and register).
        addr: u64,
        /// The value returned to the guest.
        value: u64,
    },
    /// A device wrote `data` into guest memory at `gpa` during exit `exit`.
    Write {
        /// Exit index.
        exit: u64,
        /// Guest-physical address.
        gpa: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// A checkpoint: the state digests when `exit` exits had been handled.
    Digest {
        /// Exits handled.
        exit: u64,
        /// Digest of the vCPU registers.
        regs: u64,
        /// Digest of guest memory, if included at this checkpoint.
        mem: Option<u64>,
    },
    /// A control setting (`key`, `value`) taken from the primary's [`ControlQueue`] and applied
    /// on both sides when `exit` exits had been handled (at a checkpoint, before its digest).
    Control {
        /// Exits handled.
        exit: u64,
        /// What is set (meaning defined by the user of the queue, e.g. the throttle).
        key: u32,
        /// The value.
        value: u64,
    },
    /// The digest of the outputs one device produced at exit `exit` (console bytes,
    /// transmitted frames, a shared-disk write), logged before they were tagged for the output
    /// rule; the backup compares it with its own.
    Output {
        /// Exit index.
        exit: u64,
        /// The digest.
        digest: OutputDigest,
    },
    /// The guest powered off after `exit` exits with `code`.
    End {
        /// Exits handled.
        exit: u64,
        /// Power-off code.
        code: u64,
        /// Digest of the vCPU registers.
        regs: u64,
        /// Digest of guest memory.
        mem: u64,
    },
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Header {
                version,
                digest_interval,
                mem_digest_every,
            } => write!(
                f,
                "header v{version} (digest every {digest_interval} exits, memory every {mem_digest_every})"
            ),
            Entry::Read { exit, addr, value } => {
                write!(f, "read of {addr:#x} ({}) at exit {exit} = {value:#x}", device_name(*addr))
            }
            Entry::Write { exit, gpa, data } => {
                write!(f, "write of {} bytes at {gpa:#x} at exit {exit}", data.len())
            }
            Entry::Digest { exit, regs, mem } => match mem {
                Some(m) => write!(f, "digest at exit {exit} regs {regs:#018x} memory {m:#018x}"),
                None => write!(f, "digest at exit {exit} regs {regs:#018x}"),
            },
            Entry::Control { exit, key, value } => {
                write!(f, "control {key} = {value} at exit {exit}")
            }
            Entry::Output { exit, digest } => {
                write!(f, "output of {} at exit {exit}: {digest}", digest.source.name())
            }
            Entry::End {
                exit,
                code,
                regs,
                mem,
            } => write!(
                f,
                "power off with {code} at exit {exit} regs {regs:#018x} memory {mem:#018x}"
            ),
        }
    }
}

/// The device an MMIO address belongs to (for messages).
pub fn device_name(addr: u64) -> &'static str {
    match addr.wrapping_sub(crate::memory::MMIO_BASE) / crate::bus::DEVICE_SIZE {
        0 => "sys",
        1 => "virtio-net",
        2 => "virtio-blk",
        3 => "virtio-console",
        _ => "unmapped",
    }
}

fn u64_at(p: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[off..off + 8]);
    u64::from_le_bytes(b)
}

fn put(p: &mut [u8], off: usize, v: u64) {
    p[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

impl Entry {
    /// The record kind of this entry.
    pub fn kind(&self) -> u16 {
        match self {
            Entry::Header { .. } => KIND_HEADER,
            Entry::Read { .. } => KIND_READ,
            Entry::Write { .. } => KIND_WRITE,
            Entry::Digest { .. } => KIND_DIGEST,
            Entry::Control { .. } => KIND_CONTROL,
            Entry::Output { .. } => KIND_OUTPUT,
            Entry::End { .. } => KIND_END,
        }
    }

    /// The exit index the entry belongs to (0 for the header).
    pub fn exit(&self) -> u64 {
        match self {
            Entry::Header { .. } => 0,
            Entry::Read { exit, .. }
            | Entry::Write { exit, .. }
            | Entry::Digest { exit, .. }
            | Entry::Control { exit, .. }
            | Entry::Output { exit, .. }
            | Entry::End { exit, .. } => *exit,
        }
    }

    /// Payload length of the encoded entry.
    pub fn encoded_len(&self) -> usize {
        match self {
            Entry::Header { .. } => 24,
            Entry::Read { .. } => 24,
            Entry::Write { data, .. } => WRITE_HEADER_LEN + data.len(),
            Entry::Digest { .. } => 32,
            Entry::Control { .. } => 24,
            Entry::Output { .. } => OUTPUT_LEN,
            Entry::End { .. } => 32,
        }
    }

    /// Encodes the entry into `p` (exactly [`Entry::encoded_len`] bytes).
    pub fn encode(&self, p: &mut [u8]) {
        match self {
            Entry::Header {
                version,
                digest_interval,
                mem_digest_every,
            } => {
                put(p, 0, u64::from(*version));
                put(p, 8, *digest_interval);
                put(p, 16, *mem_digest_every);
            }
            Entry::Read { exit, addr, value } => {
                put(p, 0, *exit);
                put(p, 8, *addr);
                put(p, 16, *value);
            }
            Entry::Write { exit, gpa, data } => encode_write(p, *exit, *gpa, data),
            Entry::Digest { exit, regs, mem } => {
                put(p, 0, *exit);
                put(p, 8, *regs);
                put(p, 16, u64::from(mem.is_some()));
                put(p, 24, mem.unwrap_or(0));
            }
            Entry::Control { exit, key, value } => {
                put(p, 0, *exit);
                put(p, 8, u64::from(*key));
                put(p, 16, *value);
            }
            Entry::Output { exit, digest } => encode_output(p, *exit, digest),
            Entry::End {
                exit,
                code,
                regs,
                mem,
            } => {
                put(p, 0, *exit);
                put(p, 8, *code);
                put(p, 16, *regs);
                put(p, 24, *mem);
            }
        }
    }

    /// Decodes a record of kind `kind` with payload `p`.
    ///
    /// # Errors
    /// [`LogError`] for an unknown kind, a bad length or an unsupported version.
    pub fn decode(kind: u16, p: &[u8]) -> Result<Entry, LogError> {
        let need = |n: usize| {
            if p.len() == n {
                Ok(())
            } else {
                Err(LogError::BadLength { kind, len: p.len() })
            }
        };
        Ok(match kind {
            KIND_HEADER => {
                need(24)?;
                let version = u64_at(p, 0);
                if version != u64::from(LOG_VERSION) {
                    return Err(LogError::Version(version as u32));
                }
                Entry::Header {
                    version: LOG_VERSION,
                    digest_interval: u64_at(p, 8),
                    mem_digest_every: u64_at(p, 16),
                }
            }
            KIND_READ => {
                need(24)?;
                Entry::Read {
                    exit: u64_at(p, 0),
                    addr: u64_at(p, 8),
                    value: u64_at(p, 16),
                }
            }
            KIND_WRITE => {
                let (exit, gpa, data) = decode_write(p)?;
                Entry::Write {
                    exit,
                    gpa,
                    data: data.to_vec(),
                }
            }
            KIND_DIGEST => {
                need(32)?;
                Entry::Digest {
                    exit: u64_at(p, 0),
                    regs: u64_at(p, 8),
                    mem: (u64_at(p, 16) != 0).then(|| u64_at(p, 24)),
                }
            }
            KIND_CONTROL => {
                need(24)?;
                let key = u64_at(p, 8);
                Entry::Control {
                    exit: u64_at(p, 0),
                    key: u32::try_from(key)
                        .map_err(|_| LogError::BadLength { kind, len: p.len() })?,
                    value: u64_at(p, 16),
                }
            }
            KIND_OUTPUT => {
                need(OUTPUT_LEN)?;
                let what = u64_at(p, 8);
                let source = OutputSource::from_code(what as u8)
                    .filter(|_| what & 0xffff_ff00 == 0)
                    .ok_or(LogError::BadOutputSource(what as u32))?;
                Entry::Output {
                    exit: u64_at(p, 0),
                    digest: OutputDigest {
                        source,
                        count: (what >> 32) as u32,
                        bytes: u64_at(p, 16),
                        hash: u64_at(p, 24),
                    },
                }
            }
            KIND_END => {
                need(32)?;
                Entry::End {
                    exit: u64_at(p, 0),
                    code: u64_at(p, 8),
                    regs: u64_at(p, 16),
                    mem: u64_at(p, 24),
                }
            }
            other => return Err(LogError::UnknownKind(other)),
        })
    }
}

/// A control setting applied at a checkpoint (see [`ControlQueue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedControl {
    /// The exit index (a checkpoint: exits handled when it was applied).
    pub exit: u64,
    /// The key.
    pub key: u32,
    /// The value.
    pub value: u64,
}

/// How many applied controls a [`ControlQueue`] keeps (the count goes on).
pub const KEPT_CONTROLS: usize = 1 << 16;

type ControlHandler = Box<dyn FnMut(AppliedControl) + Send>;

#[derive(Default)]
struct ControlInner {
    pending: Mutex<VecDeque<(u32, u64)>>,
    applied: Mutex<(Vec<AppliedControl>, u64)>,
    handler: Mutex<Option<ControlHandler>>,
}

/// Settings that must take effect at the same point of the guest's execution on both sides of a
/// pair (e.g. a vCPU throttle): whoever decides [`push`](ControlQueue::push)es `(key, value)`
/// on the primary's queue ([`LogWriter::controls`](super::primary::LogWriter::controls)); at its
/// next checkpoint the primary logs each pending one as an [`Entry::Control`] at the current
/// exit index and applies it; the backup applies it when it reaches the same exit
/// ([`LogReader::controls`](super::backup::LogReader::controls)). "Applying" calls the handler
/// set with [`on_apply`](ControlQueue::on_apply) and appends to [`applied`](ControlQueue::applied).
///
/// Cheap to clone (shared). The handler runs on the vCPU thread: keep it short.
#[derive(Clone, Default)]
pub struct ControlQueue(Arc<ControlInner>);

impl fmt::Debug for ControlQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlQueue")
            .field("pending", &self.pending())
            .field("applied", &self.applied_count())
            .finish()
    }
}

impl ControlQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `(key, value)` for the next checkpoint (primary).
    pub fn push(&self, key: u32, value: u64) {
        self.0
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((key, value));
    }

    /// Controls queued, not yet logged.
    pub fn pending(&self) -> usize {
        self.0
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Sets the function called (on the vCPU thread) for every control applied from now on.
    pub fn on_apply(&self, handler: impl FnMut(AppliedControl) + Send + 'static) {
        *self.0.handler.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(handler));
    }

    /// The controls applied so far, in order (the first [`KEPT_CONTROLS`]).
    pub fn applied(&self) -> Vec<AppliedControl> {
        self.0
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// How many controls were applied.
    pub fn applied_count(&self) -> u64 {
        self.0.applied.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// Takes every pending control (primary, at a checkpoint).
    pub(crate) fn take_pending(&self) -> Vec<(u32, u64)> {
        self.0
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect()
    }

    /// Applies one control: calls the handler, records it.
    pub(crate) fn apply(&self, c: AppliedControl) {
        tracing::debug!(
            exit = c.exit,
            key = c.key,
            value = c.value,
            "control applied"
        );
        if let Some(h) = self
            .0
            .handler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            h(c);
        }
        let mut a = self.0.applied.lock().unwrap_or_else(|e| e.into_inner());
        if a.0.len() < KEPT_CONTROLS {
            a.0.push(c);
        }
        a.1 += 1;
    }
}

/// Encodes an output entry in place (`p` is [`OUTPUT_LEN`] bytes).
pub fn encode_output(p: &mut [u8], exit: u64, digest: &OutputDigest) {
    put(p, 0, exit);
    put(
        p,
        8,
        u64::from(digest.source as u8) | u64::from(digest.count) << 32,
    );
    put(p, 16, digest.bytes);
    put(p, 24, digest.hash);
}

/// Decodes a `Write` entry's payload in place: (exit, gpa, the data, borrowed from `p`).
///
/// # Errors
/// [`LogError::BadLength`] if `p` is shorter than the entry's header.
pub fn decode_write(p: &[u8]) -> Result<(u64, u64, &[u8]), LogError> {
    if p.len() < WRITE_HEADER_LEN {
        return Err(LogError::BadLength {
            kind: KIND_WRITE,
            len: p.len(),
        });
    }
    Ok((u64_at(p, 0), u64_at(p, 8), &p[WRITE_HEADER_LEN..]))
}

/// Encodes a write entry in place (`p` is `WRITE_HEADER_LEN + data.len()` bytes).
pub fn encode_write(p: &mut [u8], exit: u64, gpa: u64, data: &[u8]) {
    put(p, 0, exit);
    put(p, 8, gpa);
    p[WRITE_HEADER_LEN..WRITE_HEADER_LEN + data.len()].copy_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let entries = [
            Entry::Header {
                version: LOG_VERSION,
                digest_interval: 1000,
                mem_digest_every: 4,
            },
            Entry::Read {
                exit: 3,
                addr: 0xD000_0008,
                value: 42,
            },
            Entry::Write {
                exit: 9,
                gpa: 0x5000,
                data: b"abc".to_vec(),
            },
            Entry::Digest {
                exit: 1000,
                regs: 7,
                mem: None,
            },
            Entry::Digest {
                exit: 2000,
                regs: 7,
                mem: Some(0),
            },
            Entry::Control {
                exit: 2000,
                key: 7,
                value: u64::MAX,
            },
            Entry::Output {
                exit: 2001,
                digest: OutputDigest {
                    source: OutputSource::Disk,
                    count: u32::MAX,
                    bytes: 1 << 40,
                    hash: 0xdead_beef_0123_4567,
                },
            },
            Entry::End {
                exit: 2001,
                code: 0,
                regs: 1,
                mem: 2,
            },
        ];
        for e in entries {
            let mut buf = vec![0u8; e.encoded_len()];
            e.encode(&mut buf);
            assert_eq!(Entry::decode(e.kind(), &buf), Ok(e.clone()));
        }
    }

    #[test]
    fn bad_records_are_rejected() {
        assert_eq!(Entry::decode(99, &[]), Err(LogError::UnknownKind(99)));
        assert_eq!(
            Entry::decode(KIND_READ, &[0; 23]),
            Err(LogError::BadLength {
                kind: KIND_READ,
                len: 23
            })
        );
        let mut h = [0u8; 24];
        h[0] = 7;
        assert_eq!(Entry::decode(KIND_HEADER, &h), Err(LogError::Version(7)));
        let mut c = [0u8; 24];
        c[12] = 1; // key above u32::MAX
        assert!(Entry::decode(KIND_CONTROL, &c).is_err());
        let mut o = [0u8; OUTPUT_LEN];
        assert_eq!(
            Entry::decode(KIND_OUTPUT, &o),
            Err(LogError::BadOutputSource(0))
        );
        o[8] = 2;
        o[9] = 1; // bits 8..32 of `what` are reserved
        assert_eq!(
            Entry::decode(KIND_OUTPUT, &o),
            Err(LogError::BadOutputSource(0x102))
        );
        o[9] = 0;
        assert!(Entry::decode(KIND_OUTPUT, &o).is_ok());
        assert!(Entry::decode(KIND_OUTPUT, &o[..31]).is_err());
    }

    #[test]
    fn control_queue_applies_in_order() {
        let q = ControlQueue::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        q.on_apply(move |c| s2.lock().unwrap().push(c.key));
        q.push(1, 10);
        q.push(2, 20);
        assert_eq!(q.pending(), 2);
        for (key, value) in q.take_pending() {
            q.apply(AppliedControl {
                exit: 5,
                key,
                value,
            });
        }
        assert_eq!(q.pending(), 0);
        assert_eq!(*seen.lock().unwrap(), vec![1, 2]);
        assert_eq!(q.applied_count(), 2);
        assert_eq!(
            q.applied()[1],
            AppliedControl {
                exit: 5,
                key: 2,
                value: 20
            }
        );
    }
}
