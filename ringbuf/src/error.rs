//! Errors of the log buffer.

use std::path::PathBuf;

/// Failure to obtain backing memory.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The allocation or size was invalid.
    #[error("cannot allocate a region of {len} bytes")]
    Alloc {
        /// Requested length.
        len: usize,
    },
    /// A system call failed.
    #[error("{call} failed")]
    Os {
        /// The failing call.
        call: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be opened.
    #[error("cannot open {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl RegionError {
    pub(crate) fn os(call: &'static str) -> Self {
        Self::Os {
            call,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// Failure to create or attach to a log buffer.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// Obtaining memory failed.
    #[error("log buffer memory")]
    Region(#[from] RegionError),
    /// The capacity is not a power of two, too small, or does not fit the region.
    #[error("invalid capacity {capacity} for a region of {region_len} bytes (need a power of two from 64 to 4 GiB and {region_len} >= 0x180 + capacity)")]
    BadCapacity {
        /// Requested data capacity.
        capacity: usize,
        /// Region length.
        region_len: usize,
    },
    /// The region does not start with the log-buffer magic number.
    #[error("not a log buffer: bad magic {found:#018x}")]
    BadMagic {
        /// The value found.
        found: u64,
    },
    /// The layout version differs from this build's.
    #[error("log buffer layout version {found}, this build speaks {expected}")]
    BadVersion {
        /// The version found.
        found: u32,
        /// The version this build understands.
        expected: u32,
    },
    /// The descriptor is inconsistent (checksum, lengths, indices).
    #[error("corrupt log buffer descriptor: {what}")]
    Corrupt {
        /// What was inconsistent.
        what: String,
    },
    /// `set_next_seq` on a buffer that still holds records: their sequence numbers are rebuilt
    /// from the producer's next one, so renumbering under them would change theirs.
    #[error("cannot renumber a log buffer that holds {unread} unreleased bytes of records")]
    NotEmpty {
        /// Bytes committed and not yet released by the consumer.
        unread: u64,
    },
    /// The role is held by a live process.
    #[error("the {role} role is held by live process {pid}")]
    RoleTaken {
        /// "producer" or "consumer".
        role: &'static str,
        /// The holder.
        pid: u64,
    },
}

/// Why a record could not be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// Not enough free space now; retry after the consumer releases.
    #[error("log buffer full: need {needed} bytes, {available} free")]
    Full {
        /// Bytes the record needs (with header, padding and alignment).
        needed: usize,
        /// Bytes free now.
        available: usize,
    },
    /// The payload can never fit in this buffer.
    #[error("record of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Requested payload length.
        len: usize,
        /// Largest payload accepted.
        max: usize,
    },
    /// The kind value is reserved (padding).
    #[error("record kind {0:#x} is reserved")]
    ReservedKind(u16),
}

/// A corrupt record found by the consumer (shared memory scribbled by a faulty peer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt record at position {position}: {what}")]
pub struct CorruptRecord {
    /// Position of the bad record.
    pub position: u64,
    /// What was wrong.
    pub what: &'static str,
}
