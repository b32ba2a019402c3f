//! virtio-blk on a raw image file: one queue, `VIRTIO_BLK_F_FLUSH`, 512-byte sectors.
//!
//! ```text
//! request chain: [header 16 B, readable: type u32 | reserved u32 | sector u64]
//!                [data buffers: readable (OUT) or writable (IN, GET_ID)]
//!                [status 1 B, writable: 0 OK, 1 IOERR, 2 UNSUPP]
//! ```
//! Requests are executed synchronously while handling the QueueNotify exit.
//!
//! # Shared-disk mode
//! When the primary and the backup of a pair name the same image ([`BlkHandle::set_shared`]),
//! the device's [`DiskMode`] decides what touches the file (`vmm-core/DEVICES.md`, "Shared-disk
//! mode"):
//! - [`DiskMode::Direct`]: reads and writes go to the file (a plain run, a primary that runs
//!   alone, a backup after go-live, and both sides of a pair with their own copies);
//! - [`DiskMode::Gated`] (the primary): a write is an output: before it reaches the file the
//!   vCPU waits on the [`WriteBarrier`] (the backup has acknowledged the log up to the position
//!   current when the write was issued); a refused write stops the VM;
//! - [`DiskMode::Replay`] (the backup while it replays): the file is not touched at all; read
//!   data come from the log, writes are dropped (counted). The requests of the last exit are
//!   remembered, and the status byte of each request is set to [`STATUS_PENDING`] until the
//!   primary's logged status overwrites it. If the backup goes live at the end of that exit
//!   with some completions missing from the log, [`BlkHandle::go_live`] executes the requests
//!   from the first one whose status is still pending, on the file, in order.
//!
//! # Own-copy mode: the backup checks its copy
//! When each side writes its own image (the default), the replaying backup performs every disk
//! request on its copy itself (reads, writes, flushes: [`DiskMode::Direct`]) and the primary's
//! result of the same request reaches it through the log: the status byte is one of the guest
//! memory writes logged for the exit, at the request's status address, and overwrites the
//! backup's own status at the end of the exit. Before that happens the backup remembers its own
//! status of each request; once the exit's logged writes are applied (and before any go-live
//! decision at that exit), [`VirtioDevice::check_replayed_exit`] compares the two. Any
//! difference — the backup's write failed with ENOSPC or EIO, or was short, while the
//! primary's succeeded, or the reverse — means the backup's copy no longer equals the
//! primary's disk: the device stops the VM with a [`CopyFailure`]
//! ([`BlkHandle::copy_failure`]), and the backup stops without going live
//! (`PairError::CannotTakeOver`, `ftvm_ft::golive`). Where the log ends inside the exit
//! before the primary's status, the byte still holds the backup's own result, which the guest
//! then sees live: nothing is compared, and nothing a client was told depends on it.
//!
//! Storage fencing: once a side took the shared disk for its generation
//! ([`BlkHandle::take_ownership`], the owner record `<image>.owner` of [`super::owner`]), each
//! write request holds the record's read lock while it reaches the file, and is refused (the
//! VM stops; [`BlkHandle::superseded_by`]) if a newer generation owns the disk.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::owner::{DiskOwner, Taken, WriteGuard, TAKE_PATIENCE};
use super::{add_used, pop_chain, read_config_space, Desc, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::{DeviceError, ExitCtx};
use crate::dirty::DirtySet;
use crate::memory::GuestMem;
use crate::record::{OutputDigest, OutputSource};
use crate::state::{BlkState, DeviceState, Persist, StateError};

/// `VIRTIO_BLK_F_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Sector size.
pub const SECTOR: u64 = 512;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// The status a replaying backup writes for a request whose result only the primary knows;
/// never a valid virtio-blk status, so a byte still holding it after the exit's logged writes
/// were applied marks a request the log did not complete.
pub const STATUS_PENDING: u8 = 0xFF;
const QUEUE_SIZES: &[u16] = &[128];

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The image cannot be opened.
    #[error("cannot open disk image {0}")]
    Open(PathBuf, #[source] std::io::Error),
    /// The image size is not a multiple of 512 bytes.
    #[error("disk image {0} is {1} bytes, not a multiple of 512")]
    Size(PathBuf, u64),
    /// A dirty-tracking block size that is not a positive multiple of 512.
    #[error("disk block size {0} is not a positive multiple of 512")]
    BlockSize(u64),
    /// The owner record of a shared image cannot be opened, locked, read or written.
    #[error("disk owner record {0}")]
    Owner(PathBuf, #[source] std::io::Error),
    /// The owner record of a shared image holds a newer generation than this side's: another
    /// side owns the disk, this one must not write to it.
    #[error("superseded on the shared disk: {path} holds generation {owner}, ours is {ours}")]
    Superseded {
        /// The owner record.
        path: PathBuf,
        /// The generation it holds.
        owner: u64,
        /// This side's generation.
        ours: u64,
    },
}

/// A disk request a backup performed on its own copy while replaying whose result differs from
/// the one the primary logged for it (own-copy mode): the backup's copy no longer equals the
/// primary's disk, so this backup can no longer take over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFailure {
    /// The exit of the request.
    pub exit: u64,
    /// `read`, `write` or `flush`.
    pub request: &'static str,
    /// Its first sector (0 for a flush).
    pub sector: u64,
    /// The backup's status byte (`0` OK, `1` IOERR, `2` UNSUPP).
    pub ours: u8,
    /// The primary's status byte, from the log.
    pub primary: u8,
    /// The backup's I/O error, if its request failed with one.
    pub error: Option<CopyIoError>,
}

/// The I/O error of a backup's own disk request ([`CopyFailure::error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyIoError {
    /// Its kind.
    pub kind: std::io::ErrorKind,
    /// The OS error number (`ENOSPC`, `EIO`, …), if it came from the OS.
    pub errno: Option<i32>,
}

impl From<&std::io::Error> for CopyIoError {
    fn from(e: &std::io::Error) -> Self {
        CopyIoError {
            kind: e.kind(),
            errno: e.raw_os_error(),
        }
    }
}

