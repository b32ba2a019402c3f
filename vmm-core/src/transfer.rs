//! Live state transfer: a running VM's memory, disk and final state, as plain [`Chunk`]s, so
//! that a second VM continues from exactly the exit where the first one was cut.
//!
//! This module is the VM side only, and sans-IO: a [`Source`] yields chunks, a [`Sink`]
//! applies them; carrying them (over the logging channel, in the replication layer) is the
//! caller's business. A chunk encodes to bytes ([`Chunk::encode`], format below) and back.
//!
//! # The protocol, from the source's side
//! ```text
//!            ┌────────── round r ≥ 1: the pages (and disk blocks) dirtied during round r-1 ─┐
//!  Header ─> round 0: every page, every disk block ──> harvest ──> converged? ── no ───────┘
//!                                                                   │ yes: Step::Pause
//!          caller pauses the VM at an exit boundary, captures its MachineState
//!                                                                   │ stop_and_copy(state)
//!          last dirty pages + last dirty blocks ──> Final(state) ──> Step::Done
//! ```
//! 1. **Pre-copy.** [`Source::next_step`] starts dirty tracking ([`DirtyLog`] for memory,
//!    [`BlkHandle::start_dirty_tracking`] for an image copied live) and yields the
//!    [`Chunk::Header`] (configuration, disk size), then every page of round 0 and every disk
//!    block, while the guest runs on. At the end of each round it takes the dirty set (pages
//!    written meanwhile by the vCPU *and* by the VMM's devices) and sends those in the next
//!    round. A page is read after the harvest that named it, so a write that lands after the
//!    read is in the next harvest: every round's copy of a page is at least as new as the
//!    harvest before it.
//! 2. **Convergence rule** ([`Convergence`]): stop pre-copying when the dirty set left at the
//!    end of a round is small enough to be sent within the target pause
//!    ([`Convergence::max_final_bytes`] = link bandwidth × target pause), or when
//!    [`Convergence::max_rounds`] rounds were sent (a guest that dirties memory faster than the
//!    link sends never converges by itself: the caller then throttles its vCPU — the
//!    replication layer's auto-converge lever — or accepts the longer pause). Each round's
//!    figures ([`RoundStats`]: pages, bytes, duration, dirty rate) are there for that decision
//!    and for progress lines.
//! 3. **Stop-and-copy.** [`Source::next_step`] returns [`Step::Pause`]; the caller pauses the VM
//!    (`VmThread::pause`, or its own run loop's kick: the vCPU stops *between two exits*),
//!    captures its [`MachineState`] (`VmThread::capture` / [`Vm::capture`]) and hands it to
//!    [`Source::stop_and_copy`], which takes the dirty sets one last time (nothing writes any
//!    more: every device write happens on the vCPU thread, during an exit) and yields the last
//!    pages and blocks, then [`Chunk::Final`], then [`Step::Done`]. The pause costs those last
//!    pages plus the ~5 KiB state. The source VM may then resume (it goes on, e.g. as a primary
//!    recording from this exit on) or stop (a migration).
//!
//! # The receiving side
//! [`Sink::apply`] takes the chunks in order: the header builds a [`Vm`] with zeroed memory and
//! the receiver's own backends (its disk path, TAP, console; no ELF is loaded), pages are
//! written into its memory, disk blocks into its image, and the final state is applied
//! ([`Vm::apply_state`]); [`Sink::finish`] returns the VM.
//!
//! # Why the continuation is exact
//! At the pause the vCPU is between two exits (no MMIO access is half done: `Vcpu::run`
//! completes a pending read before returning), and no VMM thread writes guest memory outside
//! an exit, so memory, registers and device state form one consistent cut. Every page written
//! since the previous harvest is in the final harvest (KVM for the vCPU's stores, vm-memory's
//! bitmap for the devices'), so the receiver's memory equals the source's at the cut, byte for
//! byte; the [`MachineState`] carries the vCPU (registers, XSAVE, MSRs, events), every device's
//! registers and virtqueue positions, the WAIT events already due, the clock (which goes on
//! from its value at the cut) and the exit counters. The receiver's next exit therefore has
//! the index the source's next exit would have had, and from the same state the same guest
//! code reaches it: record/replay can start right there (the source records from exit
//! `state.exit_index()`, the receiver replays from it). What is *not* carried: frames the
//! source's TAP received that the guest has not been given yet (they stay with the source's
//! backend: a source that goes on delivers and logs them; a migrated VM loses them like frames
//! on a wire) and the disk image in shared-disk mode (both sides name the same file).
//! The tests (`vmm-core/tests/transfer.rs`) check all of this: memory and register digests
//! equal right after the cut, and the receiver running to power-off with the console output,
//! exit count and final digests of a VM that was never transferred.
//!
//! # Chunk format (all integers little-endian)
//! ```text
//! 0x00  kind  u32   1 HEADER, 2 PAGES, 3 DISK, 4 FINAL
//! 0x04  crc   u32   CRC32C of the payload
//! 0x08  addr  u64   PAGES: guest-physical address (page aligned); DISK: byte offset; else 0
//! 0x10  len   u64   payload bytes
//! 0x18  payload     HEADER: postcard(Header); PAGES/DISK: the bytes; FINAL: the state's
//!                   sections (vmm-core/src/state.rs), each versioned and checksummed
//! ```

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::devices::virtio::blk::{BlkError, BlkHandle};
use crate::dirty::{DirtyError, DirtyLog, DirtySet, PageRun, PAGE_SIZE};
use crate::memory::GuestMem;
use crate::state::{ConfigState, MachineState, StateError};
use crate::vm::{Vm, VmConfig, VmError};

