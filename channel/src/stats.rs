//! Counters shared between a poller and whoever watches it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::frame::FrameError;

/// Live counters (atomics, relaxed): one set per endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    frames_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    records_sent: AtomicU64,
    records_delivered: AtomicU64,
    retransmit_timeouts: AtomicU64,
    retransmitted_frames: AtomicU64,
    selective_retransmits: AtomicU64,
    held_out_of_order: AtomicU64,
    drop_truncated: AtomicU64,
    drop_bad_header: AtomicU64,
    drop_version: AtomicU64,
    drop_crc: AtomicU64,
    drop_bad_body: AtomicU64,
    drop_generation: AtomicU64,
    drop_duplicate: AtomicU64,
    drop_out_of_order: AtomicU64,
    drop_backpressure: AtomicU64,
    window_records: AtomicU64,
    window_bytes: AtomicU64,
    srtt_ns: AtomicU64,
}

/// A copy of the counters at one instant (serialized as one JSON object in the reports and
/// the metrics endpoint's `/status.json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StatsSnapshot {
    /// Frames handed to the transport.
    pub frames_sent: u64,
    /// Frames received (valid or not).
    pub frames_received: u64,
    /// Bytes handed to the transport.
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Records sent, retransmissions included.
    pub records_sent: u64,
    /// Records delivered into the backup's log buffer (exactly once each).
    pub records_delivered: u64,
    /// Retransmit timeouts (each one a go-back-N).
    pub retransmit_timeouts: u64,
    /// DATA frames sent again.
    pub retransmitted_frames: u64,
    /// Selective retransmissions: the backup reported a hole (it holds frames beyond it) and
    /// only the missing records were sent again.
    pub selective_retransmits: u64,
    /// Frames that arrived beyond a hole and were held by the backup until it was filled (not
    /// drops: their records are delivered).
    pub held_out_of_order: u64,
    /// Dropped: shorter than announced.
    pub drop_truncated: u64,
    /// Dropped: bad magic or unknown type.
    pub drop_bad_header: u64,
    /// Dropped: another protocol version.
    pub drop_version: u64,
    /// Dropped: checksum mismatch.
    pub drop_crc: u64,
    /// Dropped: malformed body.
    pub drop_bad_body: u64,
    /// Dropped: another replication generation.
    pub drop_generation: u64,
    /// Dropped: already delivered.
    pub drop_duplicate: u64,
    /// Dropped: ahead of the next expected record (a gap before it).
    pub drop_out_of_order: u64,
    /// Dropped: the backup's log buffer had no room.
    pub drop_backpressure: u64,
    /// Records sent and not yet acknowledged.
    pub window_records: u64,
    /// Bytes of log sent and not yet acknowledged.
    pub window_bytes: u64,
    /// The sender's smoothed round-trip time to an acknowledgement (RFC 6298 `srtt`), in
    /// nanoseconds; 0 until the first sample (and on the receiving side).
    pub srtt_ns: u64,
}

impl StatsSnapshot {
    /// Every dropped frame, whatever the reason.
    pub fn drops(&self) -> u64 {
        self.drop_truncated
            + self.drop_bad_header
            + self.drop_version
            + self.drop_crc
            + self.drop_bad_body
            + self.drop_generation
            + self.drop_duplicate
            + self.drop_out_of_order
            + self.drop_backpressure
    }
}

impl Stats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            frames_sent: self.frames_sent.load(Relaxed),
            frames_received: self.frames_received.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            records_sent: self.records_sent.load(Relaxed),
            records_delivered: self.records_delivered.load(Relaxed),
            retransmit_timeouts: self.retransmit_timeouts.load(Relaxed),
            retransmitted_frames: self.retransmitted_frames.load(Relaxed),
            selective_retransmits: self.selective_retransmits.load(Relaxed),
            held_out_of_order: self.held_out_of_order.load(Relaxed),
            drop_truncated: self.drop_truncated.load(Relaxed),
            drop_bad_header: self.drop_bad_header.load(Relaxed),
            drop_version: self.drop_version.load(Relaxed),
            drop_crc: self.drop_crc.load(Relaxed),
            drop_bad_body: self.drop_bad_body.load(Relaxed),
            drop_generation: self.drop_generation.load(Relaxed),
            drop_duplicate: self.drop_duplicate.load(Relaxed),
            drop_out_of_order: self.drop_out_of_order.load(Relaxed),
            drop_backpressure: self.drop_backpressure.load(Relaxed),
            window_records: self.window_records.load(Relaxed),
            window_bytes: self.window_bytes.load(Relaxed),
            srtt_ns: self.srtt_ns.load(Relaxed),
        }
    }

    #[inline]
    fn add(c: &AtomicU64, n: u64) {
        // Single writer (the poller): a load + store is cheaper than a locked add.
        c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
    }

    pub(crate) fn sent(&self, bytes: usize, records: u64, retransmit: bool) {
        Self::add(&self.frames_sent, 1);
        Self::add(&self.bytes_sent, bytes as u64);
        Self::add(&self.records_sent, records);
        if retransmit {
            Self::add(&self.retransmitted_frames, 1);
        }
    }

    pub(crate) fn received(&self, bytes: usize) {
        Self::add(&self.frames_received, 1);
        Self::add(&self.bytes_received, bytes as u64);
    }

    pub(crate) fn delivered(&self, records: u64) {
        Self::add(&self.records_delivered, records);
    }

    pub(crate) fn timeout(&self) {
        Self::add(&self.retransmit_timeouts, 1);
    }

    pub(crate) fn decode_error(&self, e: FrameError) {
        let c = match e {
            FrameError::Truncated => &self.drop_truncated,
            FrameError::BadHeader => &self.drop_bad_header,
            FrameError::Version { .. } => &self.drop_version,
            FrameError::Crc => &self.drop_crc,
            FrameError::BadBody(_) => &self.drop_bad_body,
        };
        Self::add(c, 1);
    }

    pub(crate) fn drop_generation(&self) {
        Self::add(&self.drop_generation, 1);
    }
    pub(crate) fn drop_duplicate(&self) {
        Self::add(&self.drop_duplicate, 1);
    }
    pub(crate) fn selective_retransmit(&self) {
        Self::add(&self.selective_retransmits, 1);
    }

    pub(crate) fn held_out_of_order(&self) {
        Self::add(&self.held_out_of_order, 1);
    }

    pub(crate) fn drop_out_of_order(&self) {
        Self::add(&self.drop_out_of_order, 1);
    }
    pub(crate) fn drop_backpressure(&self) {
        Self::add(&self.drop_backpressure, 1);
    }
    pub(crate) fn srtt(&self, srtt: std::time::Duration) {
        self.srtt_ns
            .store(u64::try_from(srtt.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }
    pub(crate) fn window(&self, records: u64, bytes: u64) {
        self.window_records.store(records, Relaxed);
        self.window_bytes.store(bytes, Relaxed);
    }
}
