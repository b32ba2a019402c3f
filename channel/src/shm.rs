//! Shared-memory transport: two log-buffer rings in `/dev/shm` (or any directory), one per
//! direction, between two processes on one host. The physical-limit reference.
//!
//! ```text
//!   process A (creator)                           process B (opener)
//!   Producer ──▶ <prefix>.a2b  (ftvm-ringbuf Ring) ──▶ Consumer
//!   Consumer ◀── <prefix>.b2a  (ftvm-ringbuf Ring) ◀── Producer
//! ```
//!
//! One frame = one record of the ring (kind [`FRAME_KIND`]). The sender writes each frame
//! straight into the ring ([`Transport::send_in_place`]: records go from the primary's log
//! buffer into the shared mapping in one copy); receiving hands the frame to the caller straight out of the shared mapping
//! (zero-copy) and releases it afterwards. The creator unlinks both files when dropped.
//! Frames are published atomically (the ring's release store), so a peer that dies never
//! leaves a partial frame: it is detected by the reliability layer's peer timeout.
//!
//! A third file, `<prefix>.bell`, lets an idle receiver sleep instead of spinning: after
//! [`SPIN_BEFORE_SLEEP`] without traffic, [`Transport::wait`] announces "asleep" in its
//! direction's slot and waits on a futex there; a sender that publishes a frame and sees the
//! peer asleep bumps the futex word and wakes it. With both VMs of a pair on a host of few
//! cores, two spinning shm pollers would otherwise take CPU time from the vCPUs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ftvm_ringbuf::{layout, ClaimError, Consumer, Producer, Region, Ring, SharedRegion};

use crate::error::TransportError;
use crate::transport::Transport;

/// Record kind used for frames in the rings.
pub const FRAME_KIND: u16 = 0x53;
/// Largest frame carried.
pub const SHM_MAX_FRAME: usize = 64 << 10;

/// Idle time (no frame sent or received) before [`Transport::wait`] sleeps on the bell: about
/// an acknowledgement's round trip, so a sender waiting for its ack does not pay a wake-up.
pub const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(50);

/// Magic at the start of the bell file.
const BELL_MAGIC: u64 = u64::from_le_bytes(*b"FTVMBEL1");
/// Size of the bell file: the magic, then one 64-byte slot per direction (`a2b` at 64, `b2a`
/// at 128), each a futex word (u32) and an "asleep" flag (u32).
const BELL_LEN: usize = 4096;

/// The wake-up words both ends map (see the module documentation).
#[derive(Debug)]
struct Bell {
    region: SharedRegion,
    /// Slot of the direction this end receives on / sends on.
    rx_slot: usize,
    tx_slot: usize,
}

