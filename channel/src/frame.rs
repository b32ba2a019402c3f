//! The wire format: frame header, the six frame types, encoding and checked decoding.
//!
//! Every frame, whatever the transport (see `PROTOCOL.md` for the full description):
//!
//! ```text
//!  0        2     3     4            8                    16          20          24
//!  ┌────────┬─────┬─────┬────────────┬────────────────────┬───────────┬───────────┬──────── ─ ─
//!  │ magic  │ ver │type │ body_len   │ generation         │ crc32c    │ reserved  │ body
//!  │ u16    │ u8  │ u8  │ u32        │ u64                │ u32       │ u32 (0)   │ body_len bytes
//!  └────────┴─────┴─────┴────────────┴────────────────────┴───────────┴───────────┴──────── ─ ─
//!
//!  DATA body                                   ACK body                       HEARTBEAT body
//!  0          8        12         14        16 0          8         16         0
//!  ┌──────────┬────────┬──────────┬─────────┬─ ┌──────────┬─────────┬────────┐ ┌──────────┐
//!  │first_seq │ count  │frag_index│frag_cnt │… │ acked    │executed │ flags  │ │ nonce    │
//!  │ u64      │ u32    │ u16      │ u16     │  │ u64      │ u64     │ u64    │ │ u64      │
//!  └──────────┴────────┴──────────┴─────────┴─ └──────────┴─────────┴────────┘ └──────────┘
//!  then `count` records in the log buffer's own format (8-byte header: len u24, kind u8, the
//!  low 32 bits of seq; then the payload), back to back without alignment padding — or, when
//!  frag_cnt > 1, fragment `frag_index` of one such record.
//!
//!  HELLO body (76 bytes + settings)
//!  0    1      4          8          16           24        32         40                72          76
//!  ┌────┬──────┬──────────┬──────────┬────────────┬─────────┬──────────┬─────────────────┬───────────┬──────── ─ ─
//!  │role│ pad  │max_frame │ capacity │ max_payload│ seq     │ executed │ pairing digest  │settings_len│ settings
//!  │ u8 │ [3]  │ u32      │ u64      │ u64        │ u64     │ u64      │ [u8; 32]        │ u32       │ (opaque)
//!  └────┴──────┴──────────┴──────────┴────────────┴─────────┴──────────┴─────────────────┴───────────┴──────── ─ ─
//!  REFUSE body: reason u32, then a UTF-8 explanation.
//!  GOODBYE body: reason u32 (GoodbyeReason), then a UTF-8 explanation.
//! ```
//!
//! The CRC32C covers bytes 0..16, 20..24 and the body. All integers are little-endian. The magic
//! and version fields keep their place in every future version, so a peer can always tell
//! "different version" from "garbage".

use ftvm_ringbuf::layout::{split_header, KIND_PADDING, RECORD_HEADER_LEN};

/// Frame magic number.
pub const MAGIC: u16 = 0xF7C1;
/// Protocol version spoken by this code. (3: records carry the log buffer's 8-byte header;
/// 4: the HELLO carries an opaque, length-delimited settings blob; the GOODBYE frame.)
pub const VERSION: u8 = 4;
/// Length of the frame header.
pub const HEADER_LEN: usize = 24;
/// Offset of the magic (u16).
pub const MAGIC_OFFSET: usize = 0;
/// Offset of the protocol version (u8).
pub const VERSION_OFFSET: usize = 2;
/// Offset of the frame type (u8).
pub const TYPE_OFFSET: usize = 3;
/// Offset of the body length (u32).
pub const BODY_LEN_OFFSET: usize = 4;
/// Offset of the replication generation (u64).
pub const GENERATION_OFFSET: usize = 8;
/// Offset of the CRC32C (u32).
pub const CRC_OFFSET: usize = 16;
/// Offset of the reserved word (u32, zero).
pub const RESERVED_OFFSET: usize = 20;