/// Version of the transfer stream (the [`Header`] and the chunk framing).
pub const TRANSFER_VERSION: u32 = 1;
/// Default largest payload of a pages or disk chunk (64 KiB: 16 pages).
pub const DEFAULT_CHUNK_BYTES: usize = 64 << 10;
/// Default dirty-tracking block of a disk copied live (64 KiB).
pub const DEFAULT_DISK_BLOCK: u64 = 64 << 10;

/// Errors of a transfer, on either side.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Dirty-page tracking failed.
    #[error("dirty tracking")]
    Dirty(#[from] DirtyError),
    /// The disk cannot be tracked.
    #[error("disk")]
    Blk(#[from] BlkError),
    /// Reading or writing a disk image failed.
    #[error("disk image {path}")]
    DiskIo {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading the source's guest memory failed.
    #[error("guest memory at {gpa:#x} (+{len}) cannot be read or written")]
    Memory {
        /// The address.
        gpa: u64,
        /// The length.
        len: u64,
    },
    /// The final state does not encode or decode.
    #[error("final state")]
    State(#[from] StateError),
    /// The receiving VM could not be built or refused the state.
    #[error("receiving VM")]
    Vm(#[from] VmError),
    /// A chunk came out of order (`got` where `expected`).
    #[error("transfer chunk {got} where {expected} was expected")]
    Order {
        /// What the sink expected.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// A method was called in the wrong phase of the source.
    #[error("transfer source: {0}")]
    Phase(&'static str),
    /// A chunk's bytes are shorter than its framing says.
    #[error("transfer chunk truncated")]
    Truncated,
    /// A chunk of unknown kind.
    #[error("transfer chunk of unknown kind {0}")]
    Kind(u32),
    /// A chunk's payload does not match its CRC32C.
    #[error("transfer chunk damaged (CRC32C {found:#010x}, header says {expected:#010x})")]
    Checksum {
        /// Computed.
        found: u32,
        /// In the header.
        expected: u32,
    },
    /// The header is of another transfer version.
    #[error("transfer version {found}; this build speaks {expected}")]
    Version {
        /// Received.
        found: u32,
        /// Ours.
        expected: u32,
    },
    /// The header does not decode.
    #[error("transfer header")]
    Header(#[source] postcard::Error),
    /// The receiver's disk configuration does not fit the source's.
    #[error("disk: {0}")]
    DiskConfig(String),
}

/// What the receiver needs before the first page: the VM's configuration and its disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// [`TRANSFER_VERSION`].
    pub version: u32,
    /// Memory size, command line, devices present.
    pub config: ConfigState,
    /// The disk, if the VM has one.
    pub disk: Option<DiskHeader>,
}

/// The source's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskHeader {
    /// Image size in bytes.
    pub bytes: u64,
    /// Whether the image is copied ([`Chunk::Disk`]); `false`: both sides name the same file
    /// (shared-disk mode), nothing is copied.
    pub copied: bool,
}

/// One piece of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// First: configuration and disk.
    Header(Header),
    /// Guest memory at `gpa` (whole pages).
    Pages {
        /// Guest-physical address.
        gpa: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Disk image bytes at `offset`.
    Disk {
        /// Byte offset in the image.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Last: the state at the cut.
    Final(Box<MachineState>),
}

/// The fixed header of an encoded chunk.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct ChunkHeader {
    kind: u32,
    crc: u32,
    addr: u64,
    len: u64,
}

mod kind {
    pub const HEADER: u32 = 1;
    pub const PAGES: u32 = 2;
    pub const DISK: u32 = 3;
    pub const FINAL: u32 = 4;
}

impl Chunk {
    /// A short name (`header`, `pages`, `disk`, `final`).
    pub fn name(&self) -> &'static str {
        match self {
            Chunk::Header(_) => "header",
            Chunk::Pages { .. } => "pages",
            Chunk::Disk { .. } => "disk",
            Chunk::Final(_) => "final",
        }
    }

    /// Payload bytes (what a link carries besides the 24-byte framing).
    pub fn payload_len(&self) -> usize {
        match self {
            Chunk::Pages { data, .. } | Chunk::Disk { data, .. } => data.len(),
            Chunk::Header(_) | Chunk::Final(_) => 0,
        }
    }

    /// The chunk's bytes (format in the module documentation).
    ///
    /// # Errors
    /// [`TransferError::State`] if the final state does not encode.
    pub fn encode(&self) -> Result<Vec<u8>, TransferError> {
        let (k, addr, owned, data): (u32, u64, Vec<u8>, Option<&[u8]>) = match self {
            Chunk::Header(h) => (
                kind::HEADER,
                0,
                postcard::to_stdvec(h).map_err(TransferError::Header)?,
                None,
            ),
            Chunk::Pages { gpa, data } => (kind::PAGES, *gpa, Vec::new(), Some(data)),
            Chunk::Disk { offset, data } => (kind::DISK, *offset, Vec::new(), Some(data)),
            Chunk::Final(s) => (kind::FINAL, 0, s.to_bytes()?, None),
        };
        let payload = data.unwrap_or(&owned);
        let h = ChunkHeader {
            kind: k,
            crc: crc32c::crc32c(payload),
            addr,
            len: payload.len() as u64,
        };
        let mut out = Vec::with_capacity(size_of::<ChunkHeader>() + payload.len());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(payload);
        Ok(out)
    }

    /// Decodes what [`Chunk::encode`] wrote (exactly one chunk).
    ///
    /// # Errors
    /// [`TransferError::Truncated`], [`TransferError::Kind`], [`TransferError::Checksum`],
    /// [`TransferError::Version`], [`TransferError::Header`], [`TransferError::State`].
    pub fn decode(bytes: &[u8]) -> Result<Chunk, TransferError> {
        let (h, payload) =
            ChunkHeader::read_from_prefix(bytes).map_err(|_| TransferError::Truncated)?;
        if payload.len() as u64 != h.len {
            return Err(TransferError::Truncated);
        }
        let found = crc32c::crc32c(payload);
        if found != h.crc {
            return Err(TransferError::Checksum {
                found,
                expected: h.crc,
            });
        }
        Ok(match h.kind {
            kind::HEADER => {
                let hd: Header = postcard::from_bytes(payload).map_err(TransferError::Header)?;
                if hd.version != TRANSFER_VERSION {
                    return Err(TransferError::Version {
                        found: hd.version,
                        expected: TRANSFER_VERSION,
                    });
                }
                Chunk::Header(hd)
            }
            kind::PAGES => Chunk::Pages {
                gpa: h.addr,
                data: payload.to_vec(),
            },
            kind::DISK => Chunk::Disk {
                offset: h.addr,
                data: payload.to_vec(),
            },
            kind::FINAL => Chunk::Final(Box::new(MachineState::from_bytes(payload)?)),
            k => return Err(TransferError::Kind(k)),
        })
    }
}

/// When pre-copy stops (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Convergence {
    /// Most pre-copy rounds (round 0, the full copy, included).
    pub max_rounds: u32,
    /// Stop when the memory and disk left dirty after a round fit in this many bytes.
    pub max_final_bytes: u64,
}

impl Convergence {
    /// The rule for a link of `bytes_per_s` and a target pause: stop when the rest would be
    /// sent within `pause`, after at most `max_rounds` rounds.
    pub fn for_link(bytes_per_s: f64, pause: Duration, max_rounds: u32) -> Self {
        Convergence {
            max_rounds,
            max_final_bytes: (bytes_per_s * pause.as_secs_f64()) as u64,
        }
    }
}

impl Default for Convergence {
    /// 30 rounds; 3 GB/s × 10 ms (this host's TCP transport and a 10 ms pause).
    fn default() -> Self {
        Convergence::for_link(3e9, Duration::from_millis(10), 30)
    }
}

/// How a [`Source`] works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceConfig {
    /// When pre-copy stops.
    pub convergence: Convergence,
    /// Largest payload of a pages or disk chunk (a multiple of [`PAGE_SIZE`]).
    pub chunk_bytes: usize,
    /// Copy the disk image live (own-copy mode); `false`: the receiver names the same image.
    pub copy_disk: bool,
    /// Dirty-tracking block of the disk (a multiple of 512).
    pub disk_block: u64,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            convergence: Convergence::default(),
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            copy_disk: true,
            disk_block: DEFAULT_DISK_BLOCK,
        }
    }
}

