//! Fault injection below the reliability layer: [`FaultyTransport`] wraps any transport and,
//! with a seeded generator, loses, duplicates, reorders and truncates the frames it sends, and
//! refuses sends as a full link would (the sender must keep the frame and try again later).

use crate::error::TransportError;
use crate::transport::Transport;

/// Fault probabilities (each in `0.0..=1.0`, applied per frame sent) and the seed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Frame silently dropped.
    pub loss: f64,
    /// Frame sent twice.
    pub duplicate: f64,
    /// Frame held back and sent after the next one.
    pub reorder: f64,
    /// Frame cut at a random length.
    pub truncate: f64,
    /// Send refused as if the link were full (`Ok(false)`, nothing sent): the sender keeps the
    /// frame and offers it again later, after other work (acks) may have moved its state on.
    pub refuse: f64,
    /// Seed of the generator (same seed, same faults for the same frame sequence).
    pub seed: u64,
}

impl Faults {
    /// The same probability for every kind of fault.
    pub fn uniform(p: f64, seed: u64) -> Self {
        Self {
            loss: p,
            duplicate: p,
            reorder: p,
            truncate: p,
            refuse: p,
            seed,
        }
    }
}

/// How many faults were injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Frames dropped.
    pub lost: u64,
    /// Frames duplicated.
    pub duplicated: u64,
    /// Frames reordered.
    pub reordered: u64,
    /// Frames truncated.
    pub truncated: u64,
    /// Sends refused.
    pub refused: u64,
}

/// A transport that misbehaves on purpose.
#[derive(Debug)]
pub struct FaultyTransport<T> {
    inner: T,
    faults: Faults,
    state: u64,
    held: Option<Vec<u8>>,
    held_flushes: u32,
    counts: FaultCounts,
}

impl<T: Transport> FaultyTransport<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, faults: Faults) -> Self {
        Self {
            inner,
            faults,
            state: faults.seed ^ 0x9E37_79B9_7F4A_7C15,
            held: None,
            held_flushes: 0,
            counts: FaultCounts::default(),
        }
    }

    /// Faults injected so far.
    pub fn counts(&self) -> FaultCounts {
        self.counts
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn roll(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn release_held(&mut self) -> Result<(), TransportError> {
        if let Some(h) = self.held.take() {
            if !self.inner.send(&h)? {
                self.held = Some(h);
            }
        }
        Ok(())
    }
}

impl<T: Transport> Transport for FaultyTransport<T> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn max_frame(&self) -> usize {
        self.inner.max_frame()
    }

    fn send(&mut self, frame: &[u8]) -> Result<bool, TransportError> {
        if self.roll(self.faults.refuse) {
            self.counts.refused += 1;
            return Ok(false);
        }
        if self.roll(self.faults.loss) {
            self.counts.lost += 1;
            return Ok(true);
        }
        if self.held.is_none() && self.roll(self.faults.reorder) {
            self.counts.reordered += 1;
            self.held = Some(frame.to_vec());
            self.held_flushes = 0;
            return Ok(true);
        }
        let ok = if self.roll(self.faults.truncate) && frame.len() > 1 {
            self.counts.truncated += 1;
            let cut = 1 + (self.next() as usize) % (frame.len() - 1);
            self.inner.send(&frame[..cut])?
        } else {
            self.inner.send(frame)?
        };
        if !ok {
            return Ok(false);
        }
        if self.roll(self.faults.duplicate) && self.inner.send(frame)? {
            self.counts.duplicated += 1;
        }
        self.release_held()?;
        Ok(true)
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        if self.held.is_some() {
            self.held_flushes += 1;
            if self.held_flushes > 2 {
                self.release_held()?;
            }
        }
        self.inner.flush()
    }

    fn poll_recv(&mut self, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        self.inner.poll_recv(on_frame)
    }

    fn wait(&mut self, timeout: std::time::Duration) -> Result<(), TransportError> {
        self.inner.wait(timeout)
    }
}