/// Length of the DATA body header (before the records).
pub const DATA_HEADER_LEN: usize = 16;
/// Length of the ACK body.
pub const ACK_BODY_LEN: usize = 24;
/// Mask of the ACK `flags` word holding the number of frames the backup dropped beyond a gap
/// since its previous ack (a loss signal: the sender retransmits at once after a few).
pub const ACK_GAP_MASK: u64 = 0xFFFF_FFFF;
/// Shift of the ACK `flags` field holding how many records are missing right after `acked`
/// while the backup holds frames beyond them (0: it holds none). Version 2.
pub const ACK_MISSING_SHIFT: u32 = 32;
/// Length of the HEARTBEAT body.
pub const HEARTBEAT_BODY_LEN: usize = 8;
/// Length of the HELLO body before the settings blob (the fixed fields and `settings_len`).
pub const HELLO_BODY_LEN: usize = 76;
/// Offset of `settings_len` (u32) in the HELLO body; the settings follow it.
pub const HELLO_SETTINGS_LEN_OFFSET: usize = 72;
/// Largest settings blob a HELLO carries (so that a HELLO fits in every transport's frame,
/// AF_XDP's ~1500 bytes included).
pub const MAX_SETTINGS_LEN: usize = 1024;
/// Length of the pairing digest.
pub const DIGEST_LEN: usize = 32;
/// Smallest `max_frame` the protocol works with (a HELLO must fit, and a fragment must carry
/// at least a few bytes).
pub const MIN_FRAME: usize = 128;

/// The frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Handshake: each side's parameters.
    Hello = 1,
    /// Handshake refused, with a reason.
    Refuse = 2,
    /// Log records (or one fragment of a record).
    Data = 3,
    /// Cumulative acknowledgement plus the backup's executed position.
    Ack = 4,
    /// Keep-alive.
    Heartbeat = 5,
    /// A side leaves the pair on purpose, with a reason (version 4).
    Goodbye = 6,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::Refuse,
            3 => Self::Data,
            4 => Self::Ack,
            5 => Self::Heartbeat,
            6 => Self::Goodbye,
            _ => return None,
        })
    }
}

/// A GOODBYE: the peer left the pair on purpose, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Goodbye {
    /// Why it left.
    pub reason: GoodbyeReason,
    /// Its explanation.
    pub text: String,
}

impl std::fmt::Display for Goodbye {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.text)
    }
}

/// Why a side leaves the pair (the GOODBYE frame's `reason`, PROTOCOL.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GoodbyeReason {
    /// A planned stop (an operator's request, e.g. SIGTERM): the side stops, it did not fail.
    PlannedStop = 1,
    /// The backup can no longer take over (its own copy of the disk failed: the copy is
    /// incomplete); the primary goes on as if the backup had failed.
    CannotTakeOver = 2,
}

impl GoodbyeReason {
    /// The reason with this code, if it is one.
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::PlannedStop),
            2 => Some(Self::CannotTakeOver),
            _ => None,
        }
    }
}

impl std::fmt::Display for GoodbyeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::PlannedStop => "planned stop",
            Self::CannotTakeOver => "cannot take over",
        })
    }
}

/// Why a frame was rejected by the decoder (each reason has its own drop counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than its header or than the body length it announces.
    #[error("truncated frame")]
    Truncated,
    /// Wrong magic or unknown frame type.
    #[error("not a frame (bad magic or type)")]
    BadHeader,
    /// The peer speaks another protocol version.
    #[error("protocol version {found}, expected {VERSION}")]
    Version {
        /// The version in the frame.
        found: u8,
    },
    /// Checksum mismatch.
    #[error("CRC32C mismatch")]
    Crc,
    /// The body does not parse (wrong length, inconsistent counts, malformed records).
    #[error("malformed body: {0}")]
    BadBody(&'static str),
}

/// Role announced in a HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// The sending side (primary).
    Primary = 0,
    /// The receiving side (backup).
    Backup = 1,
}