/// The figures of one round.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RoundStats {
    /// Round number (0: the full copy; the stop-and-copy is the last, `final_round`).
    pub round: u32,
    /// Whether this is the stop-and-copy.
    pub final_round: bool,
    /// Pages sent.
    pub pages: u64,
    /// Disk blocks sent.
    pub disk_blocks: u64,
    /// Payload bytes sent (pages and disk).
    pub bytes: u64,
    /// From the round's first chunk to its harvest.
    pub duration: Duration,
    /// Pages found dirty at the harvest ending this round (what the next round sends).
    pub dirty_after: u64,
    /// Of those, written by the vCPU (KVM) / by the VMM's devices.
    pub dirty_kvm: u64,
    /// See `dirty_kvm`.
    pub dirty_vmm: u64,
    /// Time the harvest took (`KVM_GET_DIRTY_LOG` + the VMM bitmap).
    pub harvest: Duration,
}

impl RoundStats {
    /// Pages dirtied per second during this round.
    pub fn dirty_rate(&self) -> f64 {
        self.dirty_after as f64 / self.duration.as_secs_f64().max(1e-9)
    }
}

/// What [`Source::next_step`] asks of its caller.
#[derive(Debug)]
pub enum Step {
    /// Send this chunk.
    Chunk(Chunk),
    /// Pre-copy converged (or hit its round bound): pause the VM, capture its state and call
    /// [`Source::stop_and_copy`].
    Pause,
    /// Everything was sent; tracking is stopped.
    Done,
}

