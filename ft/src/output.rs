//! The output rule: an output of the primary leaves the machine only once the backup holds the
//! log up to the position that was current when the output was produced.
//!
//! Outputs are handed to an [`OutputGate`] with their tag (a log sequence number); a releaser
//! thread passes them to their sink, in order, as soon as the acknowledged position reaches the
//! tag. The primary's vCPU never waits for it. Every release records how long the output waited
//! (an HdrHistogram, microseconds) and checks the rule once more against the acknowledged
//! position read at release time ([`OutputStats::early`] must stay 0).
//!
//! Console output is collected by the VM into a buffer ([`OutputGate::add_buffer_source`]);
//! whoever drains it tags the bytes with the log position read *after* draining, which is never
//! smaller than the position current when they were produced (conservative: it can only make
//! them wait longer, never shorter). A primary drains it on the vCPU thread at the end of the
//! exit that wrote it ([`OutputGate::source_drainer`]), so the tag is exactly that exit's
//! position; the releaser thread drains it too, as a safety net. Transmitted network frames come from the net device
//! through [`OutputGate::tx_gate`], tagged exactly with the position current when the guest
//! notified the TX queue.
//!
//! Fencing: with [`OutputGate::set_fence`], an output is released only while this side's
//! generation is the fence's current one. A primary that learns it has been superseded (it lost
//! the arbiter) advances its fence, and from then on the gate releases nothing. When the primary
//! runs alone (it won the next generation), [`OutputGate::release_all`] stops waiting for
//! acknowledgements, still under the fence.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::thread::Thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::fence::Fence;
use ftvm_vmm_core::devices::virtio::net::{NetHandle, TxGate};

/// Where the acknowledged log position comes from.
pub trait AckSource: Send + Sync {
    /// Highest log sequence number the backup holds.
    fn acked(&self) -> u64;
}

impl AckSource for ftvm_channel::reliable::SenderShared {
    fn acked(&self) -> u64 {
        self.acked_seq()
    }
}

impl AckSource for AtomicU64 {
    fn acked(&self) -> u64 {
        self.load(Ordering::Acquire)
    }
}

/// A destination for released outputs (the TAP, the console).
pub type Sink = Box<dyn FnMut(&[u8]) + Send>;

/// Counters of the output rule.
#[derive(Debug, Clone)]
pub struct OutputStats {
    /// Outputs submitted.
    pub produced: u64,
    /// Outputs released.
    pub released: u64,
    /// Bytes released.
    pub bytes: u64,
    /// Releases where the acknowledged position was below the tag (must be 0), outside
    /// [`OutputGate::release_all`] mode.
    pub early: u64,
    /// Releases made without acknowledgement because this side runs alone
    /// ([`OutputGate::release_all`]).
    pub released_alone: u64,
    /// Times the releaser found outputs ready but the fence refused this side's generation.
    pub fenced: u64,
    /// Most outputs waiting at once.
    pub max_pending: usize,
    /// Delay each output waited, in microseconds.
    pub delay_us: Histogram<u64>,
    /// `(tag, acknowledged position at release)` of the first releases (for checks).
    pub releases: Vec<(u64, u64)>,
}

/// How many `(tag, acked)` pairs are kept.
pub const KEPT_RELEASES: usize = 4096;

impl Default for OutputStats {
    fn default() -> Self {
        OutputStats {
            produced: 0,
            released: 0,
            bytes: 0,
            early: 0,
            released_alone: 0,
            fenced: 0,
            max_pending: 0,
            // 1 µs .. 1 h, 3 significant digits: valid bounds, cannot fail.
            delay_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!())),
            releases: Vec::new(),
        }
    }
}

/// A buffer the VM appends output to, and the sink its bytes go to.
type BufferSource = (Arc<Mutex<Vec<u8>>>, usize);

struct Pending {
    tag: u64,
    sink: usize,
    data: Vec<u8>,
    at: Instant,
}

