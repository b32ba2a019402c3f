//! The replication log's entry format (ft/LOG_FORMAT.md, version [`LOG_VERSION`]).
//!
//! Every entry is one record of the log buffer: the record's `kind` says which entry it is and
//! its payload is the entry's wire struct — `#[repr(C)]`, little-endian `u64` fields, no padding
//! ([`wire`]); payload lengths are the structs' sizes. Entries are encoded **in place** into a
//! claimed record ([`Entry::encode`], [`encode_write`], [`encode_output`]) and decoded from a
//! received record ([`Entry::decode`], [`decode_write`]).

use std::collections::VecDeque;
use std::fmt;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use zerocopy::{FromBytes, IntoBytes};

use ftvm_vmm_core::record::{OutputDigest, OutputSource};

/// The entries' payloads as they are on the wire (LOG_FORMAT.md). `zerocopy` checks at compile
/// time that each is plain bytes without padding, so encoding is a copy of the struct and
/// decoding a length check and a copy back (the fields are `U64`: little-endian, alignment 1,
/// so a payload at any offset of the ring reads in place).
pub mod wire {
    use zerocopy::little_endian::U64;
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

    /// [`Entry::Header`](super::Entry::Header).
    #[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
    #[repr(C)]
    pub struct Header {
        /// The format version ([`LOG_VERSION`](super::LOG_VERSION)).
        pub version: U64,
        /// Exits between two digests.
        pub digest_interval: U64,
        /// Every how many digests memory is included.
        pub mem_digest_every: U64,
    }

    /// [`Entry::Read`](super::Entry::Read).
    #[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
    #[repr(C)]
    pub struct Read {
        /// Exit index.
        pub exit: U64,
        /// MMIO address.
        pub addr: U64,
        /// The value read.
        pub value: U64,
    }

    /// The fixed part of [`Entry::Write`](super::Entry::Write); the bytes follow.
    #[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
    #[repr(C)]
    pub struct WriteHeader {
        /// Exit index.
        pub exit: U64,
        /// Guest-physical address.
        pub gpa: U64,
    }

    /// [`Entry::Digest`](super::Entry::Digest).
    #[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
    #[repr(C)]
    pub struct Digest {
        /// Exits handled.
        pub exit: U64,
        /// Register digest.
        pub regs: U64,
        /// 1 if `mem` holds a memory digest, else 0.
        pub has_mem: U64,
        /// Memory digest (0 without one).
        pub mem: U64,
    }

    /// [`Entry::Control`](super::Entry::Control).
    #[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
    #[repr(C)]
    pub struct Control {
        /// Exits handled.
        pub exit: U64,
        /// The key (at most `u32::MAX`).
        pub key: U64,
        /// The value.
        pub value: U64,
    }

    /// [`Entry::Output`](super::Entry::Output).
    #[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
    #[repr(C)]
    pub struct Output {
        /// Exit index.
        pub exit: U64,
        /// The source's code in bits 0..8 (bits 8..32 zero), the output count in bits 32..64.
        pub what: U64,
        /// Bytes digested.
        pub bytes: U64,
        /// XXH3-64 of the outputs.
        pub hash: U64,
    }

    /// [`Entry::End`](super::Entry::End).
    #[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
    #[repr(C)]
    pub struct End {
        /// Exits handled.
        pub exit: U64,
        /// Power-off code.
        pub code: U64,
        /// Register digest.
        pub regs: U64,
        /// Memory digest.
        pub mem: U64,
    }
}

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
/// Payload length of an [`Entry::Output`] ([`wire::Output`]).
pub const OUTPUT_LEN: usize = size_of::<wire::Output>();

/// Payload length of an [`Entry::Read`] ([`wire::Read`]).
pub const READ_LEN: usize = size_of::<wire::Read>();

/// Fixed part of a [`Entry::Write`] payload ([`wire::WriteHeader`]: exit, gpa).
pub const WRITE_HEADER_LEN: usize = size_of::<wire::WriteHeader>();

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
    match addr.wrapping_sub(ftvm_vmm_core::memory::MMIO_BASE) / ftvm_vmm_core::bus::DEVICE_SIZE {
        0 => "sys",
        1 => "virtio-net",
        2 => "virtio-blk",
        3 => "virtio-console",
        _ => "unmapped",
    }
}

