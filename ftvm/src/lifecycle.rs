//! The service lifecycle of `ftvm run`, `ftvm primary` and `ftvm backup`: SIGTERM/SIGINT are
//! a planned stop, and where a service manager set `NOTIFY_SOCKET` the process tells it when
//! it is ready, what it is doing, when it stops, and that it is alive (systemd's
//! notification protocol, `sd_notify(3)`).
//!
//! ```text
//!  start ──(signal: exit 207 at once, nothing to tell anyone)──┐
//!    │ paired (run: VM built): Lifecycle::attach ─> READY=1, STATUS=<role, generation>
//!    ▼                                                              │
//!  running ── STATUS=… every second while it changes, WATCHDOG=1 every WATCHDOG_USEC/2
//!    │ SIGTERM/SIGINT ─> STOPPING=1, VmControl::request_stop ─> the run ends as planned
//!    │                   (ftvm_ft::stop: the primary releases what it held, says GOODBYE)
//!    │ a second signal ─> exit 207 at once
//!    ▼
//!  summary, report, exit status 207 (ftvm::exit::STOPPED)
//! ```
//!
//! Signals go to one thread (`signal-hook`: the handler only writes to a pipe, the thread does
//! the work), never to the vCPU thread's KVM_RUN.
//!
//! The notification protocol is hand-written (a datagram per message on a
//! `UnixDatagram`, ~30 lines) rather than taken from the `sd-notify` crate because that crate
//! (0.4) does not reach abstract socket addresses (`NOTIFY_SOCKET=@name`, which service
//! managers in containers use) and enables the watchdog only when `WATCHDOG_PID` is set, while
//! `sd_watchdog_enabled(3)` enables it when `WATCHDOG_PID` is unset too.
//!
//! What the watchdog proves: `WATCHDOG=1` comes from the status thread after it read the side's
//! live counters (the observer, which reads the log positions and the channel's counters), so a
//! process that deadlocked there or stopped scheduling threads is restarted; it does not claim
//! guest progress (an idle guest makes no exits, correctly).

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use ftvm_ft::observe::Observer;
use ftvm_vmm_core::vm::VmControl;

/// The service manager's notification socket (`NOTIFY_SOCKET`), if one was given.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<Arc<(UnixDatagram, SocketAddr)>>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`: an absolute path, or `@name` for an abstract address. Unset, empty
    /// or of another form (e.g. `vsock:`): notifications are not sent.
    pub fn from_env() -> Self {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Self::default();
        };
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str());
        let addr = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(&value),
            Some(b'@') => {
                <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(&bytes[1..])
            }
            _ => {
                tracing::warn!(?value, "NOTIFY_SOCKET of an unknown form: not notifying");
                return Self::default();
            }
        };
        match (addr, UnixDatagram::unbound()) {
            (Ok(a), Ok(s)) => Notifier {
                target: Some(Arc::new((s, a))),
            },
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, ?value, "cannot use NOTIFY_SOCKET");
                Self::default()
            }
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (`KEY=VALUE` lines) as one datagram; failures are logged, never fatal.
    pub fn send(&self, state: &str) {
        if let Some(t) = &self.target {
            if let Err(e) = t.0.send_to_addr(state.as_bytes(), &t.1) {
                tracing::debug!(error = %e, "sd_notify failed");
            }
        }
    }
}

/// The watchdog period asked by the service manager (`WATCHDOG_USEC`), unless `WATCHDOG_PID`
/// names another process (`sd_watchdog_enabled(3)`).
pub fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// SIGTERM/SIGINT handling and the service manager's notifications of one process.
#[derive(Debug)]
pub struct Lifecycle {
    who: &'static str,
    control: Arc<Mutex<Option<VmControl>>>,
    notifier: Notifier,
    status: Option<StatusThread>,
}