/// The parameters exchanged in a HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Who sends it.
    pub role: Role,
    /// Largest frame the sender of the HELLO accepts.
    pub max_frame: u32,
    /// Its log buffer's capacity.
    pub capacity: u64,
    /// Its log buffer's largest record payload.
    pub max_payload: u64,
    /// Primary: sequence number of its oldest unacknowledged record. Backup: next sequence
    /// number it expects (0 = fresh, take whatever the primary has).
    pub seq: u64,
    /// Backup: the last record it executed (0 = none). Primary: 0.
    pub executed: u64,
    /// Opaque digest identifying what is replicated (the guest image); must match.
    pub digest: [u8; DIGEST_LEN],
}

/// DATA frame body header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    /// Sequence number of the first (or only) record.
    pub first_seq: u64,
    /// Number of whole records (1 for a fragment).
    pub count: u32,
    /// Index of this fragment (0 when not fragmented).
    pub frag_index: u16,
    /// Number of fragments of the record (1 when not fragmented).
    pub frag_count: u16,
}

/// A decoded, checksum-verified frame borrowing the received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Handshake parameters.
    Hello {
        /// The fixed parameters.
        hello: Hello,
        /// The sender's settings blob (opaque to the channel; the VMM compares it).
        settings: &'a [u8],
    },
    /// Handshake refused.
    Refuse {
        /// Machine-readable reason code.
        reason: u32,
        /// Human-readable explanation.
        text: &'a str,
    },
    /// Records or a fragment.
    Data {
        /// The body header.
        header: DataHeader,
        /// The records (or the fragment bytes).
        payload: &'a [u8],
    },
    /// Cumulative acknowledgement.
    Ack {
        /// Every record with a sequence number ≤ this is in the backup's log buffer.
        acked: u64,
        /// Every record with a sequence number ≤ this was executed by the backup.
        executed: u64,
        /// Frames the backup dropped beyond a gap since its previous ack.
        gap: u32,
        /// Records missing right after `acked` while the backup holds frames beyond them
        /// (records `acked + 1 ..= acked + missing`): the sender resends just those. 0: none.
        missing: u32,
    },
    /// Keep-alive.
    Heartbeat {
        /// Opaque value.
        nonce: u64,
    },
    /// The sender leaves the pair.
    Goodbye {
        /// Why.
        reason: GoodbyeReason,
        /// Human-readable explanation.
        text: &'a str,
    },
}

/// A frame with its header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// Generation in the header.
    pub generation: u64,
    /// The frame.
    pub frame: Frame<'a>,
}

#[inline]
fn rd_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
#[inline]
fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
#[inline]
fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn checksum(frame: &[u8]) -> u32 {
    let c = crc32c::crc32c(&frame[..CRC_OFFSET]);
    crc32c::crc32c_append(c, &frame[RESERVED_OFFSET..])
}

/// Reads the version and type bytes of anything that starts with the frame magic, before any
/// other check (used by the handshake to report "different version" clearly).
pub fn peek_version_type(bytes: &[u8]) -> Option<(u8, u8)> {
    if bytes.len() < HEADER_LEN || rd_u16(bytes, MAGIC_OFFSET) != MAGIC {
        return None;
    }
    Some((bytes[VERSION_OFFSET], bytes[TYPE_OFFSET]))
}

