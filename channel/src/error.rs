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
    /// Setting up the link failed (handshake refused, bad configuration, missing resource).
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
    PeerLeft(crate::reliable::Goodbye),
    /// The local log buffer holds something that is not a valid record (memory scribbled on).
    #[error("log buffer corrupt: {what}")]
    Log {
        /// What was wrong.
        what: String,
    },
}
