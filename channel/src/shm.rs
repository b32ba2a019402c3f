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

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ftvm_ringbuf::{layout, ClaimError, Consumer, Producer, Ring, SharedRegion};

use crate::error::TransportError;
use crate::transport::Transport;

/// Record kind used for frames in the rings.
pub const FRAME_KIND: u16 = 0x5348;
/// Largest frame carried.
pub const SHM_MAX_FRAME: usize = 64 << 10;

/// One end of a shared-memory link.
#[derive(Debug)]
pub struct ShmTransport {
    tx: Producer,
    rx: Consumer,
    max_frame: usize,
    unlink: Option<[PathBuf; 2]>,
}

fn setup(what: String) -> TransportError {
    TransportError::Setup { what }
}

fn paths(prefix: &Path) -> [PathBuf; 2] {
    let mut a = prefix.as_os_str().to_owned();
    a.push(".a2b");
    let mut b = prefix.as_os_str().to_owned();
    b.push(".b2a");
    [PathBuf::from(a), PathBuf::from(b)]
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
        let [a2b, b2a] = paths(prefix);
        let _ = std::fs::remove_file(&a2b);
        let _ = std::fs::remove_file(&b2a);
        let tx_ring = create_ring(&a2b, capacity)?;
        let rx_ring = create_ring(&b2a, capacity)?;
        Self::ends(tx_ring, rx_ring, Some([a2b, b2a]))
    }

    /// Opens the rings another process created under `prefix`, waiting up to `timeout` for
    /// them to appear.
    ///
    /// # Errors
    /// [`TransportError::Setup`] when they do not appear or are not valid rings, or another
    /// live process holds this end.
    pub fn open(prefix: &Path, timeout: Duration) -> Result<Self, TransportError> {
        let [a2b, b2a] = paths(prefix);
        let deadline = Instant::now() + timeout;
        let rx_ring = open_ring(&a2b, deadline)?;
        let tx_ring = open_ring(&b2a, deadline)?;
        Self::ends(tx_ring, rx_ring, None)
    }

    fn ends(
        tx: std::sync::Arc<Ring>,
        rx: std::sync::Arc<Ring>,
        unlink: Option<[PathBuf; 2]>,
    ) -> Result<Self, TransportError> {
        let max_frame = SHM_MAX_FRAME.min(tx.max_payload()).min(rx.max_payload());
        let tx = Producer::new(tx).map_err(|e| setup(format!("shm sending ring: {e}")))?;
        let rx = Consumer::new(rx).map_err(|e| setup(format!("shm receiving ring: {e}")))?;
        Ok(Self {
            tx,
            rx,
            max_frame,
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
        Ok(n)
    }
}