/// The parts of a VM a [`Source`] reads while the VM runs on its own thread. Take it before
/// handing the VM to its thread ([`TransferHandle::of`]).
#[derive(Debug, Clone)]
pub struct TransferHandle {
    config: ConfigState,
    mem: GuestMem,
    dirty: DirtyLog,
    disk: Option<BlkHandle>,
}

impl TransferHandle {
    /// The handle of `vm`.
    pub fn of(vm: &Vm) -> Self {
        TransferHandle {
            config: vm.config_state(),
            mem: vm.memory().clone(),
            dirty: vm.dirty_log(),
            disk: vm.disk().cloned(),
        }
    }

    /// The VM's guest memory (the same mapping: reading it while the guest runs is racy by
    /// nature, which pre-copy allows for).
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Live,
    AwaitPause,
    Final,
    Done,
}

/// What is left to send of the current round.
#[derive(Debug, Default)]
struct Pending {
    runs: Vec<PageRun>,
    next: usize,
    blocks: Vec<PageRun>,
    next_block: usize,
}

/// The sending side (see the module documentation). Dropping it stops the tracking.
#[derive(Debug)]
pub struct Source {
    h: TransferHandle,
    cfg: SourceConfig,
    phase: Phase,
    pending: Pending,
    state: Option<Box<MachineState>>,
    cur: RoundStats,
    started: Instant,
    rounds: Vec<RoundStats>,
}

