//! Poller threads and the API the VMM uses: [`LogSender`] on the primary, [`LogReceiver`] on
//! the backup.
//!
//! Each side runs one poller thread, pinned to a configurable core, that drives a
//! [`Sender`]/[`Receiver`] in a loop and idles with one of the log buffer's idle strategies.
//! When the link breaks the poller stops and keeps the error; [`SenderHandle::reconnect`] /
//! [`LogReceiver::reconnect`] hand it a new transport and it resumes where it was.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ftvm_ringbuf::{Consumer, Doorbell, IdleKind, Producer, Record};

use crate::error::TransportError;
use crate::frame::{Goodbye, GoodbyeReason};
use crate::reliable::{
    Config, Incoming, ListenReport, Receiver, ReceiverShared, Sender, SenderShared,
};
use crate::stats::StatsSnapshot;
use crate::transport::Transport;

/// Where and how a poller thread runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct PollerConfig {
    /// Core to pin the thread to (`None`: leave it to the scheduler).
    pub core: Option<usize>,
    /// What the thread does when idle.
    pub idle: IdleKind,
}

#[derive(Debug, Default)]
struct Control {
    stop: AtomicBool,
    running: AtomicBool,
    error: Mutex<Option<TransportError>>,
    /// Called on the poller thread after every step that received frames (see
    /// [`SenderHandle::set_ack_hook`]).
    hook: OnceLock<Hook>,
    /// A GOODBYE to send: the poller sends it and stops ([`Control::goodbye`]).
    goodbye_due: AtomicBool,
    goodbye: Mutex<Option<(GoodbyeReason, String)>>,
    /// The peer's GOODBYE, once one arrived (the poller stopped with
    /// [`TransportError::PeerLeft`]).
    peer_left: OnceLock<Goodbye>,
}

/// Sends a GOODBYE on a poller's state machine ([`Sender::goodbye`], [`Receiver::goodbye`]).
type SayGoodbye<S> = fn(&mut S, GoodbyeReason, &str) -> Result<(), TransportError>;

/// A poller's two operations on its state machine: one step ([`Sender::poll`],
/// [`Receiver::poll`]) and saying goodbye.
type Steps<S> = (fn(&mut S) -> Result<usize, TransportError>, SayGoodbye<S>);

/// How long [`SenderHandle::goodbye`] / [`LogReceiver::goodbye`] wait for the poller.
const GOODBYE_WAIT: Duration = Duration::from_secs(2);

/// Lets the sender's poller sleep while it has nothing to do: every record the producer
/// committed is acknowledged. [`SenderHandle::notify`] (after a commit) wakes it. Enabled with
/// [`IdleKind::Park`] once the producer called `notify` at least once (a producer that never
/// notifies would otherwise find its records sent up to a sleep period late).
#[derive(Debug, Default)]
struct SenderWake {
    notified: AtomicBool,
    committed: AtomicU64,
    bell: Doorbell,
    /// Times the poller went to sleep.
    sleeps: AtomicU64,
}

/// Empty polls in a row before a quiet sender poller sleeps (a poll is ~0.1–0.2 µs: tens of
/// microseconds of spinning, about one acknowledgement round trip).
const QUIET_POLLS: u32 = 256;

/// Longest sleep of a quiet sender poller (its timers stay this accurate).
const QUIET_SLEEP: Duration = Duration::from_millis(1);

impl SenderWake {
    /// Whether the poller may sleep now: nothing committed is unacknowledged.
    fn quiet(&self, acked: u64) -> bool {
        self.notified.load(Ordering::Acquire) && acked >= self.committed.load(Ordering::Acquire)
    }