impl Lifecycle {
    /// Starts the signal thread; `who` names the process in its messages (`run`, `primary`,
    /// `backup`). Until [`Lifecycle::attach`], a signal ends the process at once with status
    /// [`crate::exit::STOPPED`]; after it, the first signal asks the VM to stop (a planned
    /// stop) and a second one ends the process at once.
    ///
    /// # Errors
    /// The handlers or the thread cannot be installed.
    pub fn install(who: &'static str) -> anyhow::Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
            .context("cannot install the SIGTERM/SIGINT handlers")?;
        let control: Arc<Mutex<Option<VmControl>>> = Arc::default();
        let notifier = Notifier::from_env();
        let (c, n) = (Arc::clone(&control), notifier.clone());
        let count = AtomicU32::new(0);
        std::thread::Builder::new()
            .name("ftvm-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                    let first = count.fetch_add(1, Ordering::Relaxed) == 0;
                    if first {
                        n.send("STOPPING=1\nSTATUS=stopping (planned stop)");
                    }
                    let vm = c.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    match vm {
                        Some(vm) if first => {
                            eprintln!("{who}: {name}: planned stop");
                            vm.request_stop();
                        }
                        Some(_) => {
                            eprintln!("{who}: {name} again: stopping at once");
                            std::process::exit(crate::exit::STOPPED);
                        }
                        None => {
                            eprintln!("{who}: {name} before the VM ran: stopped");
                            std::process::exit(crate::exit::STOPPED);
                        }
                    }
                }
            })
            .context("cannot start the signal thread")?;
        Ok(Lifecycle {
            who,
            control,
            notifier,
            status: None,
        })
    }

    /// The VM runs (paired, for a pair): signals now ask it to stop; the service manager is
    /// told READY with `status`.
    pub fn attach(&self, vm: VmControl, status: &str) {
        *self.control.lock().unwrap_or_else(|e| e.into_inner()) = Some(vm);
        self.notifier.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// Whether a planned stop was asked (the VM's run ended because of a signal).
    pub fn stop_requested(&self) -> bool {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(VmControl::stop_requested)
    }

    /// Keeps the service manager's STATUS current from `observer` (role, generation, exits,
    /// lag) and sends WATCHDOG=1 at half the watchdog period, until this lifecycle is dropped;
    /// nothing without `NOTIFY_SOCKET`.
    pub fn watch(&mut self, observer: &Observer) {
        if !self.notifier.enabled() {
            return;
        }
        let (notifier, observer, who) = (self.notifier.clone(), observer.clone(), self.who);
        self.status = Some(StatusThread::start(
            notifier,
            watchdog_period(),
            move || status_line(who, &observer),
        ));
    }

    /// The notifier (for one-off messages).
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

/// `STATUS=` text of a side: its role and generation, exits, and the lag.
fn status_line(who: &str, observer: &Observer) -> String {
    let s = observer.snapshot();
    let mut line = match s.role.name() {
        role if role == who => format!("{who}, generation {}", s.generation),
        role => format!("{who}, now {role}, generation {}", s.generation),
    };
    if let Some(e) = &s.exits {
        line.push_str(&format!(", {} exits", e.total));
    }
    if let Some(l) = &s.lag {
        line.push_str(&format!(", lag {} entries", l.entries));
    }
    line
}

/// The thread that sends STATUS and WATCHDOG.
#[derive(Debug)]
struct StatusThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StatusThread {
    fn start(
        notifier: Notifier,
        watchdog: Option<Duration>,
        status: impl Fn() -> String + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let tick = watchdog.map_or(Duration::from_secs(1), |w| {
            (w / 2).min(Duration::from_secs(1))
        });
        let thread = std::thread::Builder::new()
            .name("ftvm-sd-notify".into())
            .spawn(move || {
                let mut last = String::new();
                let mut next_watchdog = Instant::now();
                while !s.load(Ordering::Acquire) {
                    let line = status();
                    let mut msg = String::new();
                    if line != last {
                        msg.push_str(&format!("STATUS={line}\n"));
                        last = line;
                    }
                    if let Some(w) = watchdog {
                        if Instant::now() >= next_watchdog {
                            msg.push_str("WATCHDOG=1\n");
                            next_watchdog = Instant::now() + w / 2;
                        }
                    }
                    if !msg.is_empty() {
                        notifier.send(&msg);
                    }
                    std::thread::sleep(tick);
                }
            })
            .map_err(|e| tracing::warn!(error = %e, "cannot start the sd_notify thread"))
            .ok();
        StatusThread { stop, thread }
    }
}

impl Drop for StatusThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifier_reaches_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier {
            target: Some(Arc::new((
                UnixDatagram::unbound().expect("socket"),
                SocketAddr::from_pathname(&path).expect("addr"),
            ))),
        };
        n.send("READY=1");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"READY=1");
        let name = format!("ftvm-test-{}", std::process::id());
        let abs =
            <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name.as_bytes())
                .expect("abstract");
        let server = UnixDatagram::bind_addr(&abs).expect("bind abstract");
        let n = Notifier {
            target: Some(Arc::new((UnixDatagram::unbound().expect("socket"), abs))),
        };
        n.send("STOPPING=1");
        let len = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"STOPPING=1");
        assert!(!Notifier::default().enabled());
    }
}