impl std::fmt::Display for CopyIoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.errno {
            Some(n) => write!(f, "{}", std::io::Error::from_raw_os_error(n)),
            None => write!(f, "{}", std::io::Error::from(self.kind)),
        }
    }
}

/// A virtio-blk status byte in words.
fn status_name(st: u8) -> String {
    match st {
        S_OK => "OK".into(),
        S_IOERR => "IOERR".into(),
        S_UNSUPP => "UNSUPP".into(),
        other => format!("status {other:#04x}"),
    }
}

impl std::fmt::Display for CopyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the backup's own disk copy failed: the {} of sector {} at exit {} returned {}",
            self.request,
            self.sector,
            self.exit,
            status_name(self.ours)
        )?;
        if let Some(e) = &self.error {
            write!(f, " ({e})")?;
        }
        write!(
            f,
            " on the backup but {} on the primary",
            status_name(self.primary)
        )
    }
}

/// A request a replaying backup performed on its own copy, to compare with the primary's
/// result once the exit's logged writes are applied.
#[derive(Debug)]
struct CopyCheck {
    exit: u64,
    ty: u32,
    sector: u64,
    status: u64,
    ours: u8,
    error: Option<CopyIoError>,
}

/// Decides when a write of a primary in shared-disk mode may reach the disk.
pub trait WriteBarrier: Send + Sync {
    /// Blocks the vCPU until a write issued now may reach the shared disk.
    ///
    /// # Errors
    /// [`BarrierError`]: it must never be written.
    fn before_write(&self) -> Result<(), BarrierError>;
}

/// Why a [`WriteBarrier`] withholds a write for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BarrierError {
    /// This side was superseded (or its run ended): the disk is not its to write.
    #[error("this primary was superseded")]
    Superseded,
    /// The link broke with nobody to decide, and the log position the write waits for was
    /// never acknowledged.
    #[error("the link is down and the backup never acknowledged log position {position}")]
    NeverAcknowledged {
        /// The log position the write waited for.
        position: u64,
    },
}

/// What the device does with its image (see the module documentation).
#[derive(Clone, Default)]
pub enum DiskMode {
    /// Reads and writes go to the file.
    #[default]
    Direct,
    /// Writes wait for the barrier first (a primary in shared-disk mode).
    Gated(Arc<dyn WriteBarrier>),
    /// The file is not touched (a backup replaying in shared-disk mode).
    Replay,
}

impl std::fmt::Debug for DiskMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskMode::Direct => "Direct",
            DiskMode::Gated(_) => "Gated",
            DiskMode::Replay => "Replay",
        })
    }
}

/// Counters of a virtio-blk device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkCounters {
    /// Read requests served from the file.
    pub reads: u64,
    /// Write requests written to the file.
    pub writes: u64,
    /// Write requests that passed a [`WriteBarrier`] first ([`DiskMode::Gated`]).
    pub gated: u64,
    /// Write requests the barrier refused (not written; the VM stopped).
    pub refused: u64,
    /// Write requests dropped while replaying ([`DiskMode::Replay`]).
    pub dropped: u64,
    /// Requests executed at go-live because the log lacked their completion.
    pub redone: u64,
}

/// One request seen while replaying, kept until the next exit.
#[derive(Debug, Clone)]
struct Recorded {
    ty: u32,
    sector: u64,
    /// Writable data buffers (IN, GET_ID): `(gpa, len)`.
    bufs: Vec<(u64, u32)>,
    /// Data of an OUT request, as it was in guest memory at the exit.
    out: Vec<u8>,
    status: u64,
}

#[derive(Debug)]
struct BlkShared {
    file: File,
    path: PathBuf,
    /// The owner record and this side's generation, once this side took the shared disk
    /// ([`BlkHandle::take_ownership`]); from then on every write is fenced by it.
    owner: Mutex<Option<(Arc<DiskOwner>, u64)>>,
    /// The newer generation the owner record held when a write was refused (0: none).
    superseded: AtomicU64,
    sectors: u64,
    shared: AtomicBool,
    mode: Mutex<DiskMode>,
    /// `(exit, requests)` of the last exit handled in [`DiskMode::Replay`].
    replayed: Mutex<(u64, Vec<Recorded>)>,
    /// Own-copy mode, replaying: the requests of the current exit performed on the file, to
    /// compare with the primary's results ([`VirtioDevice::check_replayed_exit`]).
    copy_checks: Mutex<Vec<CopyCheck>>,
    /// The first request whose result differed from the primary's (the VM stopped).
    copy_failure: Mutex<Option<CopyFailure>>,
    /// Dirty-block tracking for a live copy of the image ([`BlkHandle::start_dirty_tracking`]).
    dirty: Mutex<Option<DirtyBlocks>>,
    reads: AtomicU64,
    writes: AtomicU64,
    gated: AtomicU64,
    refused: AtomicU64,
    dropped: AtomicU64,
    redone: AtomicU64,
}

/// The blocks written since the tracker last looked.
#[derive(Debug)]
struct DirtyBlocks {
    /// Bytes per block.
    block: u64,
    set: DirtySet,
}

impl BlkShared {
    /// Writes `data` at byte offset `off`; the blocks it touches are marked dirty **after** the
    /// write (even a failed one, which may have written part): a copier that read a block
    /// before the write completed sees it dirty again.
    fn write_at(&self, data: &[u8], off: u64) -> std::io::Result<()> {
        let r = self.file.write_all_at(data, off);
        if let Some(d) = self
            .dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let end = off + data.len() as u64;
            for b in off / d.block..end.div_ceil(d.block) {
                d.set.insert(b);
            }
        }
        r
    }

    /// The owner record and this side's generation, if this side took the disk.
    fn owner(&self) -> Option<(Arc<DiskOwner>, u64)> {
        self.owner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The fence around one write request: `owner` (from [`BlkShared::owner`]) read-locked and
    /// checked; `Err`: the write must not reach the image (counted, remembered).
    fn fence<'a>(
        &self,
        owner: &'a Option<(Arc<DiskOwner>, u64)>,
    ) -> Result<Option<WriteGuard<'a>>, BlkError> {
        let Some((o, ours)) = owner else {
            return Ok(None);
        };
        o.guard(*ours).map(Some).inspect_err(|e| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            if let BlkError::Superseded { owner, .. } = e {
                self.superseded.fetch_max(*owner, Ordering::AcqRel);
            }
            tracing::error!(error = %e, "shared disk: write refused by the owner record");
        })
    }

    fn in_range(&self, sector: u64, total: u64) -> bool {
        sector
            .checked_mul(SECTOR)
            .and_then(|b| b.checked_add(total))
            .is_some_and(|end| end <= self.sectors * SECTOR)
    }
}