impl Bell {
    fn create(path: &Path) -> Result<Self, TransportError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".init");
        let tmp = PathBuf::from(tmp);
        let region = SharedRegion::create_file(&tmp, BELL_LEN)
            .map_err(|e| setup(format!("shm bell {}: {e}", tmp.display())))?;
        let bell = Bell {
            region,
            rx_slot: 128,
            tx_slot: 64,
        };
        bell.magic().store(BELL_MAGIC, Ordering::Release);
        std::fs::rename(&tmp, path).map_err(|source| TransportError::Io {
            op: "rename shm bell",
            source,
        })?;
        Ok(bell)
    }

    fn open(path: &Path, deadline: Instant) -> Result<Self, TransportError> {
        let region = loop {
            match SharedRegion::open(path) {
                Ok(r) => break r,
                Err(e) if Instant::now() > deadline => {
                    return Err(setup(format!("shm bell {}: {e}", path.display())))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        if region.len() < BELL_LEN {
            return Err(setup(format!(
                "shm bell {}: {} bytes, expected {BELL_LEN}",
                path.display(),
                region.len()
            )));
        }
        let bell = Bell {
            region,
            rx_slot: 64,
            tx_slot: 128,
        };
        if bell.magic().load(Ordering::Acquire) != BELL_MAGIC {
            return Err(setup(format!("shm bell {}: bad magic", path.display())));
        }
        Ok(bell)
    }

    fn magic(&self) -> &AtomicU64 {
        // SAFETY: the mapping is BELL_LEN ≥ 8 bytes, page-aligned, and lives as long as
        // `self.region`; both processes access these bytes only through atomics.
        unsafe { &*self.region.base().as_ptr().cast::<AtomicU64>() }
    }

    /// The futex word (at `slot`) and the asleep flag (at `slot + 4`).
    fn slot(&self, slot: usize) -> (&AtomicU32, &AtomicU32) {
        debug_assert!(slot + 8 <= BELL_LEN && slot % 64 == 0);
        // SAFETY: `slot + 8 ≤ BELL_LEN` (slots are 64 and 128), 4-byte aligned offsets in a
        // page-aligned mapping that lives as long as `self.region`; shared through atomics only.
        unsafe {
            let base = self.region.base().as_ptr().add(slot);
            (
                &*base.cast::<AtomicU32>(),
                &*base.add(4).cast::<AtomicU32>(),
            )
        }
    }

    /// After publishing a frame: wakes the peer if it sleeps on its receiving slot.
    fn ring(&self) {
        let (word, asleep) = self.slot(self.tx_slot);
        // Pairs with the fence in `sleep`: either the peer sees the frame before it sleeps, or
        // this sees it asleep.
        fence(Ordering::SeqCst);
        if asleep.load(Ordering::Relaxed) != 0 {
            word.fetch_add(1, Ordering::SeqCst);
            futex(word, libc::FUTEX_WAKE, 1, None);
        }
    }

    /// Sleeps up to `timeout` unless `ready()` says a frame is there.
    fn sleep(&self, timeout: Duration, ready: impl Fn() -> bool) {
        let (word, asleep) = self.slot(self.rx_slot);
        let seen = word.load(Ordering::SeqCst);
        asleep.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if !ready() {
            futex(word, libc::FUTEX_WAIT, seen, Some(timeout));
        }
        asleep.store(0, Ordering::Relaxed);
    }
}

/// `futex(2)` on a word of a shared mapping (not `FUTEX_PRIVATE_FLAG`: the peer is another
/// process). Errors (`EAGAIN`: the word changed; `ETIMEDOUT`; `EINTR`) need no handling: the
/// caller polls again either way.
fn futex(word: &AtomicU32, op: libc::c_int, val: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(t.subsec_nanos().min(999_999_999) as i32),
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned u32 in a shared mapping that outlives the call; the
    // timespec (or null) lives across the call; the remaining arguments are unused by
    // FUTEX_WAIT/FUTEX_WAKE.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op,
            val,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// One end of a shared-memory link.
#[derive(Debug)]
pub struct ShmTransport {
    tx: Producer,
    rx: Consumer,
    max_frame: usize,
    bell: Bell,
    /// Since when nothing was sent or received (for [`SPIN_BEFORE_SLEEP`]).
    idle_since: Option<Instant>,
    unlink: Option<[PathBuf; 3]>,
}

fn setup(what: String) -> TransportError {
    TransportError::Setup { what }
}

fn paths(prefix: &Path) -> [PathBuf; 3] {
    let with = |ext: &str| {
        let mut p = prefix.as_os_str().to_owned();
        p.push(ext);
        PathBuf::from(p)
    };
    [with(".a2b"), with(".b2a"), with(".bell")]
}

fn create_ring(path: &Path, capacity: usize) -> Result<std::sync::Arc<Ring>, TransportError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".init");
    let tmp = PathBuf::from(tmp);
    let region = SharedRegion::create_file(&tmp, layout::region_len(capacity))
        .map_err(|e| setup(format!("shm ring {}: {e}", tmp.display())))?;
    let ring = Ring::init(region, capacity)
        .map_err(|e| setup(format!("shm ring {}: {e}", tmp.display())))?;
    // Appear under the final name only once formatted.
    std::fs::rename(&tmp, path).map_err(|source| TransportError::Io {
        op: "rename shm ring",
        source,
    })?;
    Ok(ring)
}

fn open_ring(path: &Path, deadline: Instant) -> Result<std::sync::Arc<Ring>, TransportError> {
    loop {
        match SharedRegion::open(path) {
            Ok(region) => {
                return Ring::attach(region)
                    .map_err(|e| setup(format!("shm ring {}: {e}", path.display())))
            }
            Err(e) if Instant::now() > deadline => {
                return Err(setup(format!("shm ring {}: {e}", path.display())))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

impl ShmTransport {
    /// Creates the two rings (`capacity` data bytes each, a power of two) as `<prefix>.a2b`
    /// and `<prefix>.b2a` and returns the creator's end. The files are removed when it drops.
    ///
    /// # Errors
    /// [`TransportError::Setup`] when the files cannot be created or formatted.
    pub fn create(prefix: &Path, capacity: usize) -> Result<Self, TransportError> {
        let [a2b, b2a, bell] = paths(prefix);
        for p in [&a2b, &b2a, &bell] {
            let _ = std::fs::remove_file(p);
        }
        // The bell first: an opener waits for the rings, which appear last.
        let bell_end = Bell::create(&bell)?;
        let tx_ring = create_ring(&a2b, capacity)?;
        let rx_ring = create_ring(&b2a, capacity)?;
        Self::ends(tx_ring, rx_ring, bell_end, Some([a2b, b2a, bell]))
    }

    /// Opens the rings another process created under `prefix`, waiting up to `timeout` for
    /// them to appear.
    ///
    /// # Errors
    /// [`TransportError::Setup`] when they do not appear or are not valid rings, or another
    /// live process holds this end.
    pub fn open(prefix: &Path, timeout: Duration) -> Result<Self, TransportError> {
        let [a2b, b2a, bell] = paths(prefix);
        let deadline = Instant::now() + timeout;
        let rx_ring = open_ring(&a2b, deadline)?;
        let tx_ring = open_ring(&b2a, deadline)?;
        let bell = Bell::open(&bell, deadline)?;
        Self::ends(tx_ring, rx_ring, bell, None)
    }

    fn ends(
        tx: std::sync::Arc<Ring>,
        rx: std::sync::Arc<Ring>,
        bell: Bell,
        unlink: Option<[PathBuf; 3]>,
    ) -> Result<Self, TransportError> {
        let max_frame = SHM_MAX_FRAME.min(tx.max_payload()).min(rx.max_payload());
        let tx = Producer::new(tx).map_err(|e| setup(format!("shm sending ring: {e}")))?;
        let rx = Consumer::new(rx).map_err(|e| setup(format!("shm receiving ring: {e}")))?;
        Ok(Self {
            tx,
            rx,
            max_frame,
            bell,
            idle_since: None,
            unlink,
        })
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        if let Some(paths) = &self.unlink {
            for p in paths {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

impl Transport for ShmTransport {
    fn name(&self) -> &'static str {
        "shm"
    }

    fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn send(&mut self, frame: &[u8]) -> Result<bool, TransportError> {
        Ok(self
            .send_in_place(frame.len(), &mut |out| out.copy_from_slice(frame))?
            .unwrap_or(false))
    }

    /// Zero-copy: the frame is written straight into the shared ring (no staging copy).
    fn send_in_place(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Option<bool>, TransportError> {
        match self.tx.claim(FRAME_KIND, len) {
            Ok(mut c) => {
                fill(&mut c);
                c.commit();
                self.idle_since = None;
                self.bell.ring();
                Ok(Some(true))
            }
            Err(ClaimError::Full { .. }) => Ok(Some(false)),
            Err(ClaimError::TooLarge { len, max }) => {
                Err(TransportError::FrameTooLarge { len, max })
            }
            Err(e) => Err(setup(format!("shm send: {e}"))),
        }
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        Ok(())
    }

    fn poll_recv(&mut self, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        let batch = self.rx.read();
        if batch.is_empty() {
            return Ok(0);
        }
        let mut n = 0;
        for r in batch.records() {
            match r {
                Ok(r) => {
                    on_frame(r.payload());
                    n += 1;
                }
                Err(e) => {
                    return Err(TransportError::Log {
                        what: format!("shm ring: {e}"),
                    })
                }
            }
        }
        batch.release();
        self.idle_since = None;
        Ok(n)
    }

    /// Sleeps on the bell (at most `timeout`) once nothing was sent or received for
    /// [`SPIN_BEFORE_SLEEP`]; before that returns at once (the caller spins).
    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        let now = Instant::now();
        let since = *self.idle_since.get_or_insert(now);
        if now.duration_since(since) < SPIN_BEFORE_SLEEP {
            return Ok(());
        }
        let rx = &mut self.rx;
        let ring = std::sync::Arc::clone(rx.ring());
        let head = rx.position();
        self.bell.sleep(timeout, || ring.tail_position() != head);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle receiver sleeps on the bell until the peer's next frame wakes it (not until its
    /// timeout), and a wait with a frame already there does not sleep.
    #[test]
    fn idle_receiver_sleeps_until_a_frame_rings_the_bell() {
        // The creator removes the files when dropped.
        let prefix = std::env::temp_dir().join(format!("ftvm-shm-bell-{}", std::process::id()));
        let mut a = ShmTransport::create(&prefix, 1 << 16).unwrap();
        let mut b = ShmTransport::open(&prefix, Duration::from_secs(5)).unwrap();
        // Become idle for longer than SPIN_BEFORE_SLEEP.
        b.wait(Duration::from_secs(5)).unwrap();
        std::thread::sleep(SPIN_BEFORE_SLEEP * 2);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            assert!(a.send(b"wake up").unwrap());
            a
        });
        let t = Instant::now();
        b.wait(Duration::from_secs(20)).unwrap();
        let slept = t.elapsed();
        assert!(
            slept >= Duration::from_millis(30),
            "did not sleep: {slept:?}"
        );
        assert!(
            slept < Duration::from_secs(15),
            "not woken by the frame: {slept:?}"
        );
        let mut got = Vec::new();
        assert_eq!(b.poll_recv(&mut |f| got.push(f.to_vec())).unwrap(), 1);
        assert_eq!(got, vec![b"wake up".to_vec()]);
        // A frame waiting: no sleep even when idle long enough.
        let mut a = sender.join().unwrap();
        std::thread::sleep(SPIN_BEFORE_SLEEP * 2);
        b.wait(Duration::from_secs(5)).unwrap();
        assert!(a.send(b"second").unwrap());
        let t = Instant::now();
        b.wait(Duration::from_secs(20)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(15));
    }
}