impl Source {
    /// A source over the VM of `handle`. Nothing happens until [`Source::next_step`].
    pub fn new(handle: TransferHandle, cfg: SourceConfig) -> Self {
        let chunk_bytes =
            (cfg.chunk_bytes.max(PAGE_SIZE as usize) / PAGE_SIZE as usize) * PAGE_SIZE as usize;
        Source {
            h: handle,
            cfg: SourceConfig { chunk_bytes, ..cfg },
            phase: Phase::Start,
            pending: Pending::default(),
            state: None,
            cur: Self::round(0, false),
            started: Instant::now(),
            rounds: Vec::new(),
        }
    }

    fn round(round: u32, final_round: bool) -> RoundStats {
        RoundStats {
            round,
            final_round,
            pages: 0,
            disk_blocks: 0,
            bytes: 0,
            duration: Duration::ZERO,
            dirty_after: 0,
            dirty_kvm: 0,
            dirty_vmm: 0,
            harvest: Duration::ZERO,
        }
    }

    /// The figures of every round finished so far.
    pub fn rounds(&self) -> &[RoundStats] {
        &self.rounds
    }

    fn copies_disk(&self) -> Option<&BlkHandle> {
        self.h.disk.as_ref().filter(|_| self.cfg.copy_disk)
    }

    /// Sets the pages and disk blocks of the next round to send.
    fn load(&mut self, pages: &DirtySet, blocks: Option<&DirtySet>) {
        self.pending = Pending {
            runs: pages.runs().collect(),
            next: 0,
            blocks: blocks.map(|b| b.runs().collect()).unwrap_or_default(),
            next_block: 0,
        };
        self.started = Instant::now();
    }

    /// The next thing to do (see [`Step`]).
    ///
    /// # Errors
    /// [`TransferError`]: tracking or reading failed (tracking is then stopped on drop; the VM
    /// is not affected), or the source is waiting for [`Source::stop_and_copy`].
    pub fn next_step(&mut self) -> Result<Step, TransferError> {
        loop {
            match self.phase {
                Phase::Start => {
                    self.h.dirty.start()?;
                    let disk = self.h.disk.as_ref().map(|d| DiskHeader {
                        bytes: d.size_bytes(),
                        copied: self.cfg.copy_disk,
                    });
                    let blocks = match self.copies_disk() {
                        Some(d) => {
                            d.start_dirty_tracking(self.cfg.disk_block)?;
                            Some(DirtySet::full(d.size_bytes().div_ceil(self.cfg.disk_block)))
                        }
                        None => None,
                    };
                    self.load(&DirtySet::full(self.h.dirty.pages()), blocks.as_ref());
                    self.phase = Phase::Live;
                    return Ok(Step::Chunk(Chunk::Header(Header {
                        version: TRANSFER_VERSION,
                        config: self.h.config.clone(),
                        disk,
                    })));
                }
                Phase::Live | Phase::Final => {
                    if let Some(c) = self.next_chunk()? {
                        return Ok(Step::Chunk(c));
                    }
                    if self.phase == Phase::Final {
                        return self.finish();
                    }
                    if self.end_round()? {
                        self.phase = Phase::AwaitPause;
                        return Ok(Step::Pause);
                    }
                }
                Phase::AwaitPause => {
                    return Err(TransferError::Phase(
                        "waiting for stop_and_copy (pause the VM and capture its state)",
                    ))
                }
                Phase::Done => return Ok(Step::Done),
            }
        }
    }