/// Decodes and verifies one frame.
///
/// # Errors
/// A [`FrameError`] naming why the bytes are not a valid frame. Never panics, whatever the
/// input.
pub fn decode(bytes: &[u8]) -> Result<Decoded<'_>, FrameError> {
    if bytes.len() < HEADER_LEN {
        return Err(FrameError::Truncated);
    }
    if rd_u16(bytes, MAGIC_OFFSET) != MAGIC {
        return Err(FrameError::BadHeader);
    }
    let version = bytes[VERSION_OFFSET];
    if version != VERSION {
        return Err(FrameError::Version { found: version });
    }
    let ty = FrameType::from_u8(bytes[TYPE_OFFSET]).ok_or(FrameError::BadHeader)?;
    let body_len = rd_u32(bytes, BODY_LEN_OFFSET) as usize;
    if bytes.len() - HEADER_LEN < body_len {
        return Err(FrameError::Truncated);
    }
    if bytes.len() - HEADER_LEN > body_len {
        return Err(FrameError::BadBody("trailing bytes after the body"));
    }
    if rd_u32(bytes, CRC_OFFSET) != checksum(bytes) {
        return Err(FrameError::Crc);
    }
    let generation = rd_u64(bytes, GENERATION_OFFSET);
    let body = &bytes[HEADER_LEN..];
    let frame = match ty {
        FrameType::Hello => {
            if body.len() < HELLO_BODY_LEN {
                return Err(FrameError::BadBody("HELLO length"));
            }
            let role = match body[0] {
                0 => Role::Primary,
                1 => Role::Backup,
                _ => return Err(FrameError::BadBody("HELLO role")),
            };
            let mut digest = [0u8; DIGEST_LEN];
            digest.copy_from_slice(&body[40..72]);
            let settings_len = rd_u32(body, HELLO_SETTINGS_LEN_OFFSET) as usize;
            if settings_len > MAX_SETTINGS_LEN || body.len() != HELLO_BODY_LEN + settings_len {
                return Err(FrameError::BadBody("HELLO settings length"));
            }
            Frame::Hello {
                hello: Hello {
                    role,
                    max_frame: rd_u32(body, 4),
                    capacity: rd_u64(body, 8),
                    max_payload: rd_u64(body, 16),
                    seq: rd_u64(body, 24),
                    executed: rd_u64(body, 32),
                    digest,
                },
                settings: &body[HELLO_BODY_LEN..],
            }
        }
        FrameType::Refuse => {
            let (reason, text) =
                reason_and_text(body, ("REFUSE length", "REFUSE text is not UTF-8"))?;
            Frame::Refuse { reason, text }
        }
        FrameType::Goodbye => {
            let (reason, text) =
                reason_and_text(body, ("GOODBYE length", "GOODBYE text is not UTF-8"))?;
            let reason = GoodbyeReason::from_u32(reason)
                .ok_or(FrameError::BadBody("GOODBYE reason unknown"))?;
            Frame::Goodbye { reason, text }
        }
        FrameType::Data => {
            if body.len() < DATA_HEADER_LEN {
                return Err(FrameError::BadBody("DATA length"));
            }
            let header = DataHeader {
                first_seq: rd_u64(body, 0),
                count: rd_u32(body, 8),
                frag_index: rd_u16(body, 12),
                frag_count: rd_u16(body, 14),
            };
            let payload = &body[DATA_HEADER_LEN..];
            if header.frag_count == 0
                || header.frag_index >= header.frag_count
                || (header.frag_count > 1 && header.count != 1)
                || header.count == 0
                || header.first_seq == 0
            {
                return Err(FrameError::BadBody("DATA counts"));
            }
            Frame::Data { header, payload }
        }
        FrameType::Ack => {
            if body.len() != ACK_BODY_LEN {
                return Err(FrameError::BadBody("ACK length"));
            }
            Frame::Ack {
                acked: rd_u64(body, 0),
                executed: rd_u64(body, 8),
                gap: (rd_u64(body, 16) & ACK_GAP_MASK) as u32,
                missing: (rd_u64(body, 16) >> ACK_MISSING_SHIFT) as u32,
            }
        }
        FrameType::Heartbeat => {
            if body.len() != HEARTBEAT_BODY_LEN {
                return Err(FrameError::BadBody("HEARTBEAT length"));
            }
            Frame::Heartbeat {
                nonce: rd_u64(body, 0),
            }
        }
    };
    Ok(Decoded { generation, frame })
}

/// The body of a REFUSE or GOODBYE frame: a `u32` reason, then UTF-8 text; `bad`: the
/// [`FrameError::BadBody`] texts for a body too short and for text that is not UTF-8.
fn reason_and_text<'a>(
    body: &'a [u8],
    bad: (&'static str, &'static str),
) -> Result<(u32, &'a str), FrameError> {
    let (Some(reason), Some(text)) = (body.first_chunk::<4>(), body.get(4..)) else {
        return Err(FrameError::BadBody(bad.0));
    };
    let text = std::str::from_utf8(text).map_err(|_| FrameError::BadBody(bad.1))?;
    Ok((u32::from_le_bytes(*reason), text))
}

