//! Storage fencing for a shared disk image: the owner record `<image>.owner`.
//!
//! The file beside the image holds 8 bytes: the little-endian `u64` generation of the side that
//! owns the disk (0, or a missing/short file: nobody took it yet). It is the file-based
//! equivalent of a SCSI persistent reservation (`vmm-core/DEVICES.md`, "Shared-disk mode"):
//! - a **writer** holds an OFD read lock on bytes `0..8` around each write request
//!   ([`DiskOwner::guard`]) and refuses to write if the record holds a newer generation than
//!   its own ([`BlkError::Superseded`]);
//! - a side **taking ownership** ([`DiskOwner::take`]) gets an OFD write lock (so no writer is
//!   between its check and its write), refuses if the record is newer than its generation,
//!   stores its generation, fsyncs, and unlocks. A process that dies releases its OFD locks;
//!   one that is stopped while holding its read lock is waited for at most the patience given,
//!   then ownership is taken anyway (logged loudly: that stopped writer's one pending write is
//!   the limit of this fence).
//!
//! OFD ("open file description") locks belong to the open file, not to the process, so two
//! [`DiskOwner`]s in one process (the tests' primary and backup threads) exclude each other
//! like two processes do.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::blk::BlkError;

/// Length of the owner record (and of the locked range).
const RECORD: usize = 8;
/// Sleep between attempts of [`DiskOwner::take`] while a writer holds its read lock.
const TAKE_POLL: Duration = Duration::from_millis(5);
/// How long taking ownership waits for writers' read locks by default.
pub const TAKE_PATIENCE: Duration = Duration::from_secs(2);

/// The owner record of a shared image (see the module documentation).
#[derive(Debug)]
pub struct DiskOwner {
    file: File,
    path: PathBuf,
}

/// How [`DiskOwner::take`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// The generation the record held before.
    pub previous: u64,
    /// How long it waited for the write lock.
    pub waited: Duration,
    /// Whether the lock was never obtained within the patience (a writer holding its read lock
    /// is stopped): the record was written without it.
    pub forced: bool,
}

/// A writer's read lock on the owner record, held while one write request reaches the image;
/// released when dropped.
#[derive(Debug)]
pub struct WriteGuard<'a> {
    owner: &'a DiskOwner,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.owner.lock(libc::F_UNLCK, libc::F_OFD_SETLK) {
            let path = self.owner.path.display();
            tracing::warn!(%path, error = %e, "owner record: unlock failed");
        }
    }
}