    /// Ends the live round just sent: harvests, records its figures, and decides whether
    /// pre-copy has converged (`true`) or loads the next round.
    fn end_round(&mut self) -> Result<bool, TransferError> {
        let t = Instant::now();
        let h = self.h.dirty.take()?;
        let blocks = self.copies_disk().and_then(BlkHandle::take_dirty_blocks);
        let mut r = self.cur;
        r.duration = self.started.elapsed();
        r.harvest = t.elapsed();
        (r.dirty_after, r.dirty_kvm, r.dirty_vmm) = (h.pages.count(), h.kvm, h.vmm);
        self.rounds.push(r);
        let left = r.dirty_after * PAGE_SIZE
            + blocks
                .as_ref()
                .map_or(0, |b| b.count() * self.cfg.disk_block);
        self.cur = Self::round(r.round + 1, false);
        self.load(&h.pages, blocks.as_ref());
        Ok(left <= self.cfg.convergence.max_final_bytes
            || r.round + 1 >= self.cfg.convergence.max_rounds)
    }

    /// The stop-and-copy: `state` was captured with the VM paused at an exit boundary after
    /// [`Step::Pause`] (or earlier: the caller may cut pre-copy short). Then call
    /// [`Source::next_step`] for the last pages and blocks, [`Chunk::Final`] and [`Step::Done`].
    ///
    /// # Errors
    /// [`TransferError::Phase`] before the header was sent or after the final state;
    /// [`TransferError::Dirty`].
    pub fn stop_and_copy(&mut self, state: MachineState) -> Result<(), TransferError> {
        if !matches!(self.phase, Phase::Live | Phase::AwaitPause) {
            return Err(TransferError::Phase(
                "stop_and_copy before the header or twice",
            ));
        }
        let t = Instant::now();
        let h = self.h.dirty.take()?;
        // What the interrupted round had not sent yet is sent now, with the last harvest.
        let mut pages = DirtySet::empty(self.h.dirty.pages());
        for run in &self.pending.runs[self.pending.next..] {
            for p in run.first..run.first + run.count {
                pages.insert(p);
            }
        }
        pages.union(&h.pages);
        let blocks = self.copies_disk().map(|d| {
            let mut b = d.take_dirty_blocks().unwrap_or_else(|| DirtySet::empty(0));
            for run in &self.pending.blocks[self.pending.next_block..] {
                for p in run.first..run.first + run.count {
                    b.insert(p);
                }
            }
            b
        });
        self.cur = Self::round(self.cur.round, true);
        self.cur.harvest = t.elapsed();
        (self.cur.dirty_kvm, self.cur.dirty_vmm) = (h.kvm, h.vmm);
        self.load(&pages, blocks.as_ref());
        self.state = Some(Box::new(state));
        self.phase = Phase::Final;
        Ok(())
    }

    fn finish(&mut self) -> Result<Step, TransferError> {
        let mut r = self.cur;
        r.duration = self.started.elapsed();
        self.rounds.push(r);
        self.stop_tracking();
        self.phase = Phase::Done;
        match self.state.take() {
            Some(s) => Ok(Step::Chunk(Chunk::Final(s))),
            None => Err(TransferError::Phase("no final state")),
        }
    }

    fn stop_tracking(&self) {
        if let Err(e) = self.h.dirty.stop() {
            tracing::warn!(error = %e, "transfer: cannot stop dirty logging");
        }
        if let Some(d) = self.copies_disk() {
            d.stop_dirty_tracking();
        }
    }

