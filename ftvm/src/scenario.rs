//! A fault-tolerant `kv` pair on this machine, for `ftvm demo` and the fault tests: a temporary
//! network namespace with a persistent TAP at 10.0.2.1/24, a temporary directory with the two
//! disk images and a file arbiter, and `ftvm backup` / `ftvm primary` as child processes inside
//! the namespace (heartbeats and the tcp transports on the namespace's loopback).
//!
//! ```text
//!  namespace ftvm-<tag>-<pid>-<n>
//!  ┌───────────────────────────────────────────────────────────────────────────────┐
//!  │ client threads ──TCP──> 10.0.2.1 ─ TAP ftvmtap0 ─> guest 10.0.2.15:6379     │
//!  │                                         │ (the live side holds the TAP)      │
//!  │  ftvm primary  ──log (shm | 127.0.0.1:7000)──>  ftvm backup                  │
//!  │   heartbeats 127.0.0.1:7102 <──UDP──> 127.0.0.1:7101                         │
//!  └───────────────────────────────────────────────────────────────────────────────┘
//!  temp dir: a.img b.img arbiter/ (gen-N files) p.json b.json p.console b.console
//! ```
//! With `shared_disk` both sides name one image, `shared.img`, with `--shared-disk` (instead of
//! each its own copy, `a.img` and `b.img`); [`Scenario::spawn_alone`] boots `kv` alone on it
//! afterwards (`ftvm run`), to read back what reached the disk.
//! With `arbiter: Some("etcd")` a single etcd member, with `Some("etcd3")` a three-member etcd
//! cluster, runs on the namespace's loopback instead of the file arbiter (data and logs in the
//! temporary directory, `etcd-m<i>/` and `etcd-m<i>.log`); [`Scenario::kill_etcd_member`]
//! crashes one member, [`Scenario::restart_etcd_member`] starts it again on its data.
//! Everything is torn down on drop, in order: children (SIGKILL, reaped), namespace (with its
//! TAP), shared-memory rings, temporary directory.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ftvm_channel::netns::{Netns, NetnsError};

use crate::client::{ClientError, Reply, RespConn};

/// The guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The guest's port.
pub const GUEST_PORT: u16 = 6379;
/// The service TAP inside the namespace.
pub const TAP: &str = "ftvmtap0";
/// The tcp transports' port on the namespace's loopback.
pub const LOG_PORT: u16 = 7000;
/// The backup's heartbeat port.
pub const BACKUP_HEARTBEAT_PORT: u16 = 7101;
/// The primary's heartbeat port.
pub const PRIMARY_HEARTBEAT_PORT: u16 = 7102;
/// The primary's veth end with `--transport xdp`.
pub const XDP_PRIMARY_IF: &str = "ftvmxp";
/// The backup's veth end with `--transport xdp`.
pub const XDP_BACKUP_IF: &str = "ftvmxb";
/// Size of each disk image by default ([`ScenarioConfig::disk_size`]).
pub const DISK_SIZE: u64 = 32 << 20;
/// Where a primary started with [`Scenario::accept_join_args`] accepts joins.
pub const JOIN_PORT: u16 = 7300;
/// The image both sides name in shared-disk mode (in the temporary directory).
pub const SHARED_DISK: &str = "shared.img";

/// The exit status of `ftvm primary` / `ftvm backup` when it lost the arbiter or was fenced by
/// a newer generation (it released nothing after that).
pub const EXIT_FENCED: i32 = crate::exit::FENCED;

/// A failure of the scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Not root, no KVM, no `ip`.
    #[error("{0}")]
    Missing(String),
    /// The namespace or TAP could not be set up.
    #[error("network namespace")]
    Netns(#[from] NetnsError),
    /// A file or directory could not be created, or a child could not be started.
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest did not answer in time.
    #[error("{0}")]
    Timeout(String),
    /// The client failed.
    #[error("client")]
    Client(#[from] ClientError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ScenarioError {
    let what = what.into();
    move |source| ScenarioError::Io { what, source }
}

/// Why a scenario cannot run on this machine, if it cannot (not root, no `/dev/kvm`, no `ip`).
pub fn missing() -> Option<String> {
    if let Err(r) = ftvm_channel::netns::require_root() {
        return Some(format!(
            "{r}: the demo creates a network namespace and a TAP device"
        ));
    }
    if let Some(r) = ftvm_vmm_core::kvm::missing() {
        return Some(r);
    }
    None
}

/// Which side of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `ftvm primary`.
    Primary,
    /// `ftvm backup`.
    Backup,
}

