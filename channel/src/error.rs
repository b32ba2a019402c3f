//! The channel crate's error type.

/// Everything that can go wrong while moving frames between primary and backup.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Io {
        /// The operation that failed (`"send"`, `"mmap"`, ...).
        op: &'static str,
        /// The underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the link or disappeared.
    #[error("peer closed the connection{}", if *.mid_frame { " in the middle of a frame" } else { "" })]
    Closed {
        /// True when the peer vanished inside a frame (the partial frame was discarded).
        mid_frame: bool,
    },
    /// The handshake was refused: the two sides disagree (by this side's check, or the peer
    /// said so in a REFUSE frame). Both sides report the same reason.
    #[error("pairing refused: {text}")]
    Refused {
        /// What they disagree on.
        reason: Refusal,
        /// The explanation, naming both values.
        text: String,
    },
    /// Setting up the link failed (no answer in time, bad configuration, missing resource).
    #[error("setup failed: {what}")]
    Setup {
        /// Human-readable description of what went wrong.
        what: String,
    },
    /// A frame is larger than the transport (or the protocol) allows.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Length of the offending frame.
        len: usize,
        /// Largest allowed length.
        max: usize,
    },
    /// Nothing was heard from the peer for too long.
    #[error("nothing heard from the peer for {after:?}")]
    PeerTimeout {
        /// The configured timeout.
        after: std::time::Duration,
    },
    /// The peer left the pair on purpose (it sent GOODBYE): a typed event, not a failure of the
    /// link; the reason says what the other side should do (e.g. a primary whose backup cannot
    /// take over goes on as if the backup had failed).
    #[error("the peer left the pair: {0}")]
    PeerLeft(crate::frame::Goodbye),
    /// The peer sent something the protocol rules out (e.g. an acknowledgement of a record
    /// that was never sent): a broken or forged peer; the link is dropped, nothing is released.
    #[error("protocol violation by the peer: {what}")]
    Protocol {
        /// What the peer did.
        what: String,
    },
    /// The local log buffer holds something that is not a valid record (memory scribbled on).
    #[error("log buffer corrupt: {what}")]
    Log {
        /// What was wrong.
        what: String,
    },
}

/// Why a handshake was refused (the REFUSE frame's reason codes, `PROTOCOL.md` §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The protocol versions differ.
    Version,
    /// The replication generations differ.
    Generation,
    /// The pairing digests differ (guest image, configuration, disk contents).
    Digest,
    /// The backup's buffer cannot hold the primary's records.
    Sizes,
    /// The backup needs records the primary no longer holds.
    Gap,
    /// The settings blobs disagree (the VMM's check named the fields).
    Settings,
    /// A reason code this version does not know.
    Other(u32),
}

impl Refusal {
    /// The wire code.
    pub fn code(self) -> u32 {
        match self {
            Self::Version => 1,
            Self::Generation => 2,
            Self::Digest => 3,
            Self::Sizes => 4,
            Self::Gap => 5,
            Self::Settings => 6,
            Self::Other(c) => c,
        }
    }

    /// The reason for a wire code.
    pub fn from_code(code: u32) -> Self {
        match code {
            1 => Self::Version,
            2 => Self::Generation,
            3 => Self::Digest,
            4 => Self::Sizes,
            5 => Self::Gap,
            6 => Self::Settings,
            c => Self::Other(c),
        }
    }
}