    /// The next pages (or disk) chunk of the current round, if any is left.
    fn next_chunk(&mut self) -> Result<Option<Chunk>, TransferError> {
        let max_pages = (self.cfg.chunk_bytes as u64 / PAGE_SIZE).max(1);
        let p = &mut self.pending;
        if let Some(run) = p.runs.get_mut(p.next) {
            let n = run.count.min(max_pages);
            let (gpa, len) = (run.gpa(), n * PAGE_SIZE);
            run.first += n;
            run.count -= n;
            if run.count == 0 {
                p.next += 1;
            }
            let mut data = vec![0u8; len as usize];
            self.h
                .mem
                .read_slice(&mut data, GuestAddress(gpa))
                .map_err(|_| TransferError::Memory { gpa, len })?;
            self.cur.pages += n;
            self.cur.bytes += len;
            return Ok(Some(Chunk::Pages { gpa, data }));
        }
        let block = self.cfg.disk_block;
        let per_chunk = (self.cfg.chunk_bytes as u64 / block).max(1);
        let Some(disk) = self.h.disk.as_ref().filter(|_| self.cfg.copy_disk) else {
            return Ok(None);
        };
        let Some(run) = p.blocks.get_mut(p.next_block) else {
            return Ok(None);
        };
        let n = run.count.min(per_chunk);
        let offset = run.first * block;
        let len = (n * block).min(disk.size_bytes().saturating_sub(offset));
        run.first += n;
        run.count -= n;
        if run.count == 0 {
            p.next_block += 1;
        }
        let mut data = vec![0u8; len as usize];
        disk.read_at(&mut data, offset)
            .map_err(|source| TransferError::DiskIo {
                path: PathBuf::from("(source image)"),
                source,
            })?;
        self.cur.disk_blocks += n;
        self.cur.bytes += len;
        Ok(Some(Chunk::Disk { offset, data }))
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if self.phase != Phase::Done {
            self.stop_tracking();
        }
    }
}

/// The receiving side (see the module documentation).
#[derive(Debug)]
pub struct Sink {
    backends: VmConfig,
    vm: Option<Vm>,
    disk: Option<(File, PathBuf)>,
    finished: bool,
    pages: u64,
    disk_bytes: u64,
}

impl Sink {
    /// A sink that builds its VM with `backends` (disk path, TAP, console); memory size and
    /// command line come from the header. With a copied disk, `backends.disk` is created (or
    /// truncated) at the source's size and filled by the transfer; with a shared disk it must
    /// name an image of the source's size.
    pub fn new(backends: &VmConfig) -> Self {
        Sink {
            backends: backends.clone(),
            vm: None,
            disk: None,
            finished: false,
            pages: 0,
            disk_bytes: 0,
        }
    }

    /// Pages and disk bytes received so far.
    pub fn received(&self) -> (u64, u64) {
        (self.pages, self.disk_bytes)
    }

    /// Applies the next chunk.
    ///
    /// # Errors
    /// [`TransferError::Order`] (a chunk before the header, after the final state, a second
    /// header), [`TransferError::Memory`] (pages outside RAM), [`TransferError::DiskIo`],
    /// [`TransferError::DiskConfig`], [`TransferError::Vm`] (the VM cannot be built or refuses
    /// the state).
    pub fn apply(&mut self, chunk: Chunk) -> Result<(), TransferError> {
        if self.finished {
            return Err(TransferError::Order {
                expected: "nothing after the final state",
                got: chunk.name(),
            });
        }
        let name = chunk.name();
        match (chunk, &mut self.vm) {
            (Chunk::Header(h), None) => {
                self.open_disk(h.disk)?;
                self.vm = Some(Vm::for_state(&self.backends, &h.config)?);
            }
            (Chunk::Pages { gpa, data }, Some(vm)) => {
                let len = data.len() as u64;
                vm.memory()
                    .write_slice(&data, GuestAddress(gpa))
                    .map_err(|_| TransferError::Memory { gpa, len })?;
                self.pages += len / PAGE_SIZE;
            }
            (Chunk::Disk { offset, data }, Some(_)) => {
                let Some((f, path)) = &self.disk else {
                    return Err(TransferError::DiskConfig(
                        "disk data for a VM whose disk is not copied".into(),
                    ));
                };
                f.write_all_at(&data, offset)
                    .map_err(|source| TransferError::DiskIo {
                        path: path.clone(),
                        source,
                    })?;
                self.disk_bytes += data.len() as u64;
            }
            (Chunk::Final(state), Some(vm)) => {
                vm.apply_state(&state)?;
                self.finished = true;
            }
            (_, None) => {
                return Err(TransferError::Order {
                    expected: "header",
                    got: name,
                })
            }
            (Chunk::Header(_), Some(_)) => {
                return Err(TransferError::Order {
                    expected: "pages, disk or final",
                    got: name,
                })
            }
        }
        Ok(())
    }