/// A handle on the device's disk mode and counters, shared with the FT code while the VM runs.
#[derive(Debug, Clone)]
pub struct BlkHandle(Arc<BlkShared>);

impl BlkHandle {
    /// Marks the image as shared with the other side of a pair (both name the same file).
    pub fn set_shared(&self, shared: bool) {
        self.0.shared.store(shared, Ordering::Release);
    }

    /// Whether the image is shared with the other side of a pair.
    pub fn is_shared(&self) -> bool {
        self.0.shared.load(Ordering::Acquire)
    }

    /// Sets what the device does with its file from the next request on.
    pub fn set_mode(&self, mode: DiskMode) {
        let mut m = self.0.mode.lock().unwrap_or_else(|e| e.into_inner());
        tracing::info!(from = ?*m, to = ?mode, "virtio-blk disk mode");
        *m = mode;
    }

    /// Takes the shared disk for generation `generation` through its owner record
    /// (`<image>.owner`, [`DiskOwner::take`], waiting at most [`TAKE_PATIENCE`] for writers'
    /// locks); from then on every write request of this device holds the record's read lock
    /// and is refused if the record holds a newer generation. Called by a primary at its
    /// start and when it goes on alone, and by a backup going live (before its first write).
    ///
    /// # Errors
    /// [`BlkError::Superseded`]: the record holds a newer generation (this side is fenced off:
    /// its writes are refused from now on); [`BlkError::Owner`]: I/O errors.
    pub fn take_ownership(&self, generation: u64) -> Result<Taken, BlkError> {
        let s = &self.0;
        let owner = match s.owner() {
            Some((o, _)) => o,
            None => Arc::new(DiskOwner::open(&s.path)?),
        };
        let r = owner.take(generation, TAKE_PATIENCE);
        if let Err(BlkError::Superseded { owner, .. }) = &r {
            s.superseded.fetch_max(*owner, Ordering::AcqRel);
        }
        *s.owner.lock().unwrap_or_else(|e| e.into_inner()) = Some((owner, generation));
        r
    }

    /// The newer generation the owner record held when this side's write (or take-over) was
    /// refused: this side is superseded on the disk. `None`: never refused.
    pub fn superseded_by(&self) -> Option<u64> {
        match self.0.superseded.load(Ordering::Acquire) {
            0 => None,
            g => Some(g),
        }
    }

    /// Own-copy mode: the request a replaying backup performed on its copy whose result
    /// differed from the primary's, if one did (the VM stopped there; this backup can no
    /// longer take over). `None`: every result matched so far.
    pub fn copy_failure(&self) -> Option<CopyFailure> {
        self.0
            .copy_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The image's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.0.sectors * SECTOR
    }

    /// Starts tracking which `block_bytes`-sized blocks of the image the guest writes (own-copy
    /// mode: the image is copied live, [`crate::transfer`]). Starting again clears the set.
    ///
    /// # Errors
    /// [`BlkError::BlockSize`] if `block_bytes` is not a positive multiple of 512.
    pub fn start_dirty_tracking(&self, block_bytes: u64) -> Result<(), BlkError> {
        if block_bytes == 0 || block_bytes % SECTOR != 0 {
            return Err(BlkError::BlockSize(block_bytes));
        }
        let blocks = self.size_bytes().div_ceil(block_bytes);
        *self.0.dirty.lock().unwrap_or_else(|e| e.into_inner()) = Some(DirtyBlocks {
            block: block_bytes,
            set: DirtySet::empty(blocks),
        });
        Ok(())
    }

    /// The blocks written since tracking started or the previous call, cleared; `None` when
    /// not tracking.
    pub fn take_dirty_blocks(&self) -> Option<DirtySet> {
        let mut d = self.0.dirty.lock().unwrap_or_else(|e| e.into_inner());
        d.as_mut().map(|d| {
            let n = d.set.capacity();
            std::mem::replace(&mut d.set, DirtySet::empty(n))
        })
    }