/// Starts a frame of type `ty` in `buf` (cleared first); append the body, then [`finish`].
pub fn begin(buf: &mut Vec<u8>, ty: FrameType, generation: u64) {
    buf.clear();
    buf.extend_from_slice(&MAGIC.to_le_bytes());
    buf.push(VERSION);
    buf.push(ty as u8);
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.extend_from_slice(&generation.to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
}

/// Fills in the body length and checksum of a frame started with [`begin`].
pub fn finish(buf: &mut [u8]) {
    let body_len = (buf.len() - HEADER_LEN) as u32;
    buf[BODY_LEN_OFFSET..BODY_LEN_OFFSET + 4].copy_from_slice(&body_len.to_le_bytes());
    let crc = checksum(buf);
    buf[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Encodes a HELLO with `settings` (at most [`MAX_SETTINGS_LEN`] bytes: the caller checks;
/// longer ones are cut there and the peer will find them malformed).
pub fn encode_hello(buf: &mut Vec<u8>, generation: u64, h: &Hello, settings: &[u8]) {
    let settings = &settings[..settings.len().min(MAX_SETTINGS_LEN)];
    begin(buf, FrameType::Hello, generation);
    buf.push(h.role as u8);
    buf.extend_from_slice(&[0; 3]);
    buf.extend_from_slice(&h.max_frame.to_le_bytes());
    buf.extend_from_slice(&h.capacity.to_le_bytes());
    buf.extend_from_slice(&h.max_payload.to_le_bytes());
    buf.extend_from_slice(&h.seq.to_le_bytes());
    buf.extend_from_slice(&h.executed.to_le_bytes());
    buf.extend_from_slice(&h.digest);
    buf.extend_from_slice(&(settings.len() as u32).to_le_bytes());
    buf.extend_from_slice(settings);
    finish(buf);
}

/// Encodes a REFUSE.
pub fn encode_refuse(buf: &mut Vec<u8>, generation: u64, reason: u32, text: &str) {
    encode_reason(buf, FrameType::Refuse, generation, reason, text);
}

/// Encodes a GOODBYE.
pub fn encode_goodbye(buf: &mut Vec<u8>, generation: u64, reason: GoodbyeReason, text: &str) {
    encode_reason(buf, FrameType::Goodbye, generation, reason as u32, text);
}

fn encode_reason(buf: &mut Vec<u8>, ty: FrameType, generation: u64, reason: u32, text: &str) {
    begin(buf, ty, generation);
    buf.extend_from_slice(&reason.to_le_bytes());
    buf.extend_from_slice(text.as_bytes());
    finish(buf);
}

/// Encodes an ACK.
pub fn encode_ack(
    buf: &mut Vec<u8>,
    generation: u64,
    acked: u64,
    executed: u64,
    gap: u32,
    missing: u32,
) {
    begin(buf, FrameType::Ack, generation);
    buf.extend_from_slice(&acked.to_le_bytes());
    buf.extend_from_slice(&executed.to_le_bytes());
    let flags = u64::from(gap) | (u64::from(missing) << ACK_MISSING_SHIFT);
    buf.extend_from_slice(&flags.to_le_bytes());
    finish(buf);
}

/// Encodes a HEARTBEAT.
pub fn encode_heartbeat(buf: &mut Vec<u8>, generation: u64, nonce: u64) {
    begin(buf, FrameType::Heartbeat, generation);
    buf.extend_from_slice(&nonce.to_le_bytes());
    finish(buf);
}

/// Starts a DATA frame; append records (or a fragment) and call [`finish_data`].
pub fn begin_data(buf: &mut Vec<u8>, generation: u64, first_seq: u64, frag: (u16, u16)) {
    begin(buf, FrameType::Data, generation);
    buf.extend_from_slice(&first_seq.to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.extend_from_slice(&frag.0.to_le_bytes());
    buf.extend_from_slice(&frag.1.to_le_bytes());
}

/// Sets the record count of a DATA frame and checksums it.
pub fn finish_data(buf: &mut [u8], count: u32) {
    let at = HEADER_LEN + 8;
    buf[at..at + 4].copy_from_slice(&count.to_le_bytes());
    finish(buf);
}

/// Writes the headers of a DATA frame into the first [`DATA_OVERHEAD`] bytes of `out`, a
/// frame of exactly `out.len()` bytes; write the records (or the fragment) after them, then
/// [`finish`] sets the body length and checksum. The in-place counterpart of [`begin_data`].
pub fn data_header(out: &mut [u8], generation: u64, first_seq: u64, count: u32, frag: (u16, u16)) {
    out[MAGIC_OFFSET..MAGIC_OFFSET + 2].copy_from_slice(&MAGIC.to_le_bytes());
    out[VERSION_OFFSET] = VERSION;
    out[TYPE_OFFSET] = FrameType::Data as u8;
    out[GENERATION_OFFSET..GENERATION_OFFSET + 8].copy_from_slice(&generation.to_le_bytes());
    out[RESERVED_OFFSET..RESERVED_OFFSET + 4].copy_from_slice(&0u32.to_le_bytes());
    let b = HEADER_LEN;
    out[b..b + 8].copy_from_slice(&first_seq.to_le_bytes());
    out[b + 8..b + 12].copy_from_slice(&count.to_le_bytes());
    out[b + 12..b + 14].copy_from_slice(&frag.0.to_le_bytes());
    out[b + 14..b + 16].copy_from_slice(&frag.1.to_le_bytes());
}

/// Fixed overhead of a DATA frame before its records.
pub const DATA_OVERHEAD: usize = HEADER_LEN + DATA_HEADER_LEN;

/// A record parsed out of a DATA frame (borrowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireRecord<'a> {
    /// The low 32 bits of the sequence number (the frame's `first_seq` gives the rest:
    /// records are numbered consecutively from it).
    pub seq_low: u32,
    /// Kind.
    pub kind: u16,
    /// Payload.
    pub payload: &'a [u8],
}

/// Parses one record (log-buffer format, unpadded) at the start of `bytes`; returns it and
/// the bytes it used.
///
/// # Errors
/// [`FrameError::BadBody`] when the header is cut or the payload overruns, or the kind is the
/// reserved padding kind.
pub fn parse_record(bytes: &[u8]) -> Result<(WireRecord<'_>, usize), FrameError> {
    let Some(header) = bytes.first_chunk::<RECORD_HEADER_LEN>() else {
        return Err(FrameError::BadBody("record header cut"));
    };
    let (len, kind, seq_low) = split_header(u64::from_le_bytes(*header));
    if kind == KIND_PADDING {
        return Err(FrameError::BadBody("padding record on the wire"));
    }
    let end = RECORD_HEADER_LEN + len;
    if end > bytes.len() {
        return Err(FrameError::BadBody("record payload overruns the frame"));
    }
    Ok((
        WireRecord {
            seq_low,
            kind,
            payload: &bytes[RECORD_HEADER_LEN..end],
        },
        end,
    ))
}

/// Checks that `payload` holds exactly `count` well-formed records numbered `first_seq`,
/// `first_seq + 1`, … (their headers carry the low 32 bits) each with at most `max_payload`
/// bytes; returns the total log-buffer bytes they need (record spans).
///
/// # Errors
/// [`FrameError::BadBody`] on any inconsistency.
pub fn validate_records(
    payload: &[u8],
    first_seq: u64,
    count: u32,
    max_payload: usize,
) -> Result<usize, FrameError> {
    let mut at = 0;
    let mut span = 0;
    for i in 0..u64::from(count) {
        let (rec, used) = parse_record(&payload[at..])?;
        if rec.seq_low != first_seq.wrapping_add(i) as u32 {
            return Err(FrameError::BadBody(
                "record sequence numbers not consecutive",
            ));
        }
        if rec.payload.len() > max_payload {
            return Err(FrameError::BadBody("record larger than the buffer accepts"));
        }
        span += ftvm_ringbuf::layout::record_span(rec.payload.len());
        at += used;
    }
    if at != payload.len() {
        return Err(FrameError::BadBody("bytes after the last record"));
    }
    Ok(span)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            role: Role::Backup,
            max_frame: 1500,
            capacity: 1 << 20,
            max_payload: 1000,
            seq: 7,
            executed: 3,
            digest: [9; 32],
        }
    }

    #[test]
    fn roundtrip_every_type() {
        let mut b = Vec::new();
        encode_hello(&mut b, 5, &hello(), b"{\"k\":1}");
        assert_eq!(
            decode(&b),
            Ok(Decoded {
                generation: 5,
                frame: Frame::Hello {
                    hello: hello(),
                    settings: b"{\"k\":1}"
                }
            })
        );
        encode_hello(&mut b, 5, &hello(), &[]);
        assert!(matches!(
            decode(&b).map(|d| d.frame),
            Ok(Frame::Hello { settings: [], .. })
        ));
        encode_refuse(&mut b, 5, 3, "no");
        assert_eq!(
            decode(&b).map(|d| d.frame),
            Ok(Frame::Refuse {
                reason: 3,
                text: "no"
            })
        );
        encode_ack(&mut b, 5, 10, 8, 2, 7);
        assert_eq!(
            decode(&b).map(|d| d.frame),
            Ok(Frame::Ack {
                acked: 10,
                executed: 8,
                gap: 2,
                missing: 7
            })
        );
        encode_heartbeat(&mut b, 5, 77);
        assert_eq!(
            decode(&b).map(|d| d.frame),
            Ok(Frame::Heartbeat { nonce: 77 })
        );
        for reason in [GoodbyeReason::PlannedStop, GoodbyeReason::CannotTakeOver] {
            encode_goodbye(&mut b, 5, reason, "disk full");
            assert_eq!(
                decode(&b).map(|d| d.frame),
                Ok(Frame::Goodbye {
                    reason,
                    text: "disk full"
                })
            );
        }
        begin_data(&mut b, 5, 1, (0, 1));
        let mut rec = ftvm_ringbuf::layout::header_word(3, 1, 1)
            .to_le_bytes()
            .to_vec();
        rec.extend_from_slice(b"abc");
        b.extend_from_slice(&rec);
        finish_data(&mut b, 1);
        let Ok(Decoded {
            frame: Frame::Data { header, payload },
            ..
        }) = decode(&b)
        else {
            panic!("data frame did not decode")
        };
        assert_eq!(header.count, 1);
        assert_eq!(validate_records(payload, 1, 1, 100), Ok(16));
        assert!(validate_records(payload, 2, 1, 100).is_err());
        // Only the low 32 bits travel: 2^32 + 1 has the same, so it passes too.
        assert_eq!(validate_records(payload, (1 << 32) + 1, 1, 100), Ok(16));
    }

    #[test]
    fn a_goodbye_with_an_unknown_reason_or_bad_text_is_malformed() {
        let mut b = Vec::new();
        encode_reason(&mut b, FrameType::Goodbye, 1, 9, "?");
        assert_eq!(
            decode(&b),
            Err(FrameError::BadBody("GOODBYE reason unknown"))
        );
        encode_reason(&mut b, FrameType::Goodbye, 1, 2, "");
        b.push(0xFF);
        finish(&mut b);
        assert_eq!(
            decode(&b),
            Err(FrameError::BadBody("GOODBYE text is not UTF-8"))
        );
        begin(&mut b, FrameType::Goodbye, 1);
        b.extend_from_slice(&[2, 0]);
        finish(&mut b);
        assert_eq!(decode(&b), Err(FrameError::BadBody("GOODBYE length")));
    }

    #[test]
    fn corruption_is_detected() {
        let mut b = Vec::new();
        encode_ack(&mut b, 1, 10, 8, 0, 0);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(decode(&c).is_err(), "flip at {i} accepted");
        }
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err(), "truncation to {n} accepted");
        }
        let mut v = b.clone();
        v[VERSION_OFFSET] = VERSION + 1;
        assert_eq!(decode(&v), Err(FrameError::Version { found: VERSION + 1 }));
        assert_eq!(
            peek_version_type(&v),
            Some((VERSION + 1, FrameType::Ack as u8))
        );
    }
}