/// Writes `v`'s bytes at the start of `p` (an encoder's buffer is exactly the entry's length:
/// a shorter one is a bug of the caller).
fn put_struct<T: IntoBytes + zerocopy::Immutable>(p: &mut [u8], v: &T) {
    v.write_to_prefix(p)
        .expect("an entry's buffer holds at least its wire struct");
}

/// Reads a `T` that must fill `p` exactly.
fn read_exact<T: FromBytes>(kind: u16, p: &[u8]) -> Result<T, LogError> {
    T::read_from_bytes(p).map_err(|_| LogError::BadLength { kind, len: p.len() })
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
            Entry::Header { .. } => size_of::<wire::Header>(),
            Entry::Read { .. } => READ_LEN,
            Entry::Write { data, .. } => WRITE_HEADER_LEN + data.len(),
            Entry::Digest { .. } => size_of::<wire::Digest>(),
            Entry::Control { .. } => size_of::<wire::Control>(),
            Entry::Output { .. } => OUTPUT_LEN,
            Entry::End { .. } => size_of::<wire::End>(),
        }
    }

    /// Encodes the entry into `p` (exactly [`Entry::encoded_len`] bytes).
    pub fn encode(&self, p: &mut [u8]) {
        match self {
            Entry::Header {
                version,
                digest_interval,
                mem_digest_every,
            } => put_struct(
                p,
                &wire::Header {
                    version: u64::from(*version).into(),
                    digest_interval: (*digest_interval).into(),
                    mem_digest_every: (*mem_digest_every).into(),
                },
            ),
            Entry::Read { exit, addr, value } => encode_read(p, *exit, *addr, *value),
            Entry::Write { exit, gpa, data } => encode_write(p, *exit, *gpa, data),
            Entry::Digest { exit, regs, mem } => put_struct(
                p,
                &wire::Digest {
                    exit: (*exit).into(),
                    regs: (*regs).into(),
                    has_mem: u64::from(mem.is_some()).into(),
                    mem: mem.unwrap_or(0).into(),
                },
            ),
            Entry::Control { exit, key, value } => put_struct(
                p,
                &wire::Control {
                    exit: (*exit).into(),
                    key: u64::from(*key).into(),
                    value: (*value).into(),
                },
            ),
            Entry::Output { exit, digest } => encode_output(p, *exit, digest),
            Entry::End {
                exit,
                code,
                regs,
                mem,
            } => put_struct(
                p,
                &wire::End {
                    exit: (*exit).into(),
                    code: (*code).into(),
                    regs: (*regs).into(),
                    mem: (*mem).into(),
                },
            ),
        }
    }

    /// Decodes a record of kind `kind` with payload `p`.
    ///
    /// # Errors
    /// [`LogError`] for an unknown kind, a bad length or an unsupported version.
    pub fn decode(kind: u16, p: &[u8]) -> Result<Entry, LogError> {
        Ok(match kind {
            KIND_HEADER => {
                let h: wire::Header = read_exact(kind, p)?;
                let version = h.version.get();
                if version != u64::from(LOG_VERSION) {
                    return Err(LogError::Version(version as u32));
                }
                Entry::Header {
                    version: LOG_VERSION,
                    digest_interval: h.digest_interval.get(),
                    mem_digest_every: h.mem_digest_every.get(),
                }
            }
            KIND_READ => {
                let r: wire::Read = read_exact(kind, p)?;
                Entry::Read {
                    exit: r.exit.get(),
                    addr: r.addr.get(),
                    value: r.value.get(),
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
                let d: wire::Digest = read_exact(kind, p)?;
                Entry::Digest {
                    exit: d.exit.get(),
                    regs: d.regs.get(),
                    mem: (d.has_mem.get() != 0).then(|| d.mem.get()),
                }
            }
            KIND_CONTROL => {
                let c: wire::Control = read_exact(kind, p)?;
                Entry::Control {
                    exit: c.exit.get(),
                    key: u32::try_from(c.key.get())
                        .map_err(|_| LogError::BadLength { kind, len: p.len() })?,
                    value: c.value.get(),
                }
            }
            KIND_OUTPUT => {
                let o: wire::Output = read_exact(kind, p)?;
                let what = o.what.get();
                let source = OutputSource::from_code(what as u8)
                    .filter(|_| what & 0xffff_ff00 == 0)
                    .ok_or(LogError::BadOutputSource(what as u32))?;
                Entry::Output {
                    exit: o.exit.get(),
                    digest: OutputDigest {
                        source,
                        count: (what >> 32) as u32,
                        bytes: o.bytes.get(),
                        hash: o.hash.get(),
                    },
                }
            }
            KIND_END => {
                let e: wire::End = read_exact(kind, p)?;
                Entry::End {
                    exit: e.exit.get(),
                    code: e.code.get(),
                    regs: e.regs.get(),
                    mem: e.mem.get(),
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

/// Encodes a read entry in place (`p` is [`READ_LEN`] bytes).
pub fn encode_read(p: &mut [u8], exit: u64, addr: u64, value: u64) {
    put_struct(
        p,
        &wire::Read {
            exit: exit.into(),
            addr: addr.into(),
            value: value.into(),
        },
    );
}

/// Encodes an output entry in place (`p` is [`OUTPUT_LEN`] bytes).
pub fn encode_output(p: &mut [u8], exit: u64, digest: &OutputDigest) {
    put_struct(
        p,
        &wire::Output {
            exit: exit.into(),
            what: (u64::from(digest.source as u8) | u64::from(digest.count) << 32).into(),
            bytes: digest.bytes.into(),
            hash: digest.hash.into(),
        },
    );
}

/// Encodes a write entry in place (`p` is `WRITE_HEADER_LEN + data.len()` bytes).
pub fn encode_write(p: &mut [u8], exit: u64, gpa: u64, data: &[u8]) {
    put_struct(
        p,
        &wire::WriteHeader {
            exit: exit.into(),
            gpa: gpa.into(),
        },
    );
    p[WRITE_HEADER_LEN..WRITE_HEADER_LEN + data.len()].copy_from_slice(data);
}

/// Decodes a `Write` entry's payload in place: (exit, gpa, the data, borrowed from `p`).
///
/// # Errors
/// [`LogError::BadLength`] if `p` is shorter than the entry's header.
pub fn decode_write(p: &[u8]) -> Result<(u64, u64, &[u8]), LogError> {
    let (h, data) = wire::WriteHeader::read_from_prefix(p).map_err(|_| LogError::BadLength {
        kind: KIND_WRITE,
        len: p.len(),
    })?;
    Ok((h.exit.get(), h.gpa.get(), data))
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

    /// The wire structs are the layout LOG_FORMAT.md documents: little-endian fields at the
    /// documented offsets, no padding (the sizes are the payload lengths of version 3).
    #[test]
    fn wire_layout_is_the_documented_one() {
        assert_eq!(size_of::<wire::Header>(), 24);
        assert_eq!(READ_LEN, 24);
        assert_eq!(WRITE_HEADER_LEN, 16);
        assert_eq!(size_of::<wire::Digest>(), 32);
        assert_eq!(size_of::<wire::Control>(), 24);
        assert_eq!(OUTPUT_LEN, 32);
        assert_eq!(size_of::<wire::End>(), 32);
        let mut p = [0u8; READ_LEN];
        encode_read(&mut p, 0x0102, 0xD000_0008, u64::MAX - 1);
        assert_eq!(p[..8], 0x0102u64.to_le_bytes());
        assert_eq!(p[8..16], 0xD000_0008u64.to_le_bytes());
        assert_eq!(p[16..], (u64::MAX - 1).to_le_bytes());
        let mut w = [0u8; WRITE_HEADER_LEN + 3];
        encode_write(&mut w, 9, 0x5000, b"abc");
        assert_eq!(decode_write(&w), Ok((9, 0x5000, &b"abc"[..])));
        assert!(decode_write(&w[..15]).is_err());
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