/// The generation in the owner record of `image`, read without creating or locking it
/// (`None`: no record): how a joining backup checks that it names the primary's image (the
/// replication code's `SharedDiskId`).
///
/// # Errors
/// Reading the record failed.
pub fn read_generation(image: &Path) -> std::io::Result<Option<u64>> {
    match std::fs::read(owner_path(image)) {
        Ok(b) => Ok(Some(
            b.get(..RECORD)
                .and_then(|r| r.try_into().ok())
                .map_or(0, u64::from_le_bytes),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The path of the owner record of `image`: `<image>.owner`.
pub fn owner_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_os_string();
    p.push(".owner");
    PathBuf::from(p)
}

impl DiskOwner {
    /// Opens (creating it if missing) the owner record of `image`.
    ///
    /// # Errors
    /// [`BlkError::Owner`].
    pub fn open(image: &Path) -> Result<Self, BlkError> {
        let path = owner_path(image);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| BlkError::Owner(path.clone(), e))?;
        Ok(DiskOwner { file, path })
    }

    /// The record's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The generation stored in the record (0 if it is shorter than 8 bytes). Unlocked: a
    /// snapshot.
    ///
    /// # Errors
    /// [`BlkError::Owner`].
    pub fn generation(&self) -> Result<u64, BlkError> {
        let mut b = [0u8; RECORD];
        let mut n = 0;
        while n < RECORD {
            match self.file.read_at(&mut b[n..], n as u64) {
                Ok(0) => return Ok(0),
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BlkError::Owner(self.path.clone(), e)),
            }
        }
        Ok(u64::from_le_bytes(b))
    }

    /// `fcntl(cmd)` with an OFD lock of type `ty` on bytes `0..8`; retries on `EINTR`.
    fn lock(&self, ty: libc::c_int, cmd: libc::c_int) -> std::io::Result<()> {
        // SAFETY: `flock` is a plain C struct; all-zero bytes are a valid value (and `l_pid`
        // must be 0 for OFD locks).
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = ty as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = 0;
        fl.l_len = RECORD as libc::off_t;
        loop {
            // SAFETY: the descriptor is owned by `self.file` and open for the whole call; `fl`
            // is a valid, initialised `struct flock` that outlives the call, as the
            // `F_OFD_SETLK`/`F_OFD_SETLKW` commands require.
            let r = unsafe { libc::fcntl(self.file.as_raw_fd(), cmd, &fl as *const libc::flock) };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Takes the read lock (waiting while an owner change holds the write lock) and checks the
    /// record: a write of a side in generation `ours` may reach the image while the guard lives.
    ///
    /// # Errors
    /// [`BlkError::Superseded`] if the record holds a newer generation (nothing must be
    /// written); [`BlkError::Owner`] if the record cannot be locked or read.
    pub fn guard(&self, ours: u64) -> Result<WriteGuard<'_>, BlkError> {
        self.lock(libc::F_RDLCK, libc::F_OFD_SETLKW)
            .map_err(|e| BlkError::Owner(self.path.clone(), e))?;
        let guard = WriteGuard { owner: self };
        let owner = self.generation()?;
        if owner > ours {
            return Err(BlkError::Superseded {
                path: self.path.clone(),
                owner,
                ours,
            });
        }
        Ok(guard)
    }

    /// Takes ownership for generation `ours`: the write lock (retried every few milliseconds
    /// for at most `patience` while writers hold read locks), then the record is checked,
    /// written and fsynced, and the lock released. If the lock cannot be had within `patience`
    /// (a writer stopped while holding it), logs a warning and writes the record anyway:
    /// waiting forever would keep the pair down.
    ///
    /// # Errors
    /// [`BlkError::Superseded`] if the record holds a newer generation (it is left unchanged);
    /// [`BlkError::Owner`] on I/O errors.
    pub fn take(&self, ours: u64, patience: Duration) -> Result<Taken, BlkError> {
        let start = Instant::now();
        let mut forced = false;
        loop {
            match self.lock(libc::F_WRLCK, libc::F_OFD_SETLK) {
                Ok(()) => break,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                    if start.elapsed() >= patience {
                        tracing::warn!(
                            path = %self.path.display(),
                            generation = ours,
                            ?patience,
                            "DISK FENCE FORCED: a writer still holds the owner record's read \
                             lock (stopped?); taking the disk without it: that writer's \
                             pending write may still reach the image"
                        );
                        forced = true;
                        break;
                    }
                    std::thread::sleep(TAKE_POLL);
                }
                Err(e) => return Err(BlkError::Owner(self.path.clone(), e)),
            }
        }
        let waited = start.elapsed();
        let r = self.store(ours);
        if !forced {
            if let Err(e) = self.lock(libc::F_UNLCK, libc::F_OFD_SETLK) {
                let path = self.path.display();
                tracing::warn!(%path, error = %e, "owner record: unlock failed");
            }
        }
        let previous = r?;
        tracing::info!(
            path = %self.path.display(),
            previous,
            generation = ours,
            ?waited,
            forced,
            "took ownership of the shared disk"
        );
        Ok(Taken {
            previous,
            waited,
            forced,
        })
    }

    /// Checks and writes the record (the caller holds the write lock, or gave up on it).
    fn store(&self, ours: u64) -> Result<u64, BlkError> {
        let previous = self.generation()?;
        if previous > ours {
            return Err(BlkError::Superseded {
                path: self.path.clone(),
                owner: previous,
                ours,
            });
        }
        let io = |e| BlkError::Owner(self.path.clone(), e);
        self.file.write_all_at(&ours.to_le_bytes(), 0).map_err(io)?;
        self.file.sync_all().map_err(io)?;
        Ok(previous)
    }
}