struct Inner {
    acks: Arc<dyn AckSource>,
    position: Arc<AtomicU64>,
    pending: Mutex<VecDeque<Pending>>,
    sinks: Mutex<Vec<Sink>>,
    sources: Mutex<Vec<BufferSource>>,
    stats: Mutex<OutputStats>,
    stop: AtomicBool,
    /// The fence and the generation this side acts in (`None`: not fenced).
    fence: Mutex<Option<(Fence, Arc<AtomicU64>)>>,
    /// Running alone: outputs no longer wait for acknowledgements.
    alone: AtomicBool,
    /// The releaser is (about to be) parked: a submit must unpark it.
    sleeping: AtomicBool,
    /// The releaser thread, for `unpark`.
    releaser: OnceLock<Thread>,
    /// Tag of the oldest pending output (`u64::MAX`: none), read without the queue's lock by
    /// [`Inner::on_ack`].
    front_tag: AtomicU64,
    /// The channel's poller calls [`Inner::on_ack`] after acknowledgements arrive
    /// ([`OutputGate::hook_into`]): the releaser thread no longer polls while outputs wait.
    hooked: AtomicBool,
    /// The VM drains the buffer sources itself when it writes to them
    /// ([`OutputGate::source_drainer`]): the releaser looks at them only every
    /// [`PUSHED_SOURCES_POLL`].
    sources_pushed: AtomicBool,
}

/// How often the releaser drains the buffer sources (console output) itself, and how often it
/// wakes while the poller's hook releases outputs.
const SOURCES_POLL: Duration = Duration::from_millis(1);
/// The same once the VM hands its console output over at the exit that wrote it
/// ([`OutputGate::source_drainer`]): only a safety net then. Each wake-up of a sleeping thread
/// costs ~15 µs of CPU on these nested-KVM hosts; a thousand a second was ~3 % of a primary's
/// CPU under load.
const PUSHED_SOURCES_POLL: Duration = Duration::from_millis(50);