    /// On the poller thread: sleeps while quiet, at most [`QUIET_SLEEP`]; [`SenderHandle::notify`]
    /// rings the bell.
    fn sleep(&self, acked: u64) {
        if self.bell.sleep(QUIET_SLEEP, || !self.quiet(acked)) {
            self.sleeps.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A callback run on the poller thread.
struct Hook(Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

impl Control {
    fn set_error(&self, e: TransportError) {
        if let Ok(mut g) = self.error.lock() {
            g.get_or_insert(e);
        }
    }
    fn take_error(&self) -> TransportError {
        self.error
            .lock()
            .ok()
            .and_then(|mut g| g.take())
            .unwrap_or(TransportError::Closed { mid_frame: false })
    }

    /// Asks the running poller to send a GOODBYE and stop (`wake`: wakes it if it sleeps);
    /// waits until it stopped, at most [`GOODBYE_WAIT`].
    fn goodbye(
        &self,
        reason: GoodbyeReason,
        text: &str,
        wake: impl Fn(),
    ) -> Result<(), TransportError> {
        if !self.running.load(Ordering::Acquire) {
            return Err(self.take_error());
        }
        if let Ok(mut g) = self.goodbye.lock() {
            *g = Some((reason, text.to_owned()));
        }
        self.goodbye_due.store(true, Ordering::Release);
        wake();
        let deadline = Instant::now() + GOODBYE_WAIT;
        while self.running.load(Ordering::Acquire) {
            if Instant::now() > deadline {
                return Err(TransportError::Io {
                    op: "goodbye",
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        match self.error.lock().ok().and_then(|mut g| g.take()) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// The poller's step for a due GOODBYE: sends it on `state`; true when the loop must stop.
    fn say_goodbye<S>(&self, state: &mut S, bye: SayGoodbye<S>) -> bool {
        if !self.goodbye_due.load(Ordering::Acquire) {
            return false;
        }
        if let Some((reason, text)) = self.goodbye.lock().ok().and_then(|mut g| g.take()) {
            if let Err(e) = bye(state, reason, &text) {
                tracing::warn!(error = %e, "could not say goodbye to the peer");
                self.set_error(e);
            }
        }
        true
    }
}

fn pin(core: Option<usize>) {
    if let Some(id) = core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
            tracing::warn!(core = id, "could not pin poller thread");
        }
    }
}

/// Runs `step` until it fails, `stop` is set or a GOODBYE was sent (with `bye`); returns the
/// state machine.
fn spawn_loop<S: Send + 'static>(
    name: &str,
    mut state: S,
    ctl: Arc<Control>,
    pc: PollerConfig,
    (step, bye): Steps<S>,
    quiet: Option<Quiet<S>>,
) -> Result<JoinHandle<S>, TransportError> {
    ctl.stop.store(false, Ordering::Release);
    ctl.goodbye_due.store(false, Ordering::Release);
    ctl.running.store(true, Ordering::Release);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            pin(pc.core);
            let mut idle = pc.idle.build();
            // Quiet sleeping: the sender, with `IdleKind::Park`.
            let quiet = quiet.filter(|_| pc.idle == IdleKind::Park);
            let mut empty = 0u32;
            while !ctl.stop.load(Ordering::Acquire) {
                if ctl.say_goodbye(&mut state, bye) {
                    break;
                }
                match step(&mut state) {
                    Ok(work) => {
                        if work > 0 {
                            empty = 0;
                            if let Some(Hook(h)) = ctl.hook.get() {
                                h();
                            }
                        } else {
                            empty = empty.saturating_add(1);
                        }
                        if let Some((wake, acked)) = &quiet {
                            if empty >= QUIET_POLLS && wake.quiet(acked(&state)) {
                                wake.sleep(acked(&state));
                                empty = 0;
                                continue;
                            }
                        }
                        idle.idle(work);
                    }
                    Err(TransportError::PeerLeft(g)) => {
                        tracing::warn!(goodbye = %g, "the peer left the pair; poller stopped");
                        let _ = ctl.peer_left.set(g.clone());
                        ctl.set_error(TransportError::PeerLeft(g));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "poller stopped");
                        ctl.set_error(e);
                        break;
                    }
                }
            }
            ctl.running.store(false, Ordering::Release);
            state
        })
        .map_err(|source| TransportError::Io {
            op: "spawn poller thread",
            source,
        })
}

/// What a quiet poller sleeps on, and how it reads the acknowledged position from its state.
type Quiet<S> = (Arc<SenderWake>, fn(&S) -> u64);

fn sender_acked(s: &Sender) -> u64 {
    s.shared().acked_seq()
}

/// Stops the loop in `slot` and returns its state machine.
fn stop_loop<S>(
    slot: &mut Option<JoinHandle<S>>,
    ctl: &Control,
    role: &str,
) -> Result<S, TransportError> {
    ctl.stop.store(true, Ordering::Release);
    let t = slot.take().ok_or_else(|| TransportError::Setup {
        what: format!("{role} poller lost after an earlier failed reconnect"),
    })?;
    t.join().map_err(|_| TransportError::Setup {
        what: format!("{role} poller panicked"),
    })
}

/// Stops the loop in `slot`, clears its last error, runs `handshake` on the state machine and
/// starts the loop again — also when the handshake failed (then stopped at once), so that the
/// state is kept for a later attempt. Returns the handshake's result.
fn restart_loop<S: Send + 'static>(
    slot: &mut Option<JoinHandle<S>>,
    ctl: &Arc<Control>,
    pc: PollerConfig,
    (role, name): (&str, &str),
    step: Steps<S>,
    quiet: Option<Quiet<S>>,
    handshake: impl FnOnce(&mut S) -> Result<(), TransportError>,
) -> Result<(), TransportError> {
    let mut state = stop_loop(slot, ctl, role)?;
    if let Ok(mut g) = ctl.error.lock() {
        g.take();
    }
    let res = handshake(&mut state);
    let ctl = Arc::clone(ctl);
    if res.is_err() {
        ctl.stop.store(true, Ordering::Release);
    }
    *slot = Some(spawn_loop(name, state, ctl, pc, step, quiet)?);
    res
}

/// The primary's side: the log buffer's producer for the VMM, and a poller thread shipping the
/// log to the backup.
///
/// One owner: the `LogSender` (with its [`Producer`]) belongs to whoever appends, the vCPU
/// thread's recorder; every other thread (acknowledgement waiters, failure monitors, the
/// output gate, counters) holds a [`SenderHandle`] ([`LogSender::handle`]), which carries the
/// acknowledgements, counters, the poller's state and its error, and can say GOODBYE. The
/// sender dereferences to its handle, so those calls read the same on both.
#[derive(Debug)]
pub struct LogSender {
    peer_settings: Vec<u8>,
    producer: Producer,
    handle: SenderHandle,
}

/// The cloneable side of a [`LogSender`] for threads other than the appender's: positions,
/// counters, the poller's state and error, GOODBYE, and a new link for the poller
/// ([`SenderHandle::reconnect`], [`SenderHandle::reconnect_with`]). Never touches the log
/// buffer's producer.
#[derive(Debug, Clone)]
pub struct SenderHandle {
    wake: Arc<SenderWake>,
    shared: Arc<SenderShared>,
    ctl: Arc<Control>,
    poller: Arc<SenderPoller>,
}

/// The sender's poller thread, reachable from every [`SenderHandle`]: a backup that joins a
/// running primary is paired from the join's thread while the vCPU thread appends
/// (`reconnect_with`), so the thread that restarts the poller is not the appender's. Locked only
/// to stop or restart the poller (and for as long as a restart's handshake takes), never per
/// entry.
#[derive(Debug)]
struct SenderPoller {
    thread: Mutex<PollerThread>,
    pc: PollerConfig,
}

#[derive(Debug)]
struct PollerThread {
    /// The running (or stopped, state kept) poller; `None` after a failed spawn.
    thread: Option<JoinHandle<Sender>>,
    /// The [`LogSender`] was dropped or shut down: no handle may start its poller again.
    ended: bool,
}

impl SenderPoller {
    fn lock(&self) -> std::sync::MutexGuard<'_, PollerThread> {
        self.thread.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::ops::Deref for LogSender {
    type Target = SenderHandle;

    fn deref(&self) -> &SenderHandle {
        &self.handle
    }
}

impl LogSender {
    /// Handshakes with the backup over `transport` (in the calling thread, so refusals surface
    /// here) and starts the poller.
    ///
    /// # Errors
    /// As [`Sender::connect`]; [`TransportError::Io`] if the thread cannot be spawned.
    pub fn start(
        producer: Producer,
        consumer: Consumer,
        transport: Box<dyn Transport>,
        cfg: Config,
        pc: PollerConfig,
    ) -> Result<Self, TransportError> {
        let base = producer.next_seq();
        let sender = Sender::connect(transport, consumer, base, cfg)?;
        Self::spawn(producer, sender, pc)
    }

    /// Starts the poller on `sender`.
    fn spawn(producer: Producer, sender: Sender, pc: PollerConfig) -> Result<Self, TransportError> {
        let peer_settings = sender.peer_settings().to_vec();
        let shared = Arc::clone(sender.shared());
        let ctl = Arc::new(Control::default());
        let wake = Arc::new(SenderWake::default());
        let thread = spawn_loop(
            "ftvm-log-send",
            sender,
            Arc::clone(&ctl),
            pc,
            (Sender::poll, Sender::goodbye),
            Some((Arc::clone(&wake), sender_acked)),
        )?;
        let poller = Arc::new(SenderPoller {
            thread: Mutex::new(PollerThread {
                thread: Some(thread),
                ended: false,
            }),
            pc,
        });
        Ok(Self {
            peer_settings,
            producer,
            handle: SenderHandle {
                wake,
                shared,
                ctl,
                poller,
            },
        })
    }

    /// A sender with no backup yet ([`Sender::detached`]): the poller is stopped (not
    /// running, its error `Closed`) until [`SenderHandle::reconnect_with`] pairs it.
    ///
    /// # Errors
    /// As [`Sender::detached`]; [`TransportError::Io`] if the thread cannot be spawned.
    pub fn detached(
        producer: Producer,
        consumer: Consumer,
        cfg: Config,
        pc: PollerConfig,
    ) -> Result<Self, TransportError> {
        let base = producer.next_seq();
        let sender = Sender::detached(consumer, base, cfg)?;
        let s = Self::spawn(producer, sender, pc)?;
        // Its first poll fails on the closed link (the thread ends, keeping the state for a
        // reconnect); wait for that, so that `is_running` is false from the start.
        while s.handle.ctl.running.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        Ok(s)
    }

    /// The backup's settings blob (from its HELLO at the first handshake).
    pub fn peer_settings(&self) -> &[u8] {
        &self.peer_settings
    }

    /// The log buffer's producer: append records in place (`claim` → fill → `commit`).
    pub fn producer(&mut self) -> &mut Producer {
        &mut self.producer
    }

    /// A handle for other threads (acks, counters, errors, GOODBYE).
    pub fn handle(&self) -> &SenderHandle {
        &self.handle
    }

    /// Stops the poller and returns the producer and the log buffer's consumer (no handle can
    /// start the poller again).
    ///
    /// # Errors
    /// When the poller thread cannot be joined.
    pub fn shutdown(mut self) -> Result<(Producer, Consumer), TransportError> {
        let s = {
            let mut p = self.handle.poller.lock();
            p.ended = true;
            stop_loop(&mut p.thread, &self.handle.ctl, "sender")?
        };
        let producer = std::mem::replace(&mut self.producer, placeholder_producer()?);
        Ok((producer, s.into_consumer()))
    }
}

impl SenderHandle {
    /// Tells the poller that records up to `seq` are committed (call after a commit): with
    /// [`IdleKind::Park`] the poller sleeps while every committed record is acknowledged, and
    /// this wakes it (a `SeqCst` fence and a load when it is awake; an unpark when asleep).
    pub fn notify(&self, seq: u64) {
        self.wake.committed.fetch_max(seq, Ordering::Release);
        self.wake.notified.store(true, Ordering::Release);
        self.wake.bell.ring();
    }

    /// Times the poller slept because it had nothing to do ([`SenderHandle::notify`]).
    pub fn quiet_sleeps(&self) -> u64 {
        self.wake.sleeps.load(Ordering::Relaxed)
    }

    /// Highest sequence number the backup holds.
    pub fn acked_seq(&self) -> u64 {
        self.shared.acked_seq()
    }

    /// Highest sequence number the backup reported executed (the lag is
    /// `LogSender::producer().next_seq() - 1 - backup_executed_seq()`).
    pub fn backup_executed_seq(&self) -> u64 {
        self.shared.executed_seq()
    }

    /// The shared positions (for an output releaser on another thread).
    pub fn shared(&self) -> &Arc<SenderShared> {
        &self.shared
    }

    /// Runs `hook` on the poller thread after every poll step that received frames (an
    /// acknowledgement among them), also after a reconnect: the primary's output gate releases
    /// what the new acknowledged position allows right there, instead of a thread of its own
    /// polling [`SenderHandle::acked_seq`] (which on a host with fewer cores than busy threads
    /// takes CPU time from the vCPU). The hook must be short and must not block. Returns
    /// `false` (and drops `hook`) if one was set before.
    pub fn set_ack_hook(&self, hook: impl Fn() + Send + Sync + 'static) -> bool {
        self.ctl.hook.set(Hook(Box::new(hook))).is_ok()
    }

    /// Counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// True while the poller runs (false once the link broke).
    pub fn is_running(&self) -> bool {
        self.ctl.running.load(Ordering::Acquire)
    }

    /// Waits until the backup holds every record ≤ `seq`. Returns `Ok(false)` on timeout.
    ///
    /// # Errors
    /// The poller's error when the link broke before that.
    pub fn wait_acked(&self, seq: u64, timeout: Duration) -> Result<bool, TransportError> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            if self.shared.acked_seq() >= seq {
                return Ok(true);
            }
            if !self.is_running() {
                return Err(self.ctl.take_error());
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            spins += 1;
            if spins < 1000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Takes the error that stopped the poller, if it stopped.
    pub fn error(&self) -> Option<TransportError> {
        if self.is_running() {
            None
        } else {
            Some(self.ctl.take_error())
        }
    }

    /// Tells the backup that this primary leaves the pair (a GOODBYE frame with `reason` and
    /// `text`, PROTOCOL.md) and stops the poller; waits for it at most 2 s.
    ///
    /// # Errors
    /// The link's error if it had already stopped; the transport's if the frame could not be
    /// sent; a timeout.
    pub fn goodbye(&self, reason: GoodbyeReason, text: &str) -> Result<(), TransportError> {
        self.ctl.goodbye(reason, text, || self.wake.bell.ring())
    }

    /// The backup's GOODBYE, if it left the pair on purpose (the poller then stopped with
    /// [`TransportError::PeerLeft`]); unlike [`SenderHandle::error`] it can be read any number of
    /// times.
    pub fn peer_goodbye(&self) -> Option<Goodbye> {
        self.ctl.peer_left.get().cloned()
    }

    /// Stops the poller (if still running), handshakes over a new transport, and resumes from
    /// the first record the backup does not hold.
    ///
    /// # Errors
    /// As [`Sender::reconnect`]; [`TransportError::Closed`] once the [`LogSender`] is gone.
    /// After an error the sender can be given another transport.
    pub fn reconnect(&self, transport: Box<dyn Transport>) -> Result<(), TransportError> {
        self.restart(|sender| sender.reconnect(transport))
    }

    /// Like [`SenderHandle::reconnect`], to a new backup under new parameters (its generation
    /// and settings, `cfg`): a backup that joined a running primary by state transfer
    /// ([`Sender::reconnect_with`]).
    ///
    /// # Errors
    /// As [`Sender::reconnect_with`]; [`TransportError::Closed`] once the [`LogSender`] is
    /// gone.
    pub fn reconnect_with(
        &self,
        transport: Box<dyn Transport>,
        cfg: Config,
    ) -> Result<(), TransportError> {
        self.restart(|sender| sender.reconnect_with(transport, cfg))
    }

    /// Stops the poller, runs `handshake` on the sender, starts the poller again.
    fn restart(
        &self,
        handshake: impl FnOnce(&mut Sender) -> Result<(), TransportError>,
    ) -> Result<(), TransportError> {
        let mut p = self.poller.lock();
        if p.ended {
            return Err(TransportError::Closed { mid_frame: false });
        }
        restart_loop(
            &mut p.thread,
            &self.ctl,
            self.poller.pc,
            ("sender", "ftvm-log-send"),
            (Sender::poll, Sender::goodbye),
            Some((Arc::clone(&self.wake), sender_acked)),
            handshake,
        )
    }
}

fn placeholder_producer() -> Result<Producer, TransportError> {
    let (p, _c) = ftvm_ringbuf::with_capacity(ftvm_ringbuf::layout::MIN_CAPACITY).map_err(|e| {
        TransportError::Setup {
            what: e.to_string(),
        }
    })?;
    Ok(p)
}

impl Drop for LogSender {
    fn drop(&mut self) {
        let mut p = self.handle.poller.lock();
        p.ended = true;
        self.handle.ctl.stop.store(true, Ordering::Release);
        if let Some(t) = p.thread.take() {
            let _ = t.join();
        }
    }
}

/// The backup's side: a poller thread moving frames into the backup's log buffer, and the
/// buffer's consumer for the replaying vCPU.
#[derive(Debug)]
pub struct LogReceiver {
    peer_settings: Vec<u8>,
    doorbell: Arc<Doorbell>,
    consumer: Consumer,
    shared: Arc<ReceiverShared>,
    ctl: Arc<Control>,
    thread: Option<JoinHandle<Receiver>>,
    pc: PollerConfig,
}

impl LogReceiver {
    /// Waits for the primary's handshake on `transport` (in the calling thread, so refusals
    /// surface here) and starts the poller.
    ///
    /// # Errors
    /// As [`Receiver::accept`].
    pub fn start(
        producer: Producer,
        consumer: Consumer,
        transport: Box<dyn Transport>,
        cfg: Config,
        pc: PollerConfig,
    ) -> Result<Self, TransportError> {
        let receiver = Receiver::accept(transport, producer, cfg)?;
        Self::run(receiver, consumer, pc)
    }

    /// Like [`LogReceiver::start`], over the connections `incoming` brings until one is the
    /// primary (see [`Receiver::listen`]: strays are dropped and counted, the backup keeps
    /// listening).
    ///
    /// # Errors
    /// As [`Receiver::listen`]; [`TransportError::Io`] if the thread cannot be spawned.
    pub fn listen(
        producer: Producer,
        consumer: Consumer,
        incoming: &mut dyn Incoming,
        cfg: Config,
        pc: PollerConfig,
    ) -> Result<(Self, ListenReport), TransportError> {
        let (receiver, report) = Receiver::listen(incoming, producer, cfg)?;
        Ok((Self::run(receiver, consumer, pc)?, report))
    }

    fn run(
        receiver: Receiver,
        consumer: Consumer,
        pc: PollerConfig,
    ) -> Result<Self, TransportError> {
        let peer_settings = receiver.peer_settings().to_vec();
        let shared = Arc::clone(receiver.shared());
        let ctl = Arc::new(Control::default());
        let doorbell = Arc::new(Doorbell::default());
        let d = Arc::clone(&doorbell);
        let _ = ctl.hook.set(Hook(Box::new(move || d.ring())));
        let thread = spawn_loop(
            "ftvm-log-recv",
            receiver,
            Arc::clone(&ctl),
            pc,
            (Receiver::poll, Receiver::goodbye),
            None,
        )?;
        Ok(Self {
            peer_settings,
            doorbell,
            consumer,
            shared,
            ctl,
            thread: Some(thread),
            pc,
        })
    }

    /// The primary's settings blob (from its HELLO at the first handshake).
    pub fn peer_settings(&self) -> &[u8] {
        &self.peer_settings
    }

    /// The log buffer's consumer (read batches zero-copy, then release them).
    pub fn consumer(&mut self) -> &mut Consumer {
        &mut self.consumer
    }

    /// Hands every record available now to `f`, in order, then releases them. Returns how
    /// many; `Ok(0)` when there is nothing yet.
    ///
    /// # Errors
    /// The poller's error once the link broke **and** every record received before is
    /// consumed (the backup replays everything it got before going live).
    pub fn poll_records(&mut self, mut f: impl FnMut(Record<'_>)) -> Result<usize, TransportError> {
        let running = self.is_running();
        let mut n = 0;
        loop {
            let batch = self.consumer.read();
            if batch.is_empty() {
                break;
            }
            for r in batch.records() {
                match r {
                    Ok(r) => {
                        f(r);
                        n += 1;
                    }
                    Err(e) => {
                        return Err(TransportError::Log {
                            what: e.to_string(),
                        })
                    }
                }
            }
            batch.release();
        }
        if n == 0 && !running {
            return Err(self.ctl.take_error());
        }
        Ok(n)
    }

    /// Sleeps until the poller delivers records, at most `timeout`; returns at once when
    /// records are available or the poller stopped. For a consumer that would otherwise poll
    /// [`LogReceiver::poll_records`] in a loop: on a host with fewer cores than busy threads a
    /// sleeping consumer leaves the CPU to others (waking takes ~60 µs here, so spin a little
    /// first when entries are expected soon).
    pub fn wait_for_records(&mut self, timeout: Duration) {
        let head = self.consumer.position();
        self.wait_beyond(head, timeout);
    }

    /// Like [`LogReceiver::wait_for_records`], for a consumer that reads ahead of its head
    /// without releasing: returns once records end beyond `position`.
    pub fn wait_beyond(&mut self, position: u64, timeout: Duration) {
        let consumer = &mut self.consumer;
        let ctl = &self.ctl;
        self.doorbell.sleep(timeout, || {
            consumer.committed_position() > position || !ctl.running.load(Ordering::Acquire)
        });
    }

    /// Takes the error that stopped the poller, if it stopped (for a consumer that reads the
    /// log buffer itself instead of through [`LogReceiver::poll_records`]).
    pub fn error(&self) -> Option<TransportError> {
        if self.is_running() {
            None
        } else {
            Some(self.ctl.take_error())
        }
    }

    /// Reports the last record the backup executed (sent to the primary with the next ack).
    pub fn report_executed(&self, seq: u64) {
        self.shared.report_executed(seq);
    }

    /// Highest sequence number delivered into the log buffer.
    pub fn received_seq(&self) -> u64 {
        self.shared.received_seq()
    }

    /// The positions and counters shared with the poller (for observers on other threads).
    pub fn shared(&self) -> &Arc<ReceiverShared> {
        &self.shared
    }

    /// Counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// True while the poller runs.
    pub fn is_running(&self) -> bool {
        self.ctl.running.load(Ordering::Acquire)
    }

    /// Tells the primary that this backup leaves the pair (a GOODBYE frame with `reason` and
    /// `text`, PROTOCOL.md) and stops the poller; waits for it at most 2 s. The records
    /// received before can still be read.
    ///
    /// # Errors
    /// The link's error if it had already stopped; the transport's if the frame could not be
    /// sent; a timeout.
    pub fn goodbye(&self, reason: GoodbyeReason, text: &str) -> Result<(), TransportError> {
        self.ctl.goodbye(reason, text, || {})
    }

    /// The primary's GOODBYE, if it left the pair on purpose (the poller then stopped with
    /// [`TransportError::PeerLeft`], which [`LogReceiver::poll_records`] returns once every
    /// record received before it was read).
    pub fn peer_goodbye(&self) -> Option<Goodbye> {
        self.ctl.peer_left.get().cloned()
    }

    /// Stops the poller (if still running), handshakes over a new transport and resumes.
    ///
    /// # Errors
    /// As [`Receiver::reaccept`].
    pub fn reconnect(&mut self, transport: Box<dyn Transport>) -> Result<(), TransportError> {
        restart_loop(
            &mut self.thread,
            &self.ctl,
            self.pc,
            ("receiver", "ftvm-log-recv"),
            (Receiver::poll, Receiver::goodbye),
            None,
            |receiver| receiver.reaccept(transport),
        )
    }
}

impl Drop for LogReceiver {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
