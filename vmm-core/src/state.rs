//! Save/restore of a whole VM to a file.
//!
//! ```text
//! snapshot file (all integers little-endian)
//! 0x00  magic    "FTVMSNAP"
//! 0x08  version  u32 (SNAPSHOT_VERSION)
//! 0x0c  sections, each: tag u32 | len u64 | len bytes, in this order:
//!         CONFIG  mem_size u64, cmdline bytes
//!         VCPU    regs, sregs, fpu, xcrs, vcpu events (raw KVM structs), xsave region,
//!                 MSRs (count u32, then index u32 / value u64 pairs)
//!         DEVICES system device, then for each virtio slot: present u8, transport + device
//!         MEMORY  mem_size bytes of guest RAM
//!         EXITS   exit counters (total u64, per kind u64 x N)
//! ```
//! Every piece of VM state implements [`Stateful`]: saving and restoring are required methods,
//! there is no default that saves nothing.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

/// Magic of a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"FTVMSNAP";
/// Format version.
pub const SNAPSHOT_VERSION: u32 = 1;

/// Section tags.
pub mod tag {
    /// VM configuration.
    pub const CONFIG: u32 = 1;
    /// vCPU state.
    pub const VCPU: u32 = 2;
    /// Device state.
    pub const DEVICES: u32 = 3;
    /// Guest memory.
    pub const MEMORY: u32 = 4;
    /// Exit counters.
    pub const EXITS: u32 = 5;
}

/// Errors of save/restore.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the file failed.
    #[error("snapshot file {path}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a snapshot of this version.
    #[error("not an ftvm snapshot (version {SNAPSHOT_VERSION})")]
    BadMagic,
    /// The file is shorter than its contents claim.
    #[error("snapshot truncated while reading {0}")]
    Truncated(&'static str),
    /// A section came in the wrong order.
    #[error("snapshot section {found} found where {expected} was expected")]
    BadSection {
        /// Expected tag.
        expected: u32,
        /// Found tag.
        found: u32,
    },
    /// The state does not fit the VM it is restored into.
    #[error("snapshot does not match this VM: {0}")]
    Mismatch(String),
    /// A KVM ioctl failed while getting or setting vCPU state.
    #[error("KVM {what}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A piece of VM state that can be captured and put back. Both methods are required.
pub trait Stateful {
    /// Appends this object's state to `w`.
    ///
    /// # Errors
    /// [`StateError`] if the state cannot be read (e.g. a KVM ioctl fails).
    fn save(&self, w: &mut StateWriter) -> Result<(), StateError>;
    /// Restores this object's state from `r` (the bytes written by [`Stateful::save`]).
    ///
    /// # Errors
    /// [`StateError`] if the bytes are truncated or do not fit this object.
    fn restore(&mut self, r: &mut StateReader<'_>) -> Result<(), StateError>;
}

/// Appends little-endian values to a byte buffer.
#[derive(Debug, Default)]
pub struct StateWriter {
    buf: Vec<u8>,
}

impl StateWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends a u8.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// Appends a u16.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a length-prefixed byte string.
    pub fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.buf.extend_from_slice(v);
    }
    /// The bytes written.
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads little-endian values back.
#[derive(Debug)]
pub struct StateReader<'a> {
    buf: &'a [u8],
}