impl Side {
    /// `primary` / `backup`.
    pub fn name(self) -> &'static str {
        match self {
            Side::Primary => "primary",
            Side::Backup => "backup",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Side::Primary => "p",
            Side::Backup => "b",
        }
    }
}

/// Settings of a [`Scenario`].
#[derive(Debug, Clone)]
pub struct ScenarioConfig {
    /// The `ftvm` executable to start the two sides with.
    pub ftvm: PathBuf,
    /// Names the namespace (`ftvm-<tag>-<pid>-<n>`), at most 8 characters used.
    pub tag: String,
    /// Transport: shm, tcp, tcp-spin, uring, xdp.
    pub transport: String,
    /// Arbiter spec; `None`: a file arbiter in the temporary directory; `"etcd"`: a
    /// single-member etcd started on the namespace's loopback (needs the `etcd` binary);
    /// `"etcd3"`: a three-member etcd cluster there, its leader listed first (see
    /// [`Scenario::etcd_endpoints`]).
    pub arbiter: Option<String>,
    /// `--fail-timeout` in milliseconds (`None`: the default of `ftvm primary/backup`).
    pub fail_timeout_ms: Option<u64>,
    /// `--log` of the children.
    pub log: String,
    /// No failover at all (no `--arbiter`): the pair as `ftvm primary/backup` run without it.
    pub no_failover: bool,
    /// Shared-disk mode: both sides name one image ([`SHARED_DISK`]) with `--shared-disk`.
    pub shared_disk: bool,
    /// The guest both sides run (`--guest`; default `kv`, which [`Scenario::start`] waits
    /// for: another guest is started with [`Scenario::spawn`]).
    pub guest: String,
    /// The guest's command line (`None`: kv's address, gateway and port).
    pub cmdline: Option<String>,
    /// Guest RAM (`--mem`, K/M/G suffix).
    pub mem: String,
    /// Bytes of each disk image (sparse files).
    pub disk_size: u64,
}

impl ScenarioConfig {
    /// Defaults: shm transport, file arbiter, children logging warnings, 64 MiB guests, disks
    /// of [`DISK_SIZE`].
    pub fn new(ftvm: PathBuf, tag: &str) -> Self {
        ScenarioConfig {
            ftvm,
            tag: tag.into(),
            transport: "shm".into(),
            arbiter: None,
            fail_timeout_ms: None,
            log: "warn".into(),
            no_failover: false,
            shared_disk: false,
            guest: "kv".into(),
            cmdline: None,
            mem: "64M".into(),
            disk_size: DISK_SIZE,
        }
    }
}

/// One `ftvm primary` / `ftvm backup` child process, its stderr collected line by line.
#[derive(Debug)]
pub struct Node {
    /// `None`: a guest run alone ([`Scenario::spawn_alone`]).
    side: Option<Side>,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    status: Option<ExitStatus>,
    started: Instant,
}