impl Inner {
    fn drain_sources(&self) {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        for (buf, sink) in sources.iter() {
            let data = std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()));
            if !data.is_empty() {
                // Read after draining: ≥ the position when the bytes were produced.
                let tag = self.position.load(Ordering::Acquire);
                self.submit(*sink, tag, data);
            }
        }
    }

    fn submit(&self, sink: usize, tag: u64, data: Vec<u8>) {
        let mut q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if q.is_empty() {
            self.front_tag.store(tag, Ordering::SeqCst);
        }
        q.push_back(Pending {
            tag,
            sink,
            data,
            at: Instant::now(),
        });
        let n = q.len();
        drop(q);
        // With the poller's hook, an output whose tag is acknowledged already (the ack came
        // before it was queued, so no later ack may come to release it) is released by the
        // releaser thread. The fence pairs with the one in `on_ack`: either the hook sees this
        // output's tag, or this sees the ack.
        let hooked_ready = self.hooked.load(Ordering::Acquire) && {
            std::sync::atomic::fence(Ordering::SeqCst);
            self.alone.load(Ordering::Acquire) || self.acks.acked() >= tag
        };
        // SeqCst pairs with the releaser's store before its last look at the queue: either it
        // sees this output, or this sees it sleeping and wakes it.
        if hooked_ready || self.sleeping.load(Ordering::SeqCst) {
            if let Some(t) = self.releaser.get() {
                t.unpark();
            }
        }
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.produced += 1;
        s.max_pending = s.max_pending.max(n);
    }

    /// Whether this side may release outputs now (its generation is the fence's current one).
    fn fence_allows(&self) -> bool {
        match &*self.fence.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((fence, generation)) => fence.current() == generation.load(Ordering::Acquire),
            None => true,
        }
    }

    /// Whether outputs wait for an acknowledgement that may come any moment (so the releaser
    /// should poll rather than sleep).
    fn awaiting_ack(&self) -> bool {
        !self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
            && self.fence_allows()
    }

    /// The releaser's loop: releases what is acknowledged; while outputs wait for an ack it
    /// polls (spin, then yield: an ack is tens of microseconds away, and waking a parked thread
    /// costs ~60 µs here); with nothing waiting it parks until the next submit (console buffers,
    /// which do not submit, are looked at every millisecond).
    ///
    /// With the poller's hook ([`OutputGate::hook_into`]) the acknowledgements release outputs
    /// on the poller thread, and this thread only drains the console buffers (every
    /// millisecond), releases outputs that were acknowledged before they were queued (woken by
    /// the submit), and everything once this side runs alone.
    fn releaser_loop(&self) {
        let mut poll = ftvm_ringbuf::IdleKind::Yield.build();
        while !self.stop.load(Ordering::Acquire) {
            self.drain_sources();
            let n = self.release();
            if self.hooked.load(Ordering::Acquire) && !self.alone.load(Ordering::Acquire) {
                std::thread::park_timeout(if self.sources_pushed.load(Ordering::Acquire) {
                    PUSHED_SOURCES_POLL
                } else {
                    SOURCES_POLL
                });
                continue;
            }
            if n > 0 || self.awaiting_ack() {
                poll.idle(n);
                continue;
            }
            self.sleeping.store(true, Ordering::SeqCst);
            if !self.awaiting_ack() {
                std::thread::park_timeout(SOURCES_POLL);
            }
            self.sleeping.store(false, Ordering::SeqCst);
            poll.reset();
        }
    }

    /// Called on the channel poller's thread after acknowledgements arrived: releases what they
    /// allow. Cheap when nothing waits (two atomic loads).
    fn on_ack(&self) {
        // Pairs with the fence in `submit` (see there).
        std::sync::atomic::fence(Ordering::SeqCst);
        let front = self.front_tag.load(Ordering::SeqCst);
        if front != u64::MAX && self.acks.acked() >= front {
            self.release();
        }
    }

    /// Releases every output whose tag is acknowledged; returns how many.
    ///
    /// Takes the sinks' lock first: the releaser thread and the poller's hook may both
    /// release, and the lock keeps one batch from overtaking another.
    fn release(&self) -> usize {
        let alone = self.alone.load(Ordering::Acquire);
        let acked = if alone { u64::MAX } else { self.acks.acked() };
        if !self.fence_allows() {
            let q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if q.front().is_some_and(|p| p.tag <= acked) {
                drop(q);
                self.stats.lock().unwrap_or_else(|e| e.into_inner()).fenced += 1;
            }
            return 0;
        }
        let mut sinks = self.sinks.lock().unwrap_or_else(|e| e.into_inner());
        let mut ready = Vec::new();
        {
            let mut q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            while q.front().is_some_and(|p| p.tag <= acked) {
                if let Some(p) = q.pop_front() {
                    ready.push(p);
                }
            }
            if !ready.is_empty() {
                let front = q.front().map_or(u64::MAX, |p| p.tag);
                self.front_tag.store(front, Ordering::SeqCst);
            }
        }
        if ready.is_empty() {
            return 0;
        }
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        for p in &ready {
            // The output rule: released only once the backup holds its position (or alone).
            assert!(
                alone || p.tag <= acked,
                "output tagged {} released at ack {acked}",
                p.tag
            );
            let now_acked = self.acks.acked();
            if alone {
                s.released_alone += 1;
            } else if now_acked < p.tag {
                s.early += 1;
            }
            if let Some(sink) = sinks.get_mut(p.sink) {
                sink(&p.data);
            }
            let waited = p.at.elapsed().as_micros().max(1) as u64;
            let _ = s.delay_us.record(waited.min(3_600_000_000));
            s.released += 1;
            s.bytes += p.data.len() as u64;
            if s.releases.len() < KEPT_RELEASES {
                s.releases.push((p.tag, now_acked));
            }
        }
        ready.len()
    }
}

/// The output gate of a primary (see the module documentation).
pub struct OutputGate {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for OutputGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputGate").finish_non_exhaustive()
    }
}

impl OutputGate {
    /// Registers this gate's counters with `observer` (the statistics' lock is taken once per
    /// snapshot for a copy of the counters and the delay histogram).
    pub fn observe_into(&self, observer: &super::observe::Observer) {
        let inner = Arc::clone(&self.inner);
        observer.set_outputs(move || {
            let (s, delay) = {
                let s = inner.stats.lock().unwrap_or_else(|e| e.into_inner());
                (
                    (
                        s.produced,
                        s.released,
                        s.bytes,
                        s.early,
                        s.released_alone,
                        s.fenced,
                        s.max_pending,
                    ),
                    s.delay_us.clone(),
                )
            };
            let (produced, released, bytes, early, released_alone, fenced, max_pending) = s;
            super::observe::OutputsSnapshot {
                produced,
                released,
                held: produced.saturating_sub(released),
                bytes,
                early,
                released_alone,
                fenced,
                max_pending: max_pending as u64,
                delay: super::observe::delay_snapshot(&delay),
            }
        });
    }