    /// Stops dirty-block tracking.
    pub fn stop_dirty_tracking(&self) {
        *self.0.dirty.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Reads `buf.len()` bytes of the image at byte offset `offset` (the copier's read, while the
    /// guest runs: take the dirty set first, then read).
    ///
    /// # Errors
    /// The I/O error (reading past the end included).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.file.read_exact_at(buf, offset)
    }

    /// The current mode.
    pub fn mode(&self) -> DiskMode {
        self.0
            .mode
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The counters.
    pub fn counters(&self) -> BlkCounters {
        let s = &self.0;
        BlkCounters {
            reads: s.reads.load(Ordering::Relaxed),
            writes: s.writes.load(Ordering::Relaxed),
            gated: s.gated.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            redone: s.redone.load(Ordering::Relaxed),
        }
    }

    /// A backup in [`DiskMode::Replay`] goes live at exit `exit` (it owns the disk from now on):
    /// if the requests of that exit were replayed and the log did not complete all of them (a
    /// status byte in `mem` still [`STATUS_PENDING`]), executes them on the file from the first
    /// incomplete one on, in order, writing read data and statuses into `mem`; then switches to
    /// [`DiskMode::Direct`]. Returns how many requests it executed.
    ///
    /// Why this is exact: the primary logs a request's read data and status before its
    /// used-ring update, and performs a write only once the backup acknowledged everything it
    /// logged before, so at most the first incomplete request can have reached the disk already
    /// (re-writing the same data is harmless) and every earlier one is complete in the log.
    pub fn go_live(&self, exit: u64, mem: &GuestMem) -> usize {
        let mut done = 0;
        let reqs = {
            let mut r = self.0.replayed.lock().unwrap_or_else(|e| e.into_inner());
            let reqs = std::mem::take(&mut r.1);
            if r.0 == exit {
                reqs
            } else {
                Vec::new()
            }
        };
        let pending = |req: &Recorded| {
            let mut b = [0u8; 1];
            mem.read_slice(&mut b, GuestAddress(req.status)).is_ok() && b[0] == STATUS_PENDING
        };
        if let Some(first) = reqs.iter().position(pending) {
            for req in &reqs[first..] {
                let st = self.redo(req, mem);
                if mem.write_slice(&[st], GuestAddress(req.status)).is_err() {
                    tracing::warn!(status = req.status, "status byte outside guest memory");
                }
                done += 1;
            }
            self.0.redone.fetch_add(done as u64, Ordering::Relaxed);
            tracing::warn!(
                exit,
                requests = done,
                "go-live: executed the disk requests whose completion the log lacked"
            );
        }
        self.set_mode(DiskMode::Direct);
        done
    }

    fn redo(&self, req: &Recorded, mem: &GuestMem) -> u8 {
        let s = &self.0;
        match req.ty {
            T_IN => {
                let total: u64 = req.bufs.iter().map(|(_, l)| u64::from(*l)).sum();
                if !s.in_range(req.sector, total) {
                    return S_IOERR;
                }
                let mut off = req.sector * SECTOR;
                for (gpa, len) in &req.bufs {
                    let mut buf = vec![0u8; *len as usize];
                    if s.file.read_exact_at(&mut buf, off).is_err()
                        || mem.write_slice(&buf, GuestAddress(*gpa)).is_err()
                    {
                        return S_IOERR;
                    }
                    off += u64::from(*len);
                }
                s.reads.fetch_add(1, Ordering::Relaxed);
                S_OK
            }
            T_OUT => {
                if !s.in_range(req.sector, req.out.len() as u64) {
                    return S_IOERR;
                }
                let owner = s.owner();
                let Ok(_guard) = s.fence(&owner) else {
                    return S_IOERR;
                };
                match s.write_at(&req.out, req.sector * SECTOR) {
                    Ok(()) => {
                        s.writes.fetch_add(1, Ordering::Relaxed);
                        S_OK
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "disk write failed");
                        S_IOERR
                    }
                }
            }
            T_FLUSH => match s.file.sync_data() {
                Ok(()) => S_OK,
                Err(_) => S_IOERR,
            },
            T_GET_ID => {
                if let Some((gpa, len)) = req.bufs.first() {
                    let id = device_id();
                    let n = (*len as usize).min(id.len());
                    if mem.write_slice(&id[..n], GuestAddress(*gpa)).is_err() {
                        return S_IOERR;
                    }
                }
                S_OK
            }
            _ => S_UNSUPP,
        }
    }
}

fn device_id() -> [u8; 20] {
    let mut id = [0u8; 20];
    id[..8].copy_from_slice(b"ftvm-blk");
    id
}

/// The virtio-blk device.
#[derive(Debug)]
pub struct Blk {
    shared: Arc<BlkShared>,
}

impl Blk {
    /// Opens the raw image at `path` read-write.
    ///
    /// # Errors
    /// [`BlkError`].
    pub fn open(path: &Path) -> Result<Self, BlkError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| BlkError::Open(path.into(), e))?;
        let len = file
            .metadata()
            .map_err(|e| BlkError::Open(path.into(), e))?
            .len();
        if len % SECTOR != 0 {
            return Err(BlkError::Size(path.into(), len));
        }
        Ok(Blk {
            shared: Arc::new(BlkShared {
                file,
                path: path.into(),
                owner: Mutex::new(None),
                superseded: AtomicU64::new(0),
                sectors: len / SECTOR,
                shared: AtomicBool::new(false),
                mode: Mutex::new(DiskMode::Direct),
                replayed: Mutex::new((u64::MAX, Vec::new())),
                copy_checks: Mutex::new(Vec::new()),
                copy_failure: Mutex::new(None),
                dirty: Mutex::new(None),
                reads: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                gated: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                redone: AtomicU64::new(0),
            }),
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.shared.sectors
    }

    /// The handle (mode, counters).
    pub fn handle(&self) -> BlkHandle {
        BlkHandle(Arc::clone(&self.shared))
    }

    fn execute(
        &mut self,
        descs: &[Desc],
        ctx: &mut ExitCtx<'_>,
        mode: &DiskMode,
    ) -> Result<u32, DeviceError> {
        let Some((status, body)) = descs.split_last() else {
            return Ok(0);
        };
        if !status.write || status.len < 1 || body.is_empty() || body[0].write || body[0].len < 16 {
            return Err(DeviceError::Queue("malformed virtio-blk request".into()));
        }
        let mut hdr = [0u8; 16];
        ctx.read_guest(body[0].addr, &mut hdr)?;
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sb = [0u8; 8];
        sb.copy_from_slice(&hdr[8..]);
        let sector = u64::from_le_bytes(sb);
        let data = &body[1..];
        if matches!(mode, DiskMode::Replay) {
            return self.replay(ty, sector, data, status.addr, ctx);
        }
        let s = &*self.shared;
        let mut written = 0u32;
        let mut io_error: Option<CopyIoError> = None;
        let st = match ty {
            T_IN | T_OUT => {
                let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
                if !s.in_range(sector, total) {
                    S_IOERR
                } else {
                    if ty == T_OUT {
                        if let DiskMode::Gated(barrier) = mode {
                            // An output: its digest goes into the log (the replaying backup
                            // compares it with its own dropped write; one extra copy of the
                            // data, small next to the wait below), then wait until the backup
                            // holds the log up to here, the digest included.
                            let out = gather(data, ctx)?;
                            ctx.output(OutputSource::Disk, |d| digest_write(d, sector, &out))?;
                            if let Err(why) = barrier.before_write() {
                                s.refused.fetch_add(1, Ordering::Relaxed);
                                return Err(DeviceError::Backend {
                                    what: format!(
                                        "shared disk: write of sector {sector} withheld: {why}"
                                    ),
                                    source: std::io::Error::other("write withheld"),
                                });
                            }
                            s.gated.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // Storage fencing: the owner record stays read-locked (and must not hold a
                    // newer generation) while the request's data reach the image.
                    let owner = if ty == T_OUT { s.owner() } else { None };
                    let _guard = s.fence(&owner).map_err(|e| DeviceError::Backend {
                        what: format!("shared disk: write of sector {sector} withheld: {e}"),
                        source: std::io::Error::other("fenced off by the disk owner record"),
                    })?;
                    let mut off = sector * SECTOR;
                    let mut st = S_OK;
                    for d in data {
                        let mut buf = vec![0u8; d.len as usize];
                        if ty == T_IN {
                            if let Err(e) = s.file.read_exact_at(&mut buf, off) {
                                tracing::warn!(error = %e, "disk read failed");
                                io_error = Some(CopyIoError::from(&e));
                                st = S_IOERR;
                                break;
                            }
                            ctx.write_guest(d.addr, &buf)?;
                            written += d.len;
                        } else {
                            ctx.read_guest(d.addr, &mut buf)?;
                            if let Err(e) = s.write_at(&buf, off) {
                                tracing::warn!(error = %e, "disk write failed");
                                io_error = Some(CopyIoError::from(&e));
                                st = S_IOERR;
                                break;
                            }
                        }
                        off += u64::from(d.len);
                    }
                    if st == S_OK {
                        let c = if ty == T_IN { &s.reads } else { &s.writes };
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    st
                }
            }
            T_FLUSH => match s.file.sync_data() {
                Ok(()) => S_OK,
                Err(e) => {
                    tracing::warn!(error = %e, "disk flush failed");
                    io_error = Some(CopyIoError::from(&e));
                    S_IOERR
                }
            },
            T_GET_ID => {
                if let Some(d) = data.iter().find(|d| d.write) {
                    let n = (d.len as usize).min(20);
                    ctx.write_guest(d.addr, &device_id()[..n])?;
                    written += n as u32;
                }
                S_OK
            }
            _ => S_UNSUPP,
        };
        if ctx.is_replay() && matches!(ty, T_IN | T_OUT | T_FLUSH) {
            // A backup with its own copy: the primary's status overwrites ours at the end of
            // the exit; compare then.
            s.copy_checks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(CopyCheck {
                    exit: ctx.exit,
                    ty,
                    sector,
                    status: status.addr,
                    ours: st,
                    error: io_error,
                });
        }
        ctx.write_guest(status.addr, &[st])?;
        Ok(written + 1)
    }

    /// Own-copy mode: compares the backup's results of exit `exit` with the primary's, now in
    /// `mem` (see the module documentation); the first difference is kept
    /// ([`BlkHandle::copy_failure`]) and stops the VM.
    fn check_copy(&mut self, mem: &GuestMem, exit: u64) -> Result<(), DeviceError> {
        let s = &*self.shared;
        let checks = std::mem::take(&mut *s.copy_checks.lock().unwrap_or_else(|e| e.into_inner()));
        for c in checks.into_iter().filter(|c| c.exit == exit) {
            let mut b = [0u8; 1];
            mem.read_slice(&mut b, GuestAddress(c.status))
                .map_err(|_| DeviceError::GuestMemory {
                    addr: c.status,
                    len: 1,
                })?;
            if b[0] == c.ours {
                continue;
            }
            let failure = CopyFailure {
                exit,
                request: match c.ty {
                    T_IN => "read",
                    T_OUT => "write",
                    _ => "flush",
                },
                sector: if c.ty == T_FLUSH { 0 } else { c.sector },
                ours: c.ours,
                primary: b[0],
                error: c.error,
            };
            tracing::error!(%failure, "this backup can no longer take over");
            let what = failure.to_string();
            s.copy_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(failure);
            return Err(DeviceError::Backend {
                what,
                source: std::io::Error::other("the backup's disk copy differs from the primary's"),
            });
        }
        Ok(())
    }

    /// A request of a backup replaying in shared-disk mode: the file is not touched; the
    /// request is remembered for [`BlkHandle::go_live`]; the guest memory this writes (status
    /// [`STATUS_PENDING`], the used ring) is overwritten by the primary's logged writes at the
    /// end of the exit. Returns the used length the primary computes for the same request.
    fn replay(
        &mut self,
        ty: u32,
        sector: u64,
        data: &[Desc],
        status: u64,
        ctx: &mut ExitCtx<'_>,
    ) -> Result<u32, DeviceError> {
        let s = &*self.shared;
        let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
        let mut rec = Recorded {
            ty,
            sector,
            bufs: Vec::new(),
            out: Vec::new(),
            status,
        };
        let (st, written) = match ty {
            T_IN | T_OUT if !s.in_range(sector, total) => (S_IOERR, 0),
            T_IN => {
                rec.bufs = data.iter().map(|d| (d.addr, d.len)).collect();
                (STATUS_PENDING, u32::try_from(total).unwrap_or(u32::MAX))
            }
            T_OUT => {
                let out = gather(data, ctx)?;
                // The primary logged the digest of this write: compare.
                ctx.output(OutputSource::Disk, |d| digest_write(d, sector, &out))?;
                rec.out = out;
                s.dropped.fetch_add(1, Ordering::Relaxed);
                (STATUS_PENDING, 0)
            }
            T_FLUSH => (STATUS_PENDING, 0),
            T_GET_ID => {
                let mut n = 0;
                if let Some(d) = data.iter().find(|d| d.write) {
                    rec.bufs.push((d.addr, d.len));
                    n = (d.len as usize).min(20);
                    ctx.write_guest(d.addr, &device_id()[..n])?;
                }
                (S_OK, n as u32)
            }
            _ => (S_UNSUPP, 0),
        };
        {
            let mut r = s.replayed.lock().unwrap_or_else(|e| e.into_inner());
            if r.0 != ctx.exit {
                *r = (ctx.exit, Vec::new());
            }
            r.1.push(rec);
        }
        ctx.write_guest(status, &[st])?;
        Ok(written + 1)
    }
}

/// The data of a write request's buffers, in order.
fn gather(data: &[Desc], ctx: &ExitCtx<'_>) -> Result<Vec<u8>, DeviceError> {
    let total: usize = data.iter().map(|d| d.len as usize).sum();
    let mut out = vec![0u8; total];
    let mut at = 0usize;
    for d in data {
        let n = d.len as usize;
        ctx.read_guest(d.addr, &mut out[at..at + n])?;
        at += n;
    }
    Ok(out)
}

/// Adds a shared-disk write (where it goes and what) to an output digest.
fn digest_write(d: &mut OutputDigest, sector: u64, data: &[u8]) {
    d.mix(sector);
    d.add(data);
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u32 {
        2
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH
    }
    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64 sectors) at 0; everything else 0.
        let cap = self.shared.sectors.to_le_bytes();
        let mut cfg = [0u8; 16];
        cfg[..8].copy_from_slice(&cap);
        read_config_space(&cfg, offset, data);
    }
    fn notify(
        &mut self,
        _index: usize,
        queues: &mut [Queue],
        ctx: &mut ExitCtx<'_>,
    ) -> Result<bool, DeviceError> {
        let mode = self
            .shared
            .mode
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut used = false;
        while let Some((head, descs)) = pop_chain(&mut queues[0], ctx.mem)? {
            let len = self.execute(&descs, ctx, &mode)?;
            add_used(&mut queues[0], ctx, head, len)?;
            used = true;
        }
        Ok(used)
    }
    fn deliver_input(
        &mut self,
        _q: &mut [Queue],
        _ctx: &mut ExitCtx<'_>,
    ) -> Result<u64, DeviceError> {
        Ok(0)
    }
    fn has_input(&self) -> bool {
        false
    }
    fn check_replayed_exit(&mut self, mem: &GuestMem, exit: u64) -> Result<(), DeviceError> {
        self.check_copy(mem, exit)
    }
    fn save_device(&self) -> Result<DeviceState, StateError> {
        self.save().map(DeviceState::Blk)
    }
    fn restore_device(&mut self, state: &DeviceState) -> Result<(), StateError> {
        match state {
            DeviceState::Blk(s) => self.restore(s),
            other => Err(super::wrong_device("virtio-blk", other)),
        }
    }
}

/// The device's guest-visible state is its capacity (requests complete within their exit);
/// the image's contents are the disk's, copied apart ([`BlkHandle::start_dirty_tracking`]).
impl Persist for Blk {
    type State = BlkState;
    fn save(&self) -> Result<BlkState, StateError> {
        Ok(BlkState {
            sectors: self.shared.sectors,
        })
    }
    fn restore(&mut self, s: &BlkState) -> Result<(), StateError> {
        if s.sectors != self.shared.sectors {
            return Err(StateError::Mismatch(format!(
                "disk has {} sectors, the state was saved with {}",
                self.shared.sectors, s.sectors
            )));
        }
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Inputs;

    const HDR: u64 = 0x10_0000;
    const STATUS: u64 = 0x10_0100;
    const DATA: u64 = 0x11_0000;
    const HDR2: u64 = 0x12_0000;
    const STATUS2: u64 = 0x12_0100;
    const READ_BUF: u64 = 0x13_0000;

    struct Rig {
        _dir: tempfile::TempDir,
        path: PathBuf,
        blk: Blk,
        mem: GuestMem,
        inputs: Inputs,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(64 * SECTOR))
            .unwrap();
        let blk = Blk::open(&path).unwrap();
        let mem = crate::memory::allocate(4 << 20).unwrap();
        Rig {
            _dir: dir,
            path,
            blk,
            mem,
            inputs: Inputs::default(),
        }
    }

    fn header(mem: &GuestMem, at: u64, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn byte(mem: &GuestMem, at: u64) -> u8 {
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        b[0]
    }

    /// A write of one sector at sector 3 (`0xAB` bytes), then a read of it, in exit 7.
    /// The read request's descriptor chain: header at `HDR2`, one sector into `READ_BUF`,
    /// status at `STATUS2`.
    fn read_chain() -> [Desc; 3] {
        [
            Desc {
                addr: HDR2,
                len: 16,
                write: false,
            },
            Desc {
                addr: READ_BUF,
                len: SECTOR as u32,
                write: true,
            },
            Desc {
                addr: STATUS2,
                len: 1,
                write: true,
            },
        ]
    }

    fn write_then_read(r: &mut Rig, mode: &DiskMode) -> Result<(u32, u32), DeviceError> {
        header(&r.mem, HDR, T_OUT, 3);
        r.mem
            .write_slice(&[0xAB; SECTOR as usize], GuestAddress(DATA))
            .unwrap();
        header(&r.mem, HDR2, T_IN, 3);
        let w = [
            Desc {
                addr: HDR,
                len: 16,
                write: false,
            },
            Desc {
                addr: DATA,
                len: SECTOR as u32,
                write: false,
            },
            Desc {
                addr: STATUS,
                len: 1,
                write: true,
            },
        ];
        let rd = read_chain();
        let mut ctx = ExitCtx {
            mem: &r.mem,
            exit: 7,
            inputs: &mut r.inputs,
        };
        let a = r.blk.execute(&w, &mut ctx, mode)?;
        let b = r.blk.execute(&rd, &mut ctx, mode)?;
        Ok((a, b))
    }

    fn sector3(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()[3 * SECTOR as usize..4 * SECTOR as usize].to_vec()
    }

    /// Fills sector 3 of the image with `b` behind the device's back.
    fn set_sector3(path: &Path, b: u8) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .write_all_at(&[b; SECTOR as usize], 3 * SECTOR)
            .unwrap();
    }

    /// The sector the read request of [`write_then_read`] delivered into guest memory.
    fn read_data(mem: &GuestMem) -> Vec<u8> {
        let mut buf = vec![0u8; SECTOR as usize];
        mem.read_slice(&mut buf, GuestAddress(READ_BUF)).unwrap();
        buf
    }

    #[test]
    fn replay_mode_never_touches_the_file_and_go_live_completes_the_missing_requests() {
        let mut r = rig();
        let h = r.blk.handle();
        let lens = write_then_read(&mut r, &DiskMode::Replay).unwrap();
        // Same used lengths as a primary computes (status byte, read data + status).
        assert_eq!(lens, (1, SECTOR as u32 + 1));
        assert_eq!(sector3(&r.path), vec![0; SECTOR as usize], "file touched");
        assert_eq!(byte(&r.mem, STATUS), STATUS_PENDING);
        assert_eq!(byte(&r.mem, STATUS2), STATUS_PENDING);
        let c = h.counters();
        assert_eq!((c.dropped, c.reads, c.writes), (1, 0, 0));
        // The log completed the write (the primary performed it: its status was logged), not
        // the read: going live at this exit executes the read alone, on the file.
        set_sector3(&r.path, 0xAB);
        r.mem.write_slice(&[S_OK], GuestAddress(STATUS)).unwrap();
        assert_eq!(h.go_live(7, &r.mem), 1);
        assert_eq!(byte(&r.mem, STATUS2), S_OK);
        assert_eq!(read_data(&r.mem), vec![0xAB; SECTOR as usize]);
        let c = h.counters();
        assert_eq!((c.redone, c.reads, c.writes), (1, 1, 0));
        assert!(matches!(h.mode(), DiskMode::Direct));
    }

    #[test]
    fn go_live_executes_every_request_from_the_first_incomplete_one() {
        let mut r = rig();
        let h = r.blk.handle();
        write_then_read(&mut r, &DiskMode::Replay).unwrap();
        // Nothing of exit 7 was logged: the write and the read are executed, in order.
        assert_eq!(h.go_live(7, &r.mem), 2);
        assert_eq!(sector3(&r.path), vec![0xAB; SECTOR as usize]);
        assert_eq!((byte(&r.mem, STATUS), byte(&r.mem, STATUS2)), (S_OK, S_OK));
        assert_eq!(read_data(&r.mem), vec![0xAB; SECTOR as usize]);
        assert_eq!(h.counters().redone, 2);
    }

    #[test]
    fn go_live_at_a_later_exit_executes_nothing() {
        let mut r = rig();
        let h = r.blk.handle();
        write_then_read(&mut r, &DiskMode::Replay).unwrap();
        // The backup left exit 7 (it saw an entry of a later exit): its requests were done.
        assert_eq!(h.go_live(8, &r.mem), 0);
        assert_eq!(sector3(&r.path), vec![0; SECTOR as usize]);
        assert_eq!(h.counters().redone, 0);
    }

    #[test]
    fn a_write_fenced_off_by_a_newer_owner_never_reaches_the_file() {
        let mut old = rig();
        let h = old.blk.handle();
        // The old writer owns the disk in generation 1 and writes.
        assert_eq!(h.take_ownership(1).unwrap().previous, 0);
        write_then_read(&mut old, &DiskMode::Direct).unwrap();
        assert_eq!(sector3(&old.path), vec![0xAB; SECTOR as usize]);
        // A new owner (its own open of the image and of the record) takes generation 2.
        let new = Blk::open(&old.path).unwrap();
        let taken = new.handle().take_ownership(2).unwrap();
        assert_eq!((taken.previous, taken.forced), (1, false));
        // The old writer's next write is refused; the image is unchanged.
        set_sector3(&old.path, 0x11);
        let e = write_then_read(&mut old, &DiskMode::Direct).unwrap_err();
        assert!(
            e.to_string().contains("holds generation 2, ours is 1"),
            "{e}"
        );
        assert_eq!(sector3(&old.path), vec![0x11; SECTOR as usize]);
        assert_eq!(h.superseded_by(), Some(2));
        let c = h.counters();
        assert_eq!((c.writes, c.refused), (1, 1));
        // Taking the disk back with the old generation is refused too.
        assert!(matches!(
            h.take_ownership(1),
            Err(BlkError::Superseded {
                owner: 2,
                ours: 1,
                ..
            })
        ));
        // The new owner's write lands.
        let mut new = Rig {
            _dir: tempfile::tempdir().unwrap(),
            path: old.path.clone(),
            blk: new,
            mem: crate::memory::allocate(4 << 20).unwrap(),
            inputs: Inputs::default(),
        };
        write_then_read(&mut new, &DiskMode::Direct).unwrap();
        assert_eq!(sector3(&old.path), vec![0xAB; SECTOR as usize]);
        assert_eq!(new.blk.handle().counters().writes, 1);
    }

    /// Own-copy mode, replaying: the backup performs the requests on its copy; the primary's
    /// statuses (here written into guest memory as the log would) are compared at the end of
    /// the exit. Equal: nothing happens. The primary's write failed where the backup's
    /// succeeded: the copy differs, the device stops with a [`CopyFailure`] naming the request.
    /// (The backup's own write failing — a full disk — is the process-level test
    /// `ftvm/tests/takeover.rs`.)
    #[test]
    fn a_backup_with_its_own_copy_compares_each_result_with_the_primarys() {
        let mut r = rig();
        r.inputs = Inputs::Replay(Box::new(crate::record::memlog::MemReplay::new(Vec::new())));
        let h = r.blk.handle();
        write_then_read(&mut r, &DiskMode::Direct).unwrap();
        assert_eq!(sector3(&r.path), vec![0xAB; SECTOR as usize], "not written");
        // The primary's statuses: OK, OK.
        r.blk.check_replayed_exit(&r.mem, 7).unwrap();
        assert_eq!(h.copy_failure(), None);
        // Checks of another exit are not this exit's.
        write_then_read(&mut r, &DiskMode::Direct).unwrap();
        r.blk.check_replayed_exit(&r.mem, 8).unwrap();
        // The primary's write failed (IOERR), the backup's succeeded.
        write_then_read(&mut r, &DiskMode::Direct).unwrap();
        r.mem.write_slice(&[S_IOERR], GuestAddress(STATUS)).unwrap();
        let e = r.blk.check_replayed_exit(&r.mem, 7).unwrap_err();
        let f = h.copy_failure().expect("copy failure kept");
        assert_eq!(
            f,
            CopyFailure {
                exit: 7,
                request: "write",
                sector: 3,
                ours: S_OK,
                primary: S_IOERR,
                error: None,
            }
        );
        assert_eq!(e.to_string(), f.to_string());
        assert_eq!(
            f.to_string(),
            "the backup's own disk copy failed: the write of sector 3 at exit 7 returned OK on \
             the backup but IOERR on the primary"
        );
        // A failure with an OS error names it.
        let full = CopyFailure {
            ours: S_IOERR,
            primary: S_OK,
            error: Some(CopyIoError::from(&std::io::Error::from_raw_os_error(
                libc::ENOSPC,
            ))),
            ..f
        };
        assert!(
            full.to_string()
                .contains("returned IOERR (No space left on device (os error 28)) on the backup"),
            "{full}"
        );
        // Live (not replaying): nothing is recorded, nothing compared.
        r.inputs = Inputs::default();
        write_then_read(&mut r, &DiskMode::Direct).unwrap();
        r.mem.write_slice(&[S_IOERR], GuestAddress(STATUS)).unwrap();
        r.blk.check_replayed_exit(&r.mem, 7).unwrap();
    }

    /// The pages of the VMM's dirty bitmap of `mem` (cleared).
    fn vmm_dirty(mem: &GuestMem) -> Vec<u64> {
        use vm_memory::GuestMemoryBackend;
        let r = mem.iter().next().unwrap();
        let n = vm_memory::GuestMemoryRegion::len(r) / crate::dirty::PAGE_SIZE;
        let set = DirtySet::from_bits(vm_memory::mmap::MmapRegion::bitmap(r).get_and_reset(), n);
        set.runs()
            .flat_map(|r| r.first..r.first + r.count)
            .collect()
    }

    /// Only the device writes guest memory here (a disk read, its status byte): the pages it
    /// wrote are dirty in the VMM's bitmap, which KVM's dirty log never sees; and the blocks the
    /// guest's write request touched are dirty for a live copy of the image.
    #[test]
    fn a_disk_read_dirties_the_pages_it_fills_and_a_write_the_blocks_it_touches() {
        let mut r = rig();
        let h = r.blk.handle();
        assert!(matches!(
            h.start_dirty_tracking(1000),
            Err(BlkError::BlockSize(1000))
        ));
        h.start_dirty_tracking(1024).unwrap();
        write_then_read(&mut r, &DiskMode::Direct).unwrap();
        // A read request alone, set up by the "guest" before the bitmap is cleared.
        set_sector3(&r.path, 0x5A);
        header(&r.mem, HDR2, T_IN, 3);
        vmm_dirty(&r.mem);
        let rd = read_chain();
        let mut ctx = ExitCtx {
            mem: &r.mem,
            exit: 8,
            inputs: &mut r.inputs,
        };
        r.blk.execute(&rd, &mut ctx, &DiskMode::Direct).unwrap();
        // The read buffer (0x13_0000) and the status byte (0x12_0100): nothing else.
        assert_eq!(vmm_dirty(&r.mem), vec![0x120, 0x130]);
        assert_eq!(read_data(&r.mem), vec![0x5A; SECTOR as usize]);
        // The guest's write of sector 3 = bytes 1536..2048: block 1 of 1024 bytes (the
        // test's own write of the file beside the device is not the guest's).
        let blocks = h.take_dirty_blocks().unwrap();
        assert_eq!(
            blocks
                .runs()
                .map(|r| (r.first, r.count))
                .collect::<Vec<_>>(),
            vec![(1, 1)]
        );
        assert!(h.take_dirty_blocks().unwrap().is_empty(), "taking clears");
        let mut buf = [0u8; 512];
        h.read_at(&mut buf, 3 * SECTOR).unwrap();
        assert_eq!(buf, [0x5A; 512]);
        h.stop_dirty_tracking();
        assert!(h.take_dirty_blocks().is_none());
    }

    struct Barrier(Result<(), BarrierError>, std::sync::atomic::AtomicU64);

    impl WriteBarrier for Barrier {
        fn before_write(&self) -> Result<(), BarrierError> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0
        }
    }

    #[test]
    fn gated_writes_pass_the_barrier_or_never_reach_the_file() {
        let mut r = rig();
        let h = r.blk.handle();
        let refuse = Arc::new(Barrier(Err(BarrierError::Superseded), AtomicU64::new(0)));
        let e = write_then_read(&mut r, &DiskMode::Gated(refuse.clone())).unwrap_err();
        assert!(
            e.to_string()
                .contains("withheld: this primary was superseded"),
            "{e}"
        );
        assert_eq!(sector3(&r.path), vec![0; SECTOR as usize]);
        assert_eq!(refuse.1.load(Ordering::Relaxed), 1);
        let pass = Arc::new(Barrier(Ok(()), AtomicU64::new(0)));
        write_then_read(&mut r, &DiskMode::Gated(pass.clone())).unwrap();
        assert_eq!(sector3(&r.path), vec![0xAB; SECTOR as usize]);
        // Only the write asks the barrier; the read does not wait.
        assert_eq!(pass.1.load(Ordering::Relaxed), 1);
        let c = h.counters();
        assert_eq!((c.refused, c.gated, c.writes, c.reads), (1, 1, 1, 1));
    }
}