impl<'a> StateReader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        StateReader { buf }
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], StateError> {
        if self.buf.len() < n {
            return Err(StateError::Truncated(what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    /// Reads a u8.
    ///
    /// # Errors
    /// [`StateError::Truncated`].
    pub fn u8(&mut self, what: &'static str) -> Result<u8, StateError> {
        Ok(self.take(1, what)?[0])
    }
    /// Reads a u16.
    ///
    /// # Errors
    /// [`StateError::Truncated`].
    pub fn u16(&mut self, what: &'static str) -> Result<u16, StateError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    /// Reads a u32.
    ///
    /// # Errors
    /// [`StateError::Truncated`].
    pub fn u32(&mut self, what: &'static str) -> Result<u32, StateError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Reads a u64.
    ///
    /// # Errors
    /// [`StateError::Truncated`].
    pub fn u64(&mut self, what: &'static str) -> Result<u64, StateError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// Reads a length-prefixed byte string.
    ///
    /// # Errors
    /// [`StateError::Truncated`].
    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], StateError> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).map_err(|_| StateError::Truncated(what))?;
        self.take(n, what)
    }
    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// A snapshot: the sections of the file, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// `(tag, bytes)` pairs.
    pub sections: Vec<(u32, Vec<u8>)>,
}

impl Snapshot {
    /// Writes the snapshot to `path`.
    ///
    /// # Errors
    /// [`StateError::Io`].
    pub fn write_to(&self, path: &Path) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut w = BufWriter::new(File::create(path).map_err(io)?);
        w.write_all(&SNAPSHOT_MAGIC).map_err(io)?;
        w.write_all(&SNAPSHOT_VERSION.to_le_bytes()).map_err(io)?;
        for (t, data) in &self.sections {
            w.write_all(&t.to_le_bytes()).map_err(io)?;
            w.write_all(&(data.len() as u64).to_le_bytes())
                .map_err(io)?;
            w.write_all(data).map_err(io)?;
        }
        w.flush().map_err(io)?;
        w.get_ref().sync_all().map_err(io)
    }

    /// Reads a snapshot from `path`.
    ///
    /// # Errors
    /// [`StateError::Io`], [`StateError::BadMagic`], [`StateError::Truncated`].
    pub fn read_from(path: &Path) -> Result<Self, StateError> {
        let io = |source| StateError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut all = Vec::new();
        BufReader::new(File::open(path).map_err(io)?)
            .read_to_end(&mut all)
            .map_err(io)?;
        if all.len() < 12 || all[..8] != SNAPSHOT_MAGIC {
            return Err(StateError::BadMagic);
        }
        let mut r = StateReader::new(&all[8..]);
        if r.u32("version")? != SNAPSHOT_VERSION {
            return Err(StateError::BadMagic);
        }
        let mut sections = Vec::new();
        while !r.is_empty() {
            let t = r.u32("section tag")?;
            let data = r.bytes("section")?;
            sections.push((t, data.to_vec()));
        }
        Ok(Snapshot { sections })
    }

    /// The section with `tag` at position `index`.
    ///
    /// # Errors
    /// [`StateError::BadSection`] if another section is there.
    pub fn section(&self, index: usize, tag: u32) -> Result<&[u8], StateError> {
        match self.sections.get(index) {
            Some((t, d)) if *t == tag => Ok(d),
            Some((t, _)) => Err(StateError::BadSection {
                expected: tag,
                found: *t,
            }),
            None => Err(StateError::Truncated("section")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_reader_round_trip_and_truncation() {
        let mut w = StateWriter::new();
        w.u8(1);
        w.u16(2);
        w.u32(3);
        w.u64(4);
        w.bytes(b"abc");
        let b = w.into_inner();
        let mut r = StateReader::new(&b);
        assert_eq!(r.u8("a").unwrap(), 1);
        assert_eq!(r.u16("b").unwrap(), 2);
        assert_eq!(r.u32("c").unwrap(), 3);
        assert_eq!(r.u64("d").unwrap(), 4);
        assert_eq!(r.bytes("e").unwrap(), b"abc");
        assert!(r.is_empty());
        let mut short = StateReader::new(&b[..5]);
        short.u8("a").unwrap();
        assert!(matches!(short.u64("x"), Err(StateError::Truncated("x"))));
    }

    #[test]
    fn snapshot_file_round_trip() {
        let dir = std::env::temp_dir().join(format!("ftvm-snap-{}", std::process::id()));
        let snap = Snapshot {
            sections: vec![(tag::CONFIG, vec![1, 2]), (tag::MEMORY, vec![9; 100])],
        };
        snap.write_to(&dir).unwrap();
        let back = Snapshot::read_from(&dir).unwrap();
        assert_eq!(back, snap);
        assert!(back.section(1, tag::VCPU).is_err());
        std::fs::write(&dir, b"garbage!garbage").unwrap();
        assert!(matches!(
            Snapshot::read_from(&dir),
            Err(StateError::BadMagic)
        ));
        let _ = std::fs::remove_file(&dir);
    }
}