    /// Starts the releaser thread. `acks` gives the acknowledged position, `position` the
    /// primary's current log position (last sequence number logged).
    ///
    /// # Errors
    /// The I/O error if the thread cannot be spawned.
    pub fn start(acks: Arc<dyn AckSource>, position: Arc<AtomicU64>) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            acks,
            position,
            pending: Mutex::new(VecDeque::new()),
            sinks: Mutex::new(Vec::new()),
            sources: Mutex::new(Vec::new()),
            stats: Mutex::new(OutputStats::default()),
            stop: AtomicBool::new(false),
            fence: Mutex::new(None),
            alone: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            releaser: OnceLock::new(),
            front_tag: AtomicU64::new(u64::MAX),
            hooked: AtomicBool::new(false),
            sources_pushed: AtomicBool::new(false),
        });
        let i = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("ftvm-output".into())
            .spawn(move || i.releaser_loop())?;
        let _ = inner.releaser.set(thread.thread().clone());
        Ok(OutputGate {
            inner,
            thread: Some(thread),
        })
    }

    /// Registers a sink; returns its id for [`OutputGate::submit`].
    pub fn add_sink(&self, sink: Sink) -> usize {
        let mut s = self.inner.sinks.lock().unwrap_or_else(|e| e.into_inner());
        s.push(sink);
        s.len() - 1
    }

    /// Registers a buffer the VM appends output to (its console); the releaser drains it, tags
    /// the bytes and releases them to `sink` under the rule.
    pub fn add_buffer_source(&self, buf: Arc<Mutex<Vec<u8>>>, sink: Sink) {
        let id = self.add_sink(sink);
        self.inner
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((buf, id));
    }

    /// A function that drains the buffer sources now, on the calling thread, tagging their
    /// bytes with the log position current then: the VM calls it at the end of every exit that
    /// wrote console output ([`Vm::set_console_hook`](ftvm_vmm_core::vm::Vm::set_console_hook)), so
    /// the bytes are tagged with exactly the position of the exit that produced them and are
    /// released by the acknowledgement that covers it. From then on the releaser thread drains
    /// the buffers only as a safety net (every 50 ms), instead of waking every millisecond.
    pub fn source_drainer(&self) -> impl Fn() + Send + Sync + 'static {
        self.inner.sources_pushed.store(true, Ordering::Release);
        let inner = Arc::clone(&self.inner);
        move || inner.drain_sources()
    }

    /// Submits one output with its tag.
    pub fn submit(&self, sink: usize, tag: u64, data: Vec<u8>) {
        self.inner.submit(sink, tag, data);
    }

    /// A [`TxGate`] for a net device: frames are tagged with the current log position and
    /// released to `sink` in order under the rule.
    pub fn tx_gate(&self, sink: Sink) -> Arc<dyn TxGate> {
        let sink = self.add_sink(sink);
        Arc::new(GatedTx {
            inner: Arc::clone(&self.inner),
            sink,
        })
    }

    /// Gates the TX of `net`: its frames wait here and are written to its (current) TAP once
    /// acknowledged.
    pub fn gate_net(&self, net: &NetHandle) {
        let gate = self.tx_gate(net.frame_writer());
        net.set_tx(ftvm_vmm_core::devices::virtio::net::TxMode::Gated(gate));
    }

    /// Fences the releaser: from now on outputs are released only while `fence`'s current
    /// generation is `generation` (the one this side acts in; see [`OutputGate::release_all`]).
    pub fn set_fence(&self, fence: Fence, generation: u64) {
        *self.inner.fence.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((fence, Arc::new(AtomicU64::new(generation))));
    }

    /// This side runs alone in `generation` (it won it on the arbiter): outputs no longer wait
    /// for acknowledgements; those held are released at once, still only while the fence's
    /// current generation is `generation`.
    pub fn release_all(&self, generation: u64) {
        if let Some((_, g)) = &*self.inner.fence.lock().unwrap_or_else(|e| e.into_inner()) {
            g.store(generation, Ordering::Release);
        }
        self.inner.alone.store(true, Ordering::Release);
        if let Some(t) = self.inner.releaser.get() {
            t.unpark();
        }
    }

    /// A new backup joined this lone primary ([`super::join`]): from now on outputs wait for
    /// acknowledgements again (the tag of every output produced after the join's cut is beyond
    /// anything the new backup was asked to acknowledge before it held the state).
    pub fn gate_again(&self) {
        self.inner.alone.store(false, Ordering::Release);
    }

    /// Hooks the gate into the channel's sender poller
    /// ([`ftvm_channel::SenderHandle::set_ack_hook`]): newly arrived acknowledgements
    /// release what they allow on the poller's thread, and the releaser thread no longer polls
    /// for them. Returns `false` (the gate keeps polling) if the sender has a hook already.
    pub fn hook_into(&self, sender: &ftvm_channel::SenderHandle) -> bool {
        let inner = Arc::clone(&self.inner);
        let ok = sender.set_ack_hook(move || {
            if !inner.stop.load(Ordering::Acquire) {
                inner.on_ack();
            }
        });
        if ok {
            self.inner.hooked.store(true, Ordering::Release);
        }
        ok
    }

    /// Outputs waiting now.
    pub fn pending(&self) -> usize {
        self.inner.drain_sources();
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    fn released_all(&self) -> bool {
        let s = self.inner.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.released >= s.produced
    }

    /// A copy of the counters.
    pub fn stats(&self) -> OutputStats {
        self.inner
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits up to `timeout` until every output produced so far is released; returns whether
    /// they all were.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            // Empty queue and every output handed to its sink (the releaser pops a batch, then
            // calls the sinks).
            if self.pending() == 0 && self.released_all() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// The [`TxGate`] of [`OutputGate::tx_gate`].
struct GatedTx {
    inner: Arc<Inner>,
    sink: usize,
}

impl TxGate for GatedTx {
    fn tag(&self) -> u64 {
        self.inner.position.load(Ordering::Acquire)
    }

    fn submit(&self, tag: u64, frame: Vec<u8>) {
        self.inner.submit(self.sink, tag, frame);
    }
}

impl Drop for OutputGate {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Bytes = Arc<Mutex<Vec<u8>>>;

    /// A console-like buffer source of `gate`: (the buffer the VM writes, what was released).
    fn console_source(gate: &OutputGate) -> (Bytes, Bytes) {
        let console = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        gate.add_buffer_source(
            console.clone(),
            Box::new(move |d| s2.lock().unwrap().extend_from_slice(d)),
        );
        (console, seen)
    }

    #[test]
    fn outputs_wait_for_their_position() {
        let acked = Arc::new(AtomicU64::new(0));
        let position = Arc::new(AtomicU64::new(5));
        let gate = OutputGate::start(acked.clone(), position.clone()).unwrap();
        let out = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let o = out.clone();
        let sink = gate.add_sink(Box::new(move |d| o.lock().unwrap().push(d.to_vec())));
        let (console, seen) = console_source(&gate);
        gate.submit(sink, 3, b"a".to_vec());
        gate.submit(sink, 7, b"b".to_vec());
        std::thread::sleep(Duration::from_millis(50));
        assert!(out.lock().unwrap().is_empty(), "released before any ack");
        acked.store(5, Ordering::Release);
        assert!(
            !gate.flush(Duration::from_millis(50)),
            "tag 7 is not acknowledged"
        );
        assert_eq!(*out.lock().unwrap(), vec![b"a".to_vec()]);
        acked.store(7, Ordering::Release);
        assert!(gate.flush(Duration::from_secs(5)));
        assert_eq!(*out.lock().unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
        // Console bytes produced at position 9 wait for 9.
        position.store(9, Ordering::Release);
        console.lock().unwrap().extend_from_slice(b"hello");
        assert!(!gate.flush(Duration::from_millis(50)));
        assert!(seen.lock().unwrap().is_empty());
        acked.store(9, Ordering::Release);
        assert!(gate.flush(Duration::from_secs(5)));
        assert_eq!(*seen.lock().unwrap(), b"hello");
        let s = gate.stats();
        assert_eq!((s.produced, s.released, s.early), (3, 3, 0));
        assert!(s.releases.iter().all(|(tag, acked)| acked >= tag));
        assert!(s.delay_us.max() >= 40_000, "waited {} µs", s.delay_us.max());
    }

    /// Console bytes handed over by the VM at the exit that wrote them are tagged with the
    /// position of that exit (not a later one), wait for it, and the releaser thread leaves
    /// the buffer alone meanwhile.
    #[test]
    fn drained_sources_are_tagged_at_the_exit_that_wrote_them() {
        let acked = Arc::new(AtomicU64::new(0));
        let position = Arc::new(AtomicU64::new(5));
        let gate = OutputGate::start(acked.clone(), position.clone()).unwrap();
        // As a primary hooked into its sender: the releaser only wakes now and then.
        gate.inner.hooked.store(true, Ordering::Release);
        let (console, seen) = console_source(&gate);
        let drain = gate.source_drainer();
        console.lock().unwrap().extend_from_slice(b"at 5");
        drain();
        assert!(console.lock().unwrap().is_empty(), "not handed over");
        // The log moves on before anything is acknowledged.
        position.store(9, Ordering::Release);
        std::thread::sleep(Duration::from_millis(20));
        assert!(seen.lock().unwrap().is_empty(), "released before its ack");
        acked.store(5, Ordering::Release);
        // No ack hook here: release what position 5 allows as the poller's hook would.
        gate.inner.on_ack();
        assert_eq!(*seen.lock().unwrap(), b"at 5");
        let s = gate.stats();
        assert_eq!(s.releases, vec![(5, 5)]);
        assert_eq!(s.early, 0);
    }

    /// Hooked into a real sender (TCP on loopback, a receiver acknowledging), outputs are
    /// released by the acknowledgements on the sender's poller thread, in order, never early.
    #[test]
    fn acknowledgements_release_outputs_on_the_poller_thread() {
        const N: u8 = 50;
        let (mut sender, mut rx) = ftvm_testkit::link::TcpLink::new()
            .ring(1 << 16)
            .mode(ftvm_channel::tcp::TcpMode::Blocking)
            .start(Default::default());
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let backup = std::thread::spawn(move || {
            let mut got = 0;
            while !d.load(Ordering::Acquire) {
                got += rx.poll_records(|_| {}).unwrap_or(0);
                rx.wait_for_records(Duration::from_millis(1));
            }
            // A record is acknowledged once it is in the backup's buffer, maybe not yet
            // consumed by the loop above.
            got + rx.poll_records(|_| {}).unwrap_or(0)
        });
        let position = Arc::new(AtomicU64::new(0));
        let gate = OutputGate::start(sender.shared().clone(), position.clone()).unwrap();
        assert!(gate.hook_into(sender.handle()));
        assert!(!gate.hook_into(sender.handle()), "a second hook is refused");
        let out = Arc::new(Mutex::new(Vec::<(u8, String)>::new()));
        let o = out.clone();
        let sink = gate.add_sink(Box::new(move |d| {
            let name = std::thread::current().name().unwrap_or("").to_string();
            o.lock().unwrap().push((d[0], name));
        }));
        // Each output is queued before its record exists, so no acknowledgement can precede
        // it (an output acknowledged before it was queued is the releaser thread's to release:
        // a descheduled test thread once made that the fate of all 50).
        for i in 0..N {
            let tag = sender.producer().next_seq();
            gate.submit(sink, tag, vec![i]);
            let seq = sender.producer().push(1, &[i; 32]).unwrap();
            assert_eq!(seq, tag);
            position.store(seq, Ordering::Release);
            std::thread::sleep(Duration::from_micros(200));
        }
        assert!(gate.flush(Duration::from_secs(10)), "outputs not released");
        let s = gate.stats();
        assert_eq!((s.released, s.early), (u64::from(N), 0));
        assert!(s.releases.iter().all(|(tag, acked)| acked >= tag));
        let out = out.lock().unwrap().clone();
        let order: Vec<u8> = out.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, (0..N).collect::<Vec<_>>(), "released out of order");
        let on_poller = out.iter().filter(|(_, n)| n == "ftvm-log-send").count();
        assert!(
            on_poller > 0,
            "no output released by the acknowledgements: {out:?}"
        );
        done.store(true, Ordering::Release);
        assert_eq!(backup.join().unwrap(), usize::from(N));
    }
}