impl Node {
    /// Starts `cmd` (stdin and stdout closed, stderr collected line by line, the default
    /// signal mask) as the node of `side` (`None`: a guest run alone, or any other `ftvm`
    /// command).
    ///
    /// # Errors
    /// [`ScenarioError::Io`] when the process cannot be started.
    pub fn start(
        side: Option<Side>,
        cmd: &mut std::process::Command,
    ) -> Result<Node, ScenarioError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        restore_signals(cmd);
        let mut child = cmd.spawn().map_err(io(format!("cannot start {cmd:?}")))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = child.stderr.take().map(|err| {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            })
        });
        Ok(Node {
            side,
            child,
            lines,
            reader,
            status: None,
            started: Instant::now(),
        })
    }

    /// Which side; `None` for a guest run alone ([`Scenario::spawn_alone`]).
    pub fn side(&self) -> Option<Side> {
        self.side
    }

    /// `primary`, `backup`, or `alone` (for labels).
    pub fn name(&self) -> &'static str {
        self.side.map_or("alone", Side::name)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When it was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The stderr lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stderr line `i` onwards (for showing new lines as they come).
    pub fn lines_from(&self, i: usize) -> Vec<String> {
        let l = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        l.get(i..).map(<[String]>::to_vec).unwrap_or_default()
    }

    /// The first stderr line containing `needle`, if any yet.
    pub fn find_line(&self, needle: &str) -> Option<String> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
    }

    /// Waits at most `timeout` for a stderr line containing `needle`.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.find_line(needle) {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The exit status if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits at most `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                self.join_reader();
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends SIGKILL and reaps it; returns when the process is gone.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.try_status().is_none() {
            if let Err(e) = self.child.kill() {
                tracing::warn!(pid = self.child.id(), error = %e, "cannot kill child");
            }
            self.status = self.child.wait().ok();
        }
        self.join_reader();
        self.status
    }

    fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    /// All stderr as one string (for messages).
    pub fn stderr_text(&self) -> String {
        self.lines().join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

static SCENARIOS: AtomicU64 = AtomicU64::new(0);

/// The pair, its namespace and its files (see the [module docs](self)).
#[derive(Debug)]
pub struct Scenario {
    /// The primary (`None` before it is spawned, or once a test took it to kill it).
    pub primary: Option<Node>,
    /// The backup.
    pub backup: Option<Node>,
    config: ScenarioConfig,
    arbiter: String,
    peer: String,
    shm: Option<PathBuf>,
    /// The etcd members started for the arbiter, in the order of the arbiter spec (dropped
    /// before the namespace).
    etcd: Vec<EtcdMember>,
    /// Images moved out of the temporary directory ([`Scenario::place_disk`]).
    placed: Vec<(Side, PathBuf)>,
    ns: Netns,
    dir: tempfile::TempDir,
}

impl Scenario {
    /// Creates the namespace, TAP, disks and arbiter directory (nothing is started yet).
    ///
    /// # Errors
    /// [`ScenarioError`].
    pub fn prepare(config: ScenarioConfig) -> Result<Self, ScenarioError> {
        if let Some(r) = missing() {
            return Err(ScenarioError::Missing(r));
        }
        let n = SCENARIOS.fetch_add(1, Ordering::Relaxed);
        let tag: String = config.tag.chars().take(8).collect();
        let pid = std::process::id();
        let dir = tempfile::Builder::new()
            .prefix(&format!("ftvm-{tag}-"))
            .tempdir()
            .map_err(io("cannot create a temporary directory"))?;
        let disks: &[&str] = if config.shared_disk {
            &[SHARED_DISK]
        } else {
            &["a.img", "b.img"]
        };
        for d in disks {
            let p = dir.path().join(d);
            std::fs::File::create(&p)
                .and_then(|f| f.set_len(config.disk_size))
                .map_err(io(format!("cannot create {}", p.display())))?;
        }
        let arb = dir.path().join("arbiter");
        std::fs::create_dir(&arb).map_err(io(format!("cannot create {}", arb.display())))?;
        let ns = Netns::create(&format!("ftvm-{tag}-{pid}-{n}"))?;
        ns.add_tap(TAP, Some((Ipv4Addr::new(10, 0, 2, 1), 24)))?;
        let mut etcd = Vec::new();
        let arbiter = match config.arbiter.as_deref() {
            None => format!("file:{}", arb.display()),
            Some("etcd") => {
                etcd = start_etcd(&ns, dir.path(), 1)?;
                format!("etcd:{ETCD_URL}#/ftvm/{tag}-{pid}-{n}")
            }
            Some("etcd3") => {
                etcd = start_etcd(&ns, dir.path(), 3)?;
                // The leader first: both sides try the endpoints in order, so crashing member 0
                // takes away the endpoint they use and forces an election.
                let leader = wait_etcd_leader(&ns, &etcd, Duration::from_secs(20))?;
                etcd.rotate_left(leader);
                let urls: Vec<String> = etcd.iter().map(EtcdMember::url).collect();
                format!("etcd:{}#/ftvm/{tag}-{pid}-{n}", urls.join(","))
            }
            Some(spec) => spec.to_string(),
        };
        let (peer, shm) = match config.transport.as_str() {
            "shm" => {
                let p = PathBuf::from(format!("/dev/shm/ftvm-{tag}-{pid}-{n}"));
                (p.display().to_string(), Some(p))
            }
            "xdp" => {
                // A veth pair inside the namespace: the primary on one end, the backup on the
                // other (`--peer` names each side's own end).
                ns.ip(&[
                    "link",
                    "add",
                    XDP_PRIMARY_IF,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    XDP_BACKUP_IF,
                ])?;
                ns.set_link(XDP_PRIMARY_IF, true)?;
                ns.set_link(XDP_BACKUP_IF, true)?;
                (String::new(), None)
            }
            _ => (format!("127.0.0.1:{LOG_PORT}"), None),
        };
        Ok(Scenario {
            primary: None,
            backup: None,
            config,
            arbiter,
            peer,
            shm,
            etcd,
            placed: Vec::new(),
            ns,
            dir,
        })
    }

    /// Starts the backup, then the primary, and waits until the guest answers PING.
    ///
    /// # Errors
    /// [`ScenarioError`]; [`ScenarioError::Timeout`] when kv does not answer in 30 s.
    pub fn start(config: ScenarioConfig) -> Result<Self, ScenarioError> {
        let mut s = Self::prepare(config)?;
        s.backup = Some(s.spawn(Side::Backup, &[])?);
        s.primary = Some(s.spawn(Side::Primary, &[])?);
        s.wait_ready(Duration::from_secs(30))?;
        Ok(s)
    }

    /// The namespace.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// The temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file arbiter's directory (meaningful with the default arbiter).
    pub fn arbiter_dir(&self) -> PathBuf {
        self.dir.path().join("arbiter")
    }

    /// The arbiter spec given to both sides.
    pub fn arbiter_spec(&self) -> &str {
        &self.arbiter
    }

    /// Client URLs of the etcd members this scenario started, in the order the arbiter spec
    /// names them (with `"etcd3"`: the member that was the leader at start first); empty with
    /// another arbiter.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd.iter().map(EtcdMember::url).collect()
    }

    /// Crashes etcd member `i` (index into [`Scenario::etcd_endpoints`]) with SIGKILL and reaps
    /// it; returns its process id. Killing one that is already gone does nothing.
    ///
    /// # Errors
    /// [`ScenarioError::Missing`] when there is no member `i`; [`ScenarioError::Io`] when it
    /// cannot be killed.
    pub fn kill_etcd_member(&mut self, i: usize) -> Result<Option<u32>, ScenarioError> {
        let n = self.etcd.len();
        let member = self
            .etcd
            .get_mut(i)
            .ok_or_else(|| ScenarioError::Missing(format!("no etcd member {i} (of {n})")))?;
        member.kill()
    }

    /// Starts etcd member `i` (index into [`Scenario::etcd_endpoints`]) again after
    /// [`Scenario::kill_etcd_member`], on its data directory, and waits (at most 15 s) until it
    /// accepts connections. A member that runs is left alone.
    ///
    /// # Errors
    /// [`ScenarioError::Missing`] when there is no member `i`; [`ScenarioError::Io`] or
    /// [`ScenarioError::Timeout`] when it does not start.
    pub fn restart_etcd_member(&mut self, i: usize) -> Result<(), ScenarioError> {
        let n = self.etcd.len();
        let member = self
            .etcd
            .get_mut(i)
            .ok_or_else(|| ScenarioError::Missing(format!("no etcd member {i} (of {n})")))?;
        if member.child.is_some() {
            return Ok(());
        }
        member.spawn(&self.ns)?;
        member.wait_up(&self.ns, Instant::now() + Duration::from_secs(15))
    }

    /// The index (into [`Scenario::etcd_endpoints`]) of the member the running members name
    /// as their leader; `None` while there is none (an election) or no member answers.
    pub fn etcd_leader(&self) -> Option<usize> {
        let members = &self.etcd;
        self.in_netns(|| etcd_leader_of(members)).ok().flatten()
    }

    /// The guest's service address.
    pub fn guest_addr() -> SocketAddr {
        SocketAddr::from((GUEST_IP, GUEST_PORT))
    }

    /// The JSON report a side wrote (`p.json` / `b.json`), if any.
    pub fn report(&self, side: Side) -> Option<serde_json::Value> {
        let p = self.dir.path().join(format!("{}.json", side.tag()));
        let text = std::fs::read_to_string(p).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The disk image `side` names: its own copy (`a.img`, `b.img`), or in shared-disk mode
    /// the one image of both ([`SHARED_DISK`]).
    pub fn disk(&self, side: Side) -> PathBuf {
        if let Some((_, p)) = self.placed.iter().rev().find(|(s, _)| *s == side) {
            return p.clone();
        }
        let name = match (self.config.shared_disk, side) {
            (true, _) => SHARED_DISK,
            (false, Side::Primary) => "a.img",
            (false, Side::Backup) => "b.img",
        };
        self.dir.path().join(name)
    }

    /// Gives `side` a fresh image (sparse, zero, [`DISK_SIZE`] bytes, as the one it replaces)
    /// in `dir` instead of the temporary directory — e.g. on a small filesystem that fills —
    /// and returns its path. Call it before the side is spawned.
    ///
    /// # Errors
    /// [`ScenarioError::Io`] when the image cannot be created.
    pub fn place_disk(&mut self, side: Side, dir: &Path) -> Result<PathBuf, ScenarioError> {
        let p = dir.join(format!("{}.img", side.tag()));
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(DISK_SIZE))
            .map_err(io(format!("cannot create {}", p.display())))?;
        self.placed.push((side, p.clone()));
        Ok(p)
    }

    /// Whether both sides name one image (`--shared-disk`).
    pub fn shared_disk(&self) -> bool {
        self.config.shared_disk
    }

    /// The command-line arguments of `side` (before `extra`).
    pub fn args(&self, side: Side) -> Vec<String> {
        let d = self.dir.path();
        let tag = side.tag();
        let mut v: Vec<String> = vec![
            side.name().into(),
            "--guest".into(),
            self.config.guest.clone(),
            "--mem".into(),
            self.config.mem.clone(),
            "--disk".into(),
            self.disk(side).display().to_string(),
            "--net".into(),
            format!("tap:{TAP}"),
            "--cmdline".into(),
            self.config.cmdline.clone().unwrap_or_else(kv_cmdline),
            "--peer".into(),
            self.peer_of(side),
            "--transport".into(),
            self.config.transport.clone(),
            "--console".into(),
            d.join(format!("{tag}.console")).display().to_string(),
            "--report".into(),
            d.join(format!("{tag}.json")).display().to_string(),
            "--log".into(),
            self.config.log.clone(),
        ];
        if self.config.shared_disk {
            v.push("--shared-disk".into());
        }
        if !self.config.no_failover {
            let (me, peer) = match side {
                Side::Primary => (PRIMARY_HEARTBEAT_PORT, BACKUP_HEARTBEAT_PORT),
                Side::Backup => (BACKUP_HEARTBEAT_PORT, PRIMARY_HEARTBEAT_PORT),
            };
            v.extend([
                "--arbiter".into(),
                self.arbiter.clone(),
                "--node".into(),
                side.name().into(),
                "--heartbeat".into(),
                format!("127.0.0.1:{me}"),
                "--peer-heartbeat".into(),
                format!("127.0.0.1:{peer}"),
            ]);
            if let Some(ms) = self.config.fail_timeout_ms {
                v.extend(["--fail-timeout".into(), ms.to_string()]);
            }
        }
        v
    }

    /// Starts `side` inside the namespace with [`Scenario::args`] plus `extra`.
    ///
    /// # Errors
    /// [`ScenarioError::Io`] when the process cannot be started.
    pub fn spawn(&self, side: Side, extra: &[String]) -> Result<Node, ScenarioError> {
        let mut args = self.args(side);
        args.extend_from_slice(extra);
        self.spawn_ftvm(Some(side), &args)
    }

    /// Starts `kv` alone (`ftvm run`) inside the namespace on `disk`, with the pair's memory
    /// size, TAP and command line, its console to `alone.console` in the temporary directory
    /// ([`Scenario::console`]). Both sides must be gone: it takes over the TAP (and, on the
    /// shared image, the disk).
    ///
    /// # Errors
    /// [`ScenarioError::Io`] when the process cannot be started.
    pub fn spawn_alone(&self, disk: &Path) -> Result<Node, ScenarioError> {
        let args: Vec<String> = vec![
            "run".into(),
            "--guest".into(),
            "kv".into(),
            "--mem".into(),
            self.config.mem.clone(),
            "--disk".into(),
            disk.display().to_string(),
            "--net".into(),
            format!("tap:{TAP}"),
            "--cmdline".into(),
            kv_cmdline(),
            "--console".into(),
            self.dir.path().join("alone.console").display().to_string(),
            "--quiet".into(),
            "--log".into(),
            self.config.log.clone(),
        ];
        self.spawn_ftvm(None, &args)
    }

    /// The flags that make the primary accept joins on [`JOIN_PORT`] once alone.
    pub fn accept_join_args() -> Vec<String> {
        vec!["--accept-join".into(), format!("127.0.0.1:{JOIN_PORT}")]
    }

    /// `--peer` of `side`: its own veth end (xdp), the rings' prefix (shm) or the log address.
    fn peer_of(&self, side: Side) -> String {
        match (self.config.transport.as_str(), side) {
            ("xdp", Side::Primary) => XDP_PRIMARY_IF.into(),
            ("xdp", Side::Backup) => XDP_BACKUP_IF.into(),
            _ => self.peer.clone(),
        }
    }

    /// Starts `ftvm backup --join 127.0.0.1:<join_port>` inside the namespace, named `name` on
    /// the arbiter, with its own image `<name>.img` (own-copy mode; filled by the transfer) or
    /// the shared one, the pair's TAP as its service TAP, heartbeats on port `heartbeat`, its
    /// console and report at `<name>.console` / `<name>.json` ([`Scenario::report_of`]), plus
    /// `extra`. It shows as the backup in [`Scenario::stderr_of_both`] once put in
    /// [`Scenario::backup`].
    ///
    /// # Errors
    /// [`ScenarioError::Io`] when the image or the process cannot be created.
    pub fn spawn_joiner(
        &self,
        name: &str,
        (heartbeat, join_port): (u16, u16),
        extra: &[String],
    ) -> Result<Node, ScenarioError> {
        let d = self.dir.path();
        let disk = if self.config.shared_disk {
            self.disk(Side::Backup)
        } else {
            d.join(format!("{name}.img"))
        };
        let mut args: Vec<String> = vec![
            "backup".into(),
            "--join".into(),
            format!("127.0.0.1:{join_port}"),
            "--net".into(),
            format!("tap:{TAP}"),
            "--transport".into(),
            self.config.transport.clone(),
            "--console".into(),
            d.join(format!("{name}.console")).display().to_string(),
            "--report".into(),
            d.join(format!("{name}.json")).display().to_string(),
            "--log".into(),
            self.config.log.clone(),
            "--arbiter".into(),
            self.arbiter.clone(),
            "--node".into(),
            name.into(),
            "--heartbeat".into(),
            format!("127.0.0.1:{heartbeat}"),
        ];
        if self.config.shared_disk {
            args.push("--shared-disk".into());
        }
        // shm, xdp: the joined pair's log runs on a link of its own, at the backup's `--peer`
        // (the joiner replaces the backup); the tcp transports run it over the join's
        // connection and need none.
        if matches!(self.config.transport.as_str(), "shm" | "xdp") {
            args.extend(["--peer".into(), self.peer_of(Side::Backup)]);
        }
        // `--disk` in `extra` names another image (a test of a careless joiner).
        if !extra.iter().any(|a| a == "--disk") {
            args.extend(["--disk".into(), disk.display().to_string()]);
        }
        args.extend_from_slice(extra);
        self.spawn_ftvm(Some(Side::Backup), &args)
    }

    /// The JSON report of a joiner started with [`Scenario::spawn_joiner`] as `name`.
    pub fn report_of(&self, name: &str) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.json"))).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The console output so far of `side` (`p.console` / `b.console`; `None`: of the guest run
    /// alone, `alone.console`); empty when there is none.
    pub fn console(&self, side: Option<Side>) -> String {
        let name = side.map_or("alone", Side::tag);
        std::fs::read_to_string(self.dir.path().join(format!("{name}.console"))).unwrap_or_default()
    }

    fn spawn_ftvm(&self, side: Option<Side>, args: &[String]) -> Result<Node, ScenarioError> {
        let mut cmd = self
            .ns
            .command(&self.config.ftvm.display().to_string(), args);
        Node::start(side, &mut cmd)
    }

    /// Runs `f` on a thread inside the namespace.
    ///
    /// # Errors
    /// [`ScenarioError::Netns`] when the thread cannot enter the namespace.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, ScenarioError> {
        Ok(self.ns.run(f)?)
    }

    /// One command to the guest, from inside the namespace, on a fresh connection.
    ///
    /// # Errors
    /// [`ScenarioError::Client`].
    pub fn command(&self, args: &[&[u8]], timeout: Duration) -> Result<Reply, ScenarioError> {
        self.in_netns(|| {
            RespConn::connect(Self::guest_addr(), timeout).and_then(|mut c| c.command(args))
        })?
        .map_err(ScenarioError::from)
    }

    /// Waits until the guest answers PING (through whichever side is live).
    ///
    /// # Errors
    /// [`ScenarioError::Timeout`], with both sides' stderr.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), ScenarioError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Reply::Simple(s)) = self.command(&[b"PING"], Duration::from_secs(1)) {
                if s == "PONG" {
                    return Ok(());
                }
            }
            let dead = [&mut self.primary, &mut self.backup]
                .into_iter()
                .flatten()
                .all(|n| n.try_status().is_some());
            if Instant::now() >= deadline || dead {
                return Err(ScenarioError::Timeout(format!(
                    "kv did not answer PING within {timeout:?}{}\n{}",
                    if dead { " (both sides exited)" } else { "" },
                    self.stderr_of_both()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Both sides' stderr, labelled (for error messages).
    pub fn stderr_of_both(&self) -> String {
        let mut s = String::new();
        for n in [&self.primary, &self.backup].into_iter().flatten() {
            s.push_str(&format!(
                "--- {} stderr ---\n{}\n",
                n.name(),
                n.stderr_text()
            ));
        }
        s
    }

    /// Sends SHUTDOWN to the guest (it powers off; the connection is not answered).
    pub fn shutdown_guest(&self) {
        let _ = self.command(&[b"SHUTDOWN"], Duration::from_millis(500));
    }

    /// The generation files (`gen-N`) in the file arbiter's directory, sorted by N.
    pub fn generations(&self) -> Vec<(u64, String)> {
        let mut v: Vec<(u64, String)> = std::fs::read_dir(self.arbiter_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let g = name.strip_prefix("gen-")?.parse().ok()?;
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let winner = text
                    .lines()
                    .find_map(|l| l.strip_prefix("winner "))
                    .unwrap_or("")
                    .to_string();
                Some((g, winner))
            })
            .collect();
        v.sort();
        v
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        // Children first (they hold the TAP and the rings), then the rings; the namespace and
        // the directory drop after this body.
        self.primary.take();
        self.backup.take();
        self.etcd.clear();
        // The pair's rings, and those of joined pairs (`<prefix>.g<generation>.*`), which a
        // SIGKILLed side leaves behind.
        if let Some(p) = &self.shm {
            let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
                return;
            };
            let name = name.to_string_lossy();
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let f = e.file_name();
                let f = f.to_string_lossy();
                if f.strip_prefix(&*name)
                    .is_some_and(|rest| rest.starts_with('.'))
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// The guest's command line (address, gateway, port).
fn kv_cmdline() -> String {
    format!("ip={GUEST_IP}/24 gw=10.0.2.1 port={GUEST_PORT}")
}

/// Client URL of the etcd started inside the namespace (`arbiter: Some("etcd")`; with
/// `Some("etcd3")` member m0's, [`ETCD_CLIENT_PORTS`]).
pub const ETCD_URL: &str = "http://127.0.0.1:2379";

/// Client ports of the etcd members (member `i` listens on the `i`-th), on the namespace's
/// loopback.
pub const ETCD_CLIENT_PORTS: [u16; 3] = [2379, 12379, 22379];

/// Peer (Raft) ports of the etcd members.
pub const ETCD_PEER_PORTS: [u16; 3] = [2380, 12380, 22380];

/// One etcd member started inside the namespace; SIGKILLed and reaped on drop.
#[derive(Debug)]
struct EtcdMember {
    client_port: u16,
    /// Its command line (a restart runs it again: with its data directory in place, etcd
    /// rejoins its cluster and ignores the `--initial-*` flags).
    args: Vec<String>,
    /// Its stdout and stderr.
    log: PathBuf,
    /// `None` once killed.
    child: Option<Child>,
}

impl EtcdMember {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn kill(&mut self) -> Result<Option<u32>, ScenarioError> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let pid = child.id();
        let killed = child.kill();
        let _ = child.wait();
        killed.map_err(io(format!("cannot kill etcd (pid {pid})")))?;
        Ok(Some(pid))
    }

    /// Starts the member's process (its log appended to).
    fn spawn(&mut self, ns: &Netns) -> Result<(), ScenarioError> {
        let log = &self.log;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io(format!("cannot create {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io(format!("cannot create {}", log.display())))?;
        let mut cmd = ns.command("etcd", &self.args);
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        restore_signals(&mut cmd);
        // `ip netns exec` execs etcd: the child's pid is etcd's.
        let child = cmd
            .spawn()
            .map_err(io("cannot start etcd (Debian package etcd-server)"))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the member accepts connections (at most until `deadline`).
    fn wait_up(&mut self, ns: &Netns, deadline: Instant) -> Result<(), ScenarioError> {
        loop {
            let port = self.client_port;
            if ns.run(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())? {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            if exited || Instant::now() >= deadline {
                return Err(ScenarioError::Timeout(format!(
                    "etcd did not start; its log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Starts an etcd cluster of `n` (1 to 3) members on the namespace's loopback, data and logs in
/// `dir`; waits (at most 15 s) until each accepts connections.
fn start_etcd(ns: &Netns, dir: &Path, n: usize) -> Result<Vec<EtcdMember>, ScenarioError> {
    let peer_url = |i: usize| format!("http://127.0.0.1:{}", ETCD_PEER_PORTS[i]);
    let initial_cluster: Vec<String> = (0..n).map(|i| format!("m{i}={}", peer_url(i))).collect();
    let initial_cluster = initial_cluster.join(",");
    let mut members = Vec::with_capacity(n);
    for (i, &client_port) in ETCD_CLIENT_PORTS.iter().enumerate().take(n) {
        let client = format!("http://127.0.0.1:{client_port}");
        let args = vec![
            "--name".to_string(),
            format!("m{i}"),
            "--data-dir".into(),
            dir.join(format!("etcd-m{i}")).display().to_string(),
            "--listen-client-urls".into(),
            client.clone(),
            "--advertise-client-urls".into(),
            client,
            "--listen-peer-urls".into(),
            peer_url(i),
            "--initial-advertise-peer-urls".into(),
            peer_url(i),
            "--initial-cluster".into(),
            initial_cluster.clone(),
            "--initial-cluster-state".into(),
            "new".into(),
            "--initial-cluster-token".into(),
            format!("ftvm-{}", ns.name()),
        ];
        let mut m = EtcdMember {
            client_port,
            args,
            log: dir.join(format!("etcd-m{i}.log")),
            child: None,
        };
        m.spawn(ns)?;
        members.push(m);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for m in &mut members {
        m.wait_up(ns, deadline)?;
    }
    Ok(members)
}

/// Waits (at most `timeout`) until the members agree on a leader; returns its index.
fn wait_etcd_leader(
    ns: &Netns,
    members: &[EtcdMember],
    timeout: Duration,
) -> Result<usize, ScenarioError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(i) = ns.run(|| etcd_leader_of(members))? {
            return Ok(i);
        }
        if Instant::now() >= deadline {
            return Err(ScenarioError::Timeout(format!(
                "the etcd cluster elected no leader within {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The index of the member the running `members` name as leader (from inside the namespace).
fn etcd_leader_of(members: &[EtcdMember]) -> Option<usize> {
    let status: Vec<Option<(String, String)>> = members
        .iter()
        .map(|m| {
            m.child.as_ref()?;
            etcd_status(m.client_port)
        })
        .collect();
    let leader = status
        .iter()
        .flatten()
        .map(|(_, leader)| leader)
        .find(|l| l.as_str() != "0")?;
    status
        .iter()
        .position(|s| s.as_ref().is_some_and(|(me, _)| me == leader))
}

/// `(member id, leader id)` from the member's status (etcd's JSON gateway,
/// `POST /v3/maintenance/status`); `None` if it does not answer in time.
fn etcd_status(port: u16) -> Option<(String, String)> {
    use std::io::{Read, Write};
    let timeout = Duration::from_millis(500);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut conn = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    conn.set_read_timeout(Some(timeout)).ok()?;
    conn.set_write_timeout(Some(timeout)).ok()?;
    let request = format!(
        "POST /v3/maintenance/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    conn.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    conn.read_to_string(&mut response).ok()?;
    // The body is one JSON object (whatever the transfer encoding around it).
    let body = &response[response.find("\r\n\r\n")?..];
    let json = &body[body.find('{')?..=body.rfind('}')?];
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let id = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    Some((
        id(&v["header"]["member_id"])?,
        id(&v["leader"]).unwrap_or_default(),
    ))
}

/// Children start with the default signal mask: `ftvm demo` blocks SIGINT/SIGTERM in its own
/// threads to handle them on one thread, and a blocked mask survives `exec`.
fn restore_signals(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // async-signal-safe functions (sigemptyset, sigprocmask) on a local set.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