    fn open_disk(&mut self, disk: Option<DiskHeader>) -> Result<(), TransferError> {
        let path = self.backends.disk.clone();
        let (d, path) = match (disk, path) {
            (None, None) => return Ok(()),
            (Some(d), Some(p)) => (d, p),
            (d, p) => {
                return Err(TransferError::DiskConfig(format!(
                    "the source has {}, the receiver {}",
                    if d.is_some() { "a disk" } else { "no disk" },
                    if p.is_some() {
                        "names one"
                    } else {
                        "names none"
                    }
                )))
            }
        };
        let io = |source| TransferError::DiskIo {
            path: path.clone(),
            source,
        };
        if d.copied {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(io)?;
            f.set_len(d.bytes).map_err(io)?;
            self.disk = Some((f, path));
        } else {
            let len = std::fs::metadata(&path).map_err(io)?.len();
            if len != d.bytes {
                return Err(TransferError::DiskConfig(format!(
                    "shared image {} has {len} bytes, the source's has {}",
                    path.display(),
                    d.bytes
                )));
            }
        }
        Ok(())
    }

    /// The VM, once the final state is applied: its next exit has the index the source's
    /// next exit would have had.
    ///
    /// # Errors
    /// [`TransferError::Order`] if the final state has not arrived (the half-built VM is
    /// dropped).
    pub fn finish(self) -> Result<Vm, TransferError> {
        match (self.finished, self.vm) {
            (true, Some(vm)) => {
                if let Some((f, path)) = &self.disk {
                    f.sync_data().map_err(|source| TransferError::DiskIo {
                        path: path.clone(),
                        source,
                    })?;
                }
                Ok(vm)
            }
            _ => Err(TransferError::Order {
                expected: "final",
                got: "end of transfer",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_bad_bytes_are_refused() {
        let header = Chunk::Header(Header {
            version: TRANSFER_VERSION,
            config: ConfigState {
                mem_size: 4 << 20,
                cmdline: "x=1".into(),
                devices: [false, true, true],
            },
            disk: Some(DiskHeader {
                bytes: 8 << 20,
                copied: true,
            }),
        });
        let chunks = [
            header.clone(),
            Chunk::Pages {
                gpa: 0x3000,
                data: vec![5; 8192],
            },
            Chunk::Disk {
                offset: 65536,
                data: vec![6; 4096],
            },
            Chunk::Final(Box::new(crate::state::tests::sample())),
        ];
        for c in &chunks {
            let bytes = c.encode().unwrap();
            assert_eq!(&Chunk::decode(&bytes).unwrap(), c);
            assert!(matches!(
                Chunk::decode(&bytes[..bytes.len() - 1]),
                Err(TransferError::Truncated)
            ));
            let mut bad = bytes.clone();
            *bad.last_mut().unwrap() ^= 1;
            assert!(matches!(
                Chunk::decode(&bad),
                Err(TransferError::Checksum { .. })
            ));
        }
        let mut other = header.encode().unwrap();
        other[0] = 9;
        assert!(matches!(Chunk::decode(&other), Err(TransferError::Kind(9))));
        let Chunk::Header(mut h) = header else {
            unreachable!()
        };
        h.version = 2;
        let e = Chunk::decode(&Chunk::Header(h).encode().unwrap()).unwrap_err();
        assert!(
            matches!(
                e,
                TransferError::Version {
                    found: 2,
                    expected: 1
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn a_sink_refuses_chunks_out_of_order() {
        let mut sink = Sink::new(&VmConfig::default());
        let e = sink
            .apply(Chunk::Pages {
                gpa: 0,
                data: vec![0; 4096],
            })
            .unwrap_err();
        assert!(
            matches!(
                e,
                TransferError::Order {
                    expected: "header",
                    got: "pages"
                }
            ),
            "{e:?}"
        );
        assert!(matches!(
            sink.finish(),
            Err(TransferError::Order {
                expected: "final",
                ..
            })
        ));
    }

    #[test]
    fn convergence_for_a_link() {
        let c = Convergence::for_link(1e9, Duration::from_millis(20), 7);
        assert_eq!(c.max_final_bytes, 20_000_000);
        assert_eq!(c.max_rounds, 7);
    }
}
