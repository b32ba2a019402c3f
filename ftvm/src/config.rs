//! The configuration of `ftvm primary` and `ftvm backup`: one typed struct per role, filled
//! by the TOML file (`--config`) and by the flags.
//!
//! ```text
//!  CommonConfig ──flatten──> PrimaryConfig   (ftvm primary: flags, primary.toml)
//!        └─────flatten──> BackupConfig    (ftvm backup:  flags, backup.toml)
//! ```
//! Each struct is at once the clap flag set and the serde form of the TOML file: a key is the
//! flag's name with `_` for `-` (`--fail-timeout` ⇔ `fail_timeout`), and a value has the type
//! the flag has (the enums below, sizes with K/M/G, `IP:PORT` addresses). The defaults live in
//! the clap attributes (and, where they differ per role, in the constants of this module set on
//! the role's command), so `--help` shows them and a key absent from both the flags and the
//! file takes them.
//!
//! How the two sources merge ([`load`]): clap parses the flags (defaults filled in) and the
//! struct is serialized into a TOML table; each key of the file then replaces the table's
//! value **unless that flag was given on the command line** (clap's `ValueSource`): flags
//! override the file, the file overrides the defaults. The table is deserialized back into the
//! typed struct after each key, so a bad value is refused naming its key. Keys that are no
//! flag of the role are refused, naming the key (and the role it belongs to, if it is the
//! other role's).
//!
//! What both sides of a pair must agree on is derived from this type
//! ([`crate::pairing::PairingSettings::new`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, ValueEnum};
use ftvm_ft::primary::PeerFailurePolicy;
use ftvm_ft::stop::{BackupStopPolicy, PrimaryStopPolicy};
use ftvm_ft::throttle::{CgroupPlace, ThrottleConfig};
use ftvm_ft::Role;
use ftvm_ringbuf::IdleKind;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cli::{arbiter_spec, ArbiterSpecError};

/// The primary's heartbeat address when none is given (the backup's `peer_heartbeat`).
pub const DEFAULT_PRIMARY_HEARTBEAT: &str = "127.0.0.1:7102";
/// The backup's heartbeat address when none is given (the primary's `peer_heartbeat`).
pub const DEFAULT_BACKUP_HEARTBEAT: &str = "127.0.0.1:7101";

/// Default failure-detection timeout (ms). Failover time ≈ detection (timeout + ≤ 1 heartbeat
/// interval of 10 ms) + arbiter (a few ms) + drain of the received log + TAP attach + the
/// clients' TCP retransmission of what the dead primary never logged (Linux: ≥ 200 ms RTO).
/// 200 ms keeps that sum under 1 s at p50 with room to spare, while staying 20 heartbeat
/// intervals above the scheduling hiccups seen on this 2-core machine under load (tens of ms),
/// so a busy but healthy peer is not declared failed.
pub const DEFAULT_FAIL_TIMEOUT_MS: u64 = 200;

/// Default lag target of the primary's throttle (ms): the design's bound on how far the
/// backup may trail, which also bounds the log it must drain when it goes live.
pub const DEFAULT_THROTTLE_TARGET_MS: u64 = 100;

/// A bad configuration: one line, naming the flag or key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config {path}: line {line}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// A key that is no setting of this role.
    #[error("config {path}: unknown key `{key}`{hint}")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why (the other role's key, a key spelt with `-`), or empty.
        hint: String,
    },
    /// A key with a value of the wrong type or out of its set.
    #[error("config {path}: `{key}` = {value}: {message}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The value as written.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// A setting that must be given is missing.
    #[error("{0} is required (flag or config file)")]
    Missing(&'static str),
    /// Settings that do not go together, or a value out of range.
    #[error("{0}")]
    Invalid(String),
    /// A malformed `--arbiter`.
    #[error(transparent)]
    Arbiter(#[from] ArbiterSpecError),
}

// ---------------------------------------------------------------------------------------------
// Typed values
// ---------------------------------------------------------------------------------------------

/// The log transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// Shared-memory rings (both sides on one host).
    Shm,
    /// TCP, blocking reads on the poller thread.
    Tcp,
    /// TCP, non-blocking and spin-polled.
    TcpSpin,
    /// TCP through io_uring.
    Uring,
    /// AF_XDP raw frames on a network interface.
    Xdp,
}

impl Transport {
    /// The name the flag and the reports use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Shm => "shm",
            Self::Tcp => "tcp",
            Self::TcpSpin => "tcp-spin",
            Self::Uring => "uring",
            Self::Xdp => "xdp",
        }
    }
}

/// How a waiting thread idles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Idle {
    /// Busy-spin (dedicated cores).
    Spin,
    /// Spin, then yield the CPU.
    Yield,
    /// Spin briefly, then sleep until woken.
    Park,
}

impl From<Idle> for IdleKind {
    fn from(i: Idle) -> Self {
        match i {
            Idle::Spin => IdleKind::Spin,
            Idle::Yield => IdleKind::Yield,
            Idle::Park => IdleKind::Park,
        }
    }
}

/// A primary **without an arbiter** whose backup fails: see
/// [`PeerFailurePolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBackupFailure {
    /// Stop with status 204 (held outputs never released).
    Stop,
    /// Release the held outputs and run on alone, without protection.
    GoAloneUnprotected,
}

/// A primary whose backup stops as planned (its GOODBYE `PlannedStop`): see
/// [`BackupStopPolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBackupStop {
    /// Go on alone (unprotected until a new pair is started).
    Alone,
    /// Stop too, with status 207.
    Stop,
}

/// A backup whose primary stops as planned (its GOODBYE `PlannedStop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnPrimaryStop {
    /// Stop too, with status 207; it does not go live.
    Stop,
    /// A handover: replay everything received, win the next generation and go live at once
    /// (needs `--arbiter`).
    TakeOver,
}

/// Implements `Display`, `Serialize` (as that text) and `Deserialize` (through `FromStr`) for
/// a value written as one string in flags and TOML.
macro_rules! text_value {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// The arbiter: `file:DIR` (an existing shared directory) or etcd (the form
/// `ftvm_ft::arbiter::open` takes, `etcd:http://HOST:PORT[,...][#PREFIX]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArbiterSpec {
    /// A shared directory (atomic create of one file per generation).
    File(PathBuf),
    /// An etcd cluster: its endpoint URLs and key prefix.
    Etcd {
        /// `http(s)://HOST:PORT`, in the order they are tried.
        endpoints: Vec<String>,
        /// The key prefix (`None`: the arbiter's default).
        prefix: Option<String>,
    },
}

impl FromStr for ArbiterSpec {
    type Err = ArbiterSpecError;

    /// Strictly ([`arbiter_spec`]): `file:DIR` (DIR must exist), `etcd://HOST:PORT[,...][#PREFIX]`
    /// or `etcd:http(s)://HOST:PORT[,...][#PREFIX]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let canonical = arbiter_spec(s)?;
        if let Some(dir) = canonical.strip_prefix("file:") {
            return Ok(Self::File(PathBuf::from(dir)));
        }
        let rest = canonical.strip_prefix("etcd:").unwrap_or(&canonical);
        let (list, prefix) = match rest.split_once('#') {
            Some((l, p)) => (l, Some(p.to_string())),
            None => (rest, None),
        };
        Ok(Self::Etcd {
            endpoints: list.split(',').map(str::to_string).collect(),
            prefix,
        })
    }
}

impl std::fmt::Display for ArbiterSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(dir) => write!(f, "file:{}", dir.display()),
            Self::Etcd { endpoints, prefix } => {
                write!(f, "etcd:{}", endpoints.join(","))?;
                match prefix {
                    Some(p) => write!(f, "#{p}"),
                    None => Ok(()),
                }
            }
        }
    }
}
text_value!(ArbiterSpec);

/// A network backend: `tap:IFNAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetSpec {
    /// An existing TAP interface.
    Tap(String),
}

impl NetSpec {
    /// The TAP's name.
    pub fn tap(&self) -> &str {
        match self {
            Self::Tap(name) => name,
        }
    }
}

impl FromStr for NetSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("tap:") {
            Some(name) if !name.is_empty() => Ok(Self::Tap(name.to_string())),
            _ => Err(format!("{s:?}: expected tap:IFNAME")),
        }
    }
}

impl std::fmt::Display for NetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tap:{}", self.tap())
    }
}
text_value!(NetSpec);

/// Where the primary's throttle puts its cgroup: `auto`, `none` or a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupSpec {
    /// Under this process's own cgroup in the cpu controller's hierarchy.
    Auto,
    /// No cgroup: the pacer alone.
    None,
    /// Under this (existing, delegated) cgroup directory.
    Dir(PathBuf),
}

impl FromStr for CgroupSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "none" => Ok(Self::None),
            dir if Path::new(dir).is_dir() => Ok(Self::Dir(PathBuf::from(dir))),
            dir => Err(format!(
                "{dir:?}: no such directory (auto, none or a cgroup directory)"
            )),
        }
    }
}

impl std::fmt::Display for CgroupSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::None => f.write_str("none"),
            Self::Dir(d) => write!(f, "{}", d.display()),
        }
    }
}
text_value!(CgroupSpec);

impl From<&CgroupSpec> for CgroupPlace {
    fn from(c: &CgroupSpec) -> Self {
        match c {
            CgroupSpec::Auto => CgroupPlace::Auto,
            CgroupSpec::None => CgroupPlace::Off,
            CgroupSpec::Dir(d) => CgroupPlace::At(d.clone()),
        }
    }
}

/// A size in bytes, written with an optional K/M/G suffix (`64M`); a TOML integer is bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::parse_size(s).map(Size)
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Bytes(u64),
            Text(String),
        }
        match Form::deserialize(d)? {
            Form::Bytes(n) => Ok(Size(n)),
            Form::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The configuration
// ---------------------------------------------------------------------------------------------

/// The settings of both roles (flattened into [`PrimaryConfig`] and [`BackupConfig`]).
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct CommonConfig {
    /// TOML file with these settings: each key is a flag's name with `_` for `-`
    /// (`fail_timeout = 300`); flags given on the command line override it. Unknown keys are
    /// refused. Examples: contrib/config/primary.toml, backup.toml.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Print the configuration this side would run with (the flags merged over `--config`,
    /// defaults filled in) as TOML, and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// Guest: an embedded guest name (cpu, kv, stream, nondet) or a static ELF path (required).
    #[arg(long)]
    pub guest: Option<String>,
    /// Guest RAM size (K/M/G suffix).
    #[arg(long, default_value = "64M")]
    pub mem: Size,
    /// Raw disk image (the backup writes its own copy; both must start equal), or with
    /// `--shared-disk` the one image both sides name.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Shared-disk mode (both sides must agree; needs `--disk`): the primary and the backup
    /// name the same image. The primary's disk writes are outputs: each waits until the backup
    /// acknowledged the log up to it (counted in the report's `disk_waits`); the backup never
    /// touches the disk while it replays (writes dropped, read data from the log) and owns it
    /// once it goes live.
    #[arg(long)]
    pub shared_disk: bool,
    /// Network device: `tap:IFNAME` (set per role below).
    #[arg(long, value_name = "tap:IFNAME")]
    pub net: Option<NetSpec>,
    /// Guest command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Console output file (primary: released under the output rule; backup: its replica, or
    /// once live, its own output) [default: standard output].
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// Peer: `HOST:PORT` (tcp, tcp-spin, uring; the backup listens there, the primary connects),
    /// a path prefix (shm), or this side's network interface facing the peer (xdp, e.g. one end
    /// of a veth pair) (required).
    #[arg(long)]
    pub peer: Option<String>,
    /// Log transport.
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// Log buffer capacity in bytes (power of two; K/M/G suffix).
    #[arg(long, default_value = "16M")]
    pub log_capacity: Size,
    /// Write a JSON report of the run here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// How the vCPU waits (the backup for its next log entry, the primary on a full log
    /// buffer): park spins briefly, then sleeps until the log poller delivers (leaves the CPU
    /// to others when the pair shares cores).
    #[arg(long, value_enum, default_value = "park")]
    pub idle: Idle,
    /// Idle strategy of the log poller threads: spin (dedicated cores), yield, park (the sender
    /// sleeps while everything it sent is acknowledged, woken by the next commit).
    #[arg(long, value_enum, default_value = "park")]
    pub poll_idle: Idle,
    /// Failover: the arbiter both sides must win a generation on before going live:
    /// `file:DIR` (an existing shared directory), `etcd://HOST:PORT[,HOST:PORT...][#PREFIX]` or
    /// `etcd:http://HOST:PORT[,...][#PREFIX]`; anything else is refused at start. Without it,
    /// no failover: the pair stops when a side fails.
    #[arg(long, help_heading = "Failover")]
    pub arbiter: Option<ArbiterSpec>,
    /// This node's name on the arbiter [default: primary / backup].
    #[arg(long, help_heading = "Failover")]
    pub node: Option<String>,
    /// Local UDP address (IP:PORT) of the failure detector's heartbeats (with `--arbiter`);
    /// each side's `--heartbeat` must be the other's `--peer-heartbeat`.
    #[arg(long, value_name = "IP:PORT", help_heading = "Failover")]
    pub heartbeat: Option<SocketAddr>,
    /// The peer's heartbeat address (IP:PORT).
    #[arg(long, value_name = "IP:PORT", help_heading = "Failover")]
    pub peer_heartbeat: Option<SocketAddr>,
    /// Milliseconds without heartbeats or log traffic after which the peer is presumed failed
    /// (more than 20).
    #[arg(long, default_value_t = DEFAULT_FAIL_TIMEOUT_MS, help_heading = "Failover")]
    pub fail_timeout: u64,
    /// The generation this pair starts in (at least 1); a node whose generation is older than
    /// the arbiter's newest is fenced and exits with status 203.
    #[arg(long, default_value_t = 1, help_heading = "Failover")]
    pub generation: u64,
    /// Serve the live counters over HTTP at this `HOST:PORT`: Prometheus text at `/metrics`,
    /// JSON at `/status.json` (read by `ftvm stat`); from pairing on.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Accept a new backup (`ftvm backup --join`) on HOST:PORT whenever this side runs alone
    /// as a primary (a primary whose backup failed, a backup that went live): the backup is
    /// cloned from the running VM by live state transfer, and the pair goes on in a new
    /// generation. Needs --arbiter and a tcp, tcp-spin or uring logging transport.
    #[arg(long, value_name = "HOST:PORT", help_heading = "Re-protection")]
    pub accept_join: Option<String>,
    /// The stop-and-copy pause a join aims for: pre-copy ends when the pages left dirty would
    /// be sent within it at 1 GB/s.
    #[arg(
        long,
        default_value_t = 5,
        value_name = "MS",
        help_heading = "Re-protection"
    )]
    pub join_pause_ms: u64,
    /// Most pre-copy rounds of a join (the full copy included); then the cut comes whatever
    /// is left dirty.
    #[arg(
        long,
        default_value_t = 30,
        value_name = "N",
        help_heading = "Re-protection"
    )]
    pub join_max_rounds: u32,
    /// Auto-converge: while pre-copy does not converge (the guest dirties memory faster than
    /// the link sends it), lower the vCPU's CPU share round by round through the CPU throttle
    /// (needs the throttle running: a primary's, or a went-live backup's); the share is given
    /// back at the cut. `false`: accept
    /// the longer pause after --join-max-rounds.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL", help_heading = "Re-protection")]
    pub join_auto_converge: bool,
}

/// The CPU throttle of a primary (`ftvm primary`, and `ftvm backup` once it went live and runs
/// as a primary that serves joins, `--accept-join`): flags and keys of both roles.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct ThrottleArgs {
    /// Keep the backup's execution within this many milliseconds of the primary's by lowering
    /// the primary vCPU's CPU share (a cgroup v2 or v1 `cpu` group plus pauses at the vCPU's
    /// exits; the pauses alone where no cgroup is writable); 0 turns the throttle off. A join's
    /// auto-converge lowers the share through it. On a backup: applied once it went live and
    /// runs as a primary (with --accept-join).
    #[arg(long, default_value_t = DEFAULT_THROTTLE_TARGET_MS, help_heading = "Throttle")]
    pub throttle_target_ms: u64,
    /// The smallest CPU share the throttle may give the vCPU, in (0, 1].
    #[arg(long, default_value_t = 0.1, help_heading = "Throttle")]
    pub throttle_min_share: f64,
    /// Where the throttle's cgroup goes: `auto` (under this process's own cgroup in the cpu
    /// controller's hierarchy), a cgroup directory (a delegated one; on cgroup v2 the process
    /// moves into it), or `none` (pauses at exits only).
    #[arg(
        long,
        value_name = "auto|none|DIR",
        default_value = "auto",
        help_heading = "Throttle"
    )]
    pub throttle_cgroup: CgroupSpec,
}

impl ThrottleArgs {
    /// The throttle's settings (`None`: off, `--throttle-target-ms 0`).
    pub fn config(&self) -> Option<ThrottleConfig> {
        if self.throttle_target_ms == 0 {
            return None;
        }
        let mut cfg = ThrottleConfig {
            target: Duration::from_millis(self.throttle_target_ms),
            cgroup: CgroupPlace::from(&self.throttle_cgroup),
            ..ThrottleConfig::default()
        };
        cfg.pi.min_share = self.throttle_min_share;
        Some(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let m = self.throttle_min_share;
        if !(m > 0.0 && m <= 1.0) {
            return Err(ConfigError::Invalid(format!(
                "--throttle-min-share {m}: must be in (0, 1]"
            )));
        }
        Ok(())
    }
}

/// `ftvm primary`: the common settings and the primary's own.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[command(
    mut_arg("net", |a| a.help(
        "The guest's network device: `tap:IFNAME`, an existing TAP (with the host side's \
         address on it, or bridged to the service network); its transmits are outputs \
         (released under the output rule)")),
    mut_arg("heartbeat", |a| a.default_value(DEFAULT_PRIMARY_HEARTBEAT)),
    mut_arg("peer_heartbeat", |a| a.default_value(DEFAULT_BACKUP_HEARTBEAT)),
)]
pub struct PrimaryConfig {
    /// The settings of both roles.
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonConfig,
    /// Exits between register-digest checkpoints.
    #[arg(long, default_value_t = 10_000)]
    pub digest_interval: u64,
    /// Every how many checkpoints guest memory is digested too (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub mem_digest_every: u64,
    /// The CPU throttle.
    #[command(flatten)]
    #[serde(flatten)]
    pub throttle: ThrottleArgs,
    /// Without `--arbiter`, when the backup FAILS: `stop` with status 204 (held outputs are
    /// never released), or `go-alone-unprotected`: release them and run on with no backup and
    /// no failover (a backup without an arbiter never goes live, so this primary is then the
    /// only live copy). With an arbiter the primary always goes alone after winning the next
    /// generation.
    #[arg(long, value_enum, default_value = "stop", help_heading = "Lifecycle")]
    pub on_backup_failure: OnBackupFailure,
    /// The same as `--on-backup-failure go-alone-unprotected` (the older name).
    #[arg(long, help_heading = "Lifecycle")]
    pub go_alone_unprotected: bool,
    /// When the backup STOPS AS PLANNED (it said GOODBYE: `systemctl stop`, SIGTERM):
    /// `alone`: go on alone, serving without protection (what a backup host's maintenance
    /// needs: the service stays up); `stop`: stop too, with status 207. Safe without an
    /// arbiter: the backup promised not to go live.
    #[arg(long, value_enum, default_value = "alone", help_heading = "Lifecycle")]
    pub on_backup_stop: OnBackupStop,
    /// On SIGTERM/SIGINT (a planned stop): how long to wait, after the vCPU stopped, for the
    /// backup to acknowledge the log so that every held output is released before the GOODBYE
    /// (outputs still held then are dropped, never released).
    #[arg(long, default_value_t = 10_000, help_heading = "Lifecycle")]
    pub stop_timeout_ms: u64,
}

/// `ftvm backup`: the common settings and the backup's own.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[command(
    mut_arg("net", |a| a.help(
        "The guest's network device: `tap:IFNAME`. While replaying it has no backend (its \
         receives come from the log, its transmits are dropped); with --arbiter it is the \
         service TAP the backup attaches when it goes live: a persistent TAP \
         (`ip tuntap add IFNAME mode tap`) on the service network, with the same name the \
         primary uses when both run on one host")),
    mut_arg("heartbeat", |a| a.default_value(DEFAULT_BACKUP_HEARTBEAT)),
    mut_arg("peer_heartbeat", |a| a.default_value(DEFAULT_PRIMARY_HEARTBEAT)),
)]
pub struct BackupConfig {
    /// The settings of both roles.
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonConfig,
    /// When the primary STOPS AS PLANNED (it said GOODBYE): `stop` too, with status 207,
    /// without going live; or `take-over`: a handover (replay everything received, win the
    /// next generation, go live at once; needs `--arbiter`).
    #[arg(long, value_enum, default_value = "stop", help_heading = "Lifecycle")]
    pub on_primary_stop: OnPrimaryStop,
    /// Join a primary that runs alone (its `--accept-join` address) instead of starting from
    /// a guest image: the VM is cloned from the running one by live state transfer, then
    /// replays its log (no --guest or --peer; --disk names this side's copy, filled by the
    /// transfer, or the shared image with --shared-disk). Needs --arbiter.
    #[arg(long, value_name = "HOST:PORT", help_heading = "Re-protection")]
    pub join: Option<String>,
    /// With --join: ask the primary for its memory digest at the cut and refuse to pair if
    /// the cloned VM's differs (costs a digest of guest memory inside the pause).
    #[arg(long, help_heading = "Re-protection")]
    pub verify_cut: bool,
    /// The CPU throttle it runs once it went live and serves joins as a primary.
    #[command(flatten)]
    #[serde(flatten)]
    pub throttle: ThrottleArgs,
}

/// The failover settings of one side (with an arbiter), resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    /// The arbiter.
    pub arbiter: ArbiterSpec,
    /// This node's name on it.
    pub node: String,
    /// This side's heartbeat address.
    pub heartbeat: SocketAddr,
    /// The peer's.
    pub peer_heartbeat: SocketAddr,
    /// Failure-detection timeout.
    pub fail_timeout: Duration,
    /// The generation the pair starts in.
    pub generation: u64,
}

/// A role's configuration: [`PrimaryConfig`] or [`BackupConfig`].
pub trait RoleConfig: clap::Args + Serialize + DeserializeOwned {
    /// The role.
    const ROLE: Role;
    /// The settings of both roles.
    fn common(&self) -> &CommonConfig;
    /// The same, to change.
    fn common_mut(&mut self) -> &mut CommonConfig;
    /// Checks the settings that depend on each other (after the merge).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`], [`ConfigError::Missing`].
    fn validate(&self) -> Result<(), ConfigError>;
}

/// `primary` / `backup`.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Backup => "backup",
        Role::Alone => "alone",
    }
}

impl CommonConfig {
    /// The guest (required).
    ///
    /// # Errors
    /// [`ConfigError::Missing`].
    pub fn guest(&self) -> Result<&str, ConfigError> {
        self.guest.as_deref().ok_or(ConfigError::Missing("--guest"))
    }

    /// The peer (required).
    ///
    /// # Errors
    /// [`ConfigError::Missing`].
    pub fn peer(&self) -> Result<&str, ConfigError> {
        self.peer.as_deref().ok_or(ConfigError::Missing("--peer"))
    }

    /// The TAP of `--net`, if any.
    pub fn tap(&self) -> Option<String> {
        self.net.as_ref().map(|n| n.tap().to_string())
    }

    /// The log buffer's capacity.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when it does not fit in memory.
    pub fn log_capacity(&self) -> Result<usize, ConfigError> {
        usize::try_from(self.log_capacity.0).map_err(|_| {
            ConfigError::Invalid(format!("--log-capacity {}: too large", self.log_capacity))
        })
    }

    /// The failover settings (`None` without an arbiter); `role`'s default node name and
    /// heartbeat addresses where none were given.
    pub fn failover(&self, role: Role) -> Option<Failover> {
        let arbiter = self.arbiter.clone()?;
        let (me, peer) = match role {
            Role::Backup => (DEFAULT_BACKUP_HEARTBEAT, DEFAULT_PRIMARY_HEARTBEAT),
            _ => (DEFAULT_PRIMARY_HEARTBEAT, DEFAULT_BACKUP_HEARTBEAT),
        };
        let addr = |a: Option<SocketAddr>, d: &str| {
            a.unwrap_or_else(|| d.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))))
        };
        Some(Failover {
            arbiter,
            node: self
                .node
                .clone()
                .unwrap_or_else(|| role_name(role).to_string()),
            heartbeat: addr(self.heartbeat, me),
            peer_heartbeat: addr(self.peer_heartbeat, peer),
            fail_timeout: Duration::from_millis(self.fail_timeout),
            generation: self.generation,
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with(true)
    }

    /// As `validate`; `image`: whether this side starts from a guest image and a peer (a
    /// joining backup has neither).
    fn validate_with(&self, image: bool) -> Result<(), ConfigError> {
        if image {
            self.guest()?;
            self.peer()?;
        }
        let bad = |s: String| Err(ConfigError::Invalid(s));
        if self.accept_join.is_some() && self.arbiter.is_none() {
            return bad("--accept-join needs --arbiter (a join wins a new generation)".into());
        }
        if self.generation == 0 {
            return bad("--generation 0: generations start at 1".into());
        }
        if self.fail_timeout <= 20 {
            return bad(format!(
                "--fail-timeout {}: must exceed 20 ms (two heartbeat intervals)",
                self.fail_timeout
            ));
        }
        if self.shared_disk && self.disk.is_none() {
            return bad("--shared-disk needs --disk (the image both sides name)".into());
        }
        if !self.log_capacity.0.is_power_of_two() {
            return bad(format!(
                "--log-capacity {}: must be a power of two",
                self.log_capacity
            ));
        }
        Ok(())
    }
}

impl PrimaryConfig {
    /// What to do when the backup fails without an arbiter (`--go-alone-unprotected` is the
    /// older spelling of `--on-backup-failure go-alone-unprotected`).
    pub fn on_backup_failure(&self) -> PeerFailurePolicy {
        if self.go_alone_unprotected
            || self.on_backup_failure == OnBackupFailure::GoAloneUnprotected
        {
            PeerFailurePolicy::GoAloneUnprotected
        } else {
            PeerFailurePolicy::Stop
        }
    }

    /// What to do when the backup stops as planned.
    pub fn on_backup_stop(&self) -> BackupStopPolicy {
        match self.on_backup_stop {
            OnBackupStop::Alone => BackupStopPolicy::GoAlone,
            OnBackupStop::Stop => BackupStopPolicy::Stop,
        }
    }
}

impl RoleConfig for PrimaryConfig {
    const ROLE: Role = Role::Primary;
    fn common(&self) -> &CommonConfig {
        &self.common
    }
    fn common_mut(&mut self) -> &mut CommonConfig {
        &mut self.common
    }
    fn validate(&self) -> Result<(), ConfigError> {
        self.common.validate()?;
        self.throttle.validate()?;
        if self.on_backup_failure() == PeerFailurePolicy::GoAloneUnprotected
            && self.common.arbiter.is_some()
        {
            return Err(ConfigError::Invalid(
                "--on-backup-failure go-alone-unprotected (--go-alone-unprotected) applies to a \
                 primary without --arbiter only"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl BackupConfig {
    /// What to do when the primary stops as planned.
    pub fn primary_stop_policy(&self) -> PrimaryStopPolicy {
        match self.on_primary_stop {
            OnPrimaryStop::Stop => PrimaryStopPolicy::Stop,
            OnPrimaryStop::TakeOver => PrimaryStopPolicy::TakeOver,
        }
    }
}

impl RoleConfig for BackupConfig {
    const ROLE: Role = Role::Backup;
    fn common(&self) -> &CommonConfig {
        &self.common
    }
    fn common_mut(&mut self) -> &mut CommonConfig {
        &mut self.common
    }
    fn validate(&self) -> Result<(), ConfigError> {
        self.common.validate_with(self.join.is_none())?;
        self.throttle.validate()?;
        if self.join.is_some() && self.common.arbiter.is_none() {
            return Err(ConfigError::Invalid(
                "--join needs --arbiter (the joined pair runs in a new generation)".into(),
            ));
        }
        if self.on_primary_stop == OnPrimaryStop::TakeOver && self.common.arbiter.is_none() {
            return Err(ConfigError::Invalid(
                "--on-primary-stop take-over needs --arbiter (a backup never goes live without \
                 one)"
                    .into(),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// `cfg` as the TOML file that would configure it (`--print-config`).
///
/// # Errors
/// [`ConfigError::Invalid`] if it cannot be serialized.
pub fn to_toml<T: RoleConfig>(cfg: &T) -> Result<String, ConfigError> {
    toml::to_string(cfg)
        .map_err(|e| ConfigError::Invalid(format!("cannot print the configuration: {e}")))
}

/// The flag ids of a role's command (its TOML keys), without `config` and `help`.
fn keys<T: clap::Args>() -> Vec<String> {
    T::augment_args(clap::Command::new("keys"))
        .get_arguments()
        .map(|a| a.get_id().as_str().to_string())
        .filter(|k| !matches!(k.as_str(), "config" | "print_config" | "help"))
        .collect()
}

fn other_role_keys(role: Role) -> Vec<String> {
    match role {
        Role::Backup => keys::<PrimaryConfig>(),
        _ => keys::<BackupConfig>(),
    }
}

/// The configuration of a role from its parsed flags (`args`, and `matches`: the role's
/// subcommand matches, for which flags were given) and its `--config` file, then validated
/// (see the [module docs](self)).
///
/// # Errors
/// [`ConfigError`]: one line naming the file, key or flag.
pub fn load<T: RoleConfig>(args: T, matches: &ArgMatches) -> Result<T, ConfigError> {
    let merged = match args.common().config.clone() {
        None => args,
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            merge(args, matches, &path, &text)?
        }
    };
    merged.validate()?;
    Ok(merged)
}

/// `args` with the keys of the TOML `text` (file `path`) that no command-line flag overrides.
fn merge<T: RoleConfig>(
    args: T,
    matches: &ArgMatches,
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    let config = args.common().config.clone();
    let args_print = args.common().print_config;
    let file: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_path_buf(),
            line: e.span().map_or(1, |s| {
                text[..s.start.min(text.len())].lines().count().max(1)
            }),
            message: e.message().trim().replace('\n', " "),
        })?;
    let known = keys::<T>();
    let mut table = toml::Table::try_from(&args).map_err(|e| {
        ConfigError::Invalid(format!(
            "cannot serialize the flags: {}",
            e.to_string().trim()
        ))
    })?;
    for (key, value) in file {
        if !known.contains(&key) {
            let other = match T::ROLE {
                Role::Backup => "primary",
                _ => "backup",
            };
            let hint = if other_role_keys(T::ROLE).contains(&key) {
                format!(" (a setting of ftvm {other} only)")
            } else if known.contains(&key.replace('-', "_")) {
                format!(" (keys use `_`: `{}`)", key.replace('-', "_"))
            } else {
                String::new()
            };
            return Err(ConfigError::UnknownKey {
                path: path.to_path_buf(),
                key,
                hint,
            });
        }
        if matches.value_source(&key) == Some(ValueSource::CommandLine) {
            continue;
        }
        table.insert(key.clone(), value.clone());
        // Each key on its own, so that a refusal names it.
        if let Err(e) = toml::Value::Table(table.clone()).try_into::<T>() {
            return Err(ConfigError::BadValue {
                path: path.to_path_buf(),
                key,
                value: value.to_string(),
                message: e.message().trim().replace('\n', " "),
            });
        }
    }
    let mut merged: T = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().trim().to_string()))?;
    // `config` and `print_config` are no keys of the file's form: put them back.
    merged.common_mut().config = config;
    merged.common_mut().print_config = args_print;
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{FromArgMatches, Parser};

    #[derive(Debug, Parser)]
    struct P {
        #[command(flatten)]
        c: PrimaryConfig,
    }
    #[derive(Debug, Parser)]
    struct B {
        #[command(flatten)]
        c: BackupConfig,
    }

    fn primary(flags: &[&str], toml: &str) -> Result<PrimaryConfig, ConfigError> {
        let m = <P as clap::CommandFactory>::command()
            .try_get_matches_from(std::iter::once("p").chain(flags.iter().copied()))
            .expect("flags parse");
        let p = P::from_arg_matches(&m).expect("from matches");
        merge(p.c, &m, Path::new("p.toml"), toml).and_then(|c| c.validate().map(|()| c))
    }

    fn backup(flags: &[&str], toml: &str) -> Result<BackupConfig, ConfigError> {
        let m = <B as clap::CommandFactory>::command()
            .try_get_matches_from(std::iter::once("b").chain(flags.iter().copied()))
            .expect("flags parse");
        let b = B::from_arg_matches(&m).expect("from matches");
        merge(b.c, &m, Path::new("b.toml"), toml).and_then(|c| c.validate().map(|()| c))
    }

    #[test]
    fn flags_override_the_file_which_overrides_the_defaults() {
        let c = primary(
            &["--peer", "10.0.0.2:7000", "--fail-timeout", "300"],
            "guest = \"kv\"\npeer = \"h:1\"\nfail_timeout = 500\nmem = \"128M\"\n\
             transport = \"uring\"\nshared_disk = true\ndisk = \"/x.img\"\n\
             throttle_cgroup = \"none\"\nlog_capacity = 1048576\n",
        )
        .expect("valid");
        assert_eq!(c.common.guest.as_deref(), Some("kv"));
        assert_eq!(c.common.peer.as_deref(), Some("10.0.0.2:7000"), "flag wins");
        assert_eq!(c.common.fail_timeout, 300, "flag wins");
        assert_eq!(c.common.mem, Size(128 << 20), "file beats default");
        assert_eq!(c.common.transport, Transport::Uring);
        assert!(c.common.shared_disk);
        assert_eq!(c.throttle.throttle_cgroup, CgroupSpec::None);
        assert_eq!(c.common.log_capacity, Size(1 << 20));
        assert_eq!(
            c.throttle.throttle_target_ms, DEFAULT_THROTTLE_TARGET_MS,
            "default"
        );
        assert_eq!(c.common.idle, Idle::Park, "default");
        assert_eq!(c.on_backup_stop, OnBackupStop::Alone, "default");
        let f = primary(
            &[
                "--guest",
                "cpu",
                "--peer",
                "h:1",
                "--arbiter",
                "etcd://h:2379",
            ],
            "",
        )
        .expect("valid")
        .common
        .failover(Role::Primary)
        .expect("failover");
        assert_eq!(f.heartbeat.to_string(), DEFAULT_PRIMARY_HEARTBEAT);
        assert_eq!(f.peer_heartbeat.to_string(), DEFAULT_BACKUP_HEARTBEAT);
        assert_eq!(f.node, "primary");
        assert_eq!(f.arbiter.to_string(), "etcd:http://h:2379");
        let b = backup(
            &[
                "--guest",
                "cpu",
                "--peer",
                "h:1",
                "--arbiter",
                "etcd://h:2379",
            ],
            "",
        )
        .expect("valid")
        .common
        .failover(Role::Backup)
        .expect("failover");
        assert_eq!(b.heartbeat, f.peer_heartbeat);
        assert_eq!(b.peer_heartbeat, f.heartbeat);
    }

    #[test]
    fn unknown_and_other_role_keys_are_refused_naming_the_key() {
        let e = primary(&[], "guest = \"kv\"\nfrobnicate = 1\n").expect_err("unknown");
        assert_eq!(e.to_string(), "config p.toml: unknown key `frobnicate`");
        let e = primary(&[], "fail-timeout = 1\n").expect_err("dashes");
        assert!(
            e.to_string().contains("keys use `_`: `fail_timeout`"),
            "{e}"
        );
        let e = backup(&[], "digest_interval = 5\n").expect_err("primary's key");
        assert_eq!(
            e.to_string(),
            "config b.toml: unknown key `digest_interval` (a setting of ftvm primary only)"
        );
        let e = primary(&[], "on_primary_stop = \"stop\"\n").expect_err("backup's key");
        assert!(e.to_string().contains("ftvm backup only"), "{e}");
        let e = primary(&[], "config = \"x.toml\"\n").expect_err("no nesting");
        assert!(e.to_string().contains("unknown key `config`"), "{e}");
        let e = primary(&[], "guest = [1\n").expect_err("syntax");
        assert!(e.to_string().starts_with("config p.toml: line 1: "), "{e}");
    }

    #[test]
    fn a_backup_takes_the_throttle_settings_it_applies_once_live() {
        let base = "guest = \"kv\"\npeer = \"h:1\"\n";
        let b = backup(
            &["--throttle-min-share", "0.2"],
            &format!("{base}throttle_target_ms = 40\nthrottle_cgroup = \"none\"\n"),
        )
        .expect("valid");
        let cfg = b.throttle.config().expect("on");
        assert_eq!(cfg.target, Duration::from_millis(40));
        assert_eq!(cfg.pi.min_share, 0.2);
        assert_eq!(cfg.cgroup, CgroupPlace::Off);
        let off = backup(&[], &format!("{base}throttle_target_ms = 0\n")).expect("valid");
        assert!(off.throttle.config().is_none());
        let e = backup(
            &[],
            &format!("{base}throttle_cgroup = \"/no/such/cgroup\"\n"),
        )
        .expect_err("bad dir");
        assert!(e.to_string().contains("`throttle_cgroup` = "), "{e}");
    }

    #[test]
    fn each_typed_value_is_refused_with_one_line_naming_its_key() {
        let base = "guest = \"kv\"\npeer = \"h:1\"\n";
        for (line, key) in [
            ("transport = \"carrier-pigeon\"", "transport"),
            ("idle = \"nap\"", "idle"),
            ("poll_idle = 3", "poll_idle"),
            ("arbiter = \"zookeeper://h:1\"", "arbiter"),
            ("arbiter = \"file:/no/such/ftvm/dir\"", "arbiter"),
            ("net = \"eth0\"", "net"),
            ("throttle_cgroup = \"/no/such/cgroup\"", "throttle_cgroup"),
            ("on_backup_failure = \"panic\"", "on_backup_failure"),
            ("on_backup_stop = \"maybe\"", "on_backup_stop"),
            ("mem = \"lots\"", "mem"),
            ("heartbeat = \"localhost\"", "heartbeat"),
            ("shared_disk = \"yes\"", "shared_disk"),
            ("fail_timeout = -1", "fail_timeout"),
        ] {
            let e = primary(&[], &format!("{base}{line}\n")).expect_err(line);
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("config p.toml: `{key}` = ")),
                "{line}: {text}"
            );
            assert!(!text.contains('\n'), "{line}: not one line: {text}");
        }
        let e = backup(&[], &format!("{base}on_primary_stop = \"panic\"\n")).expect_err("bad");
        assert!(
            e.to_string().contains("`on_primary_stop` = \"panic\""),
            "{e}"
        );
        assert!(e.to_string().contains("take-over"), "{e}");
    }

    #[test]
    fn settings_that_do_not_go_together_are_refused() {
        fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
            let mut v = vec!["--guest", "cpu", "--peer", "h:1"];
            v.extend_from_slice(extra);
            v
        }
        assert!(matches!(
            primary(&["--peer", "h:1"], ""),
            Err(ConfigError::Missing("--guest"))
        ));
        for extra in [
            &["--generation", "0"][..],
            &["--fail-timeout", "20"],
            &["--shared-disk"],
            &["--log-capacity", "3M"],
            &["--throttle-min-share", "0"],
        ] {
            assert!(primary(&with(extra), "").is_err(), "{extra:?} accepted");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let arb = format!("file:{}", dir.path().display());
        assert!(primary(&with(&["--arbiter", &arb, "--go-alone-unprotected"]), "").is_err());
        assert!(backup(&with(&["--on-primary-stop", "take-over"]), "").is_err());
        assert!(backup(
            &with(&["--on-primary-stop", "take-over", "--arbiter", &arb]),
            ""
        )
        .is_ok());
        // The throttle's settings are checked on the backup too (it applies them once live).
        assert!(backup(&with(&["--throttle-min-share", "1.5"]), "").is_err());
        let c = primary(&with(&["--go-alone-unprotected"]), "").expect("alias");
        assert_eq!(c.on_backup_failure(), PeerFailurePolicy::GoAloneUnprotected);
    }

    #[test]
    fn help_lists_each_role_its_own_flags_with_defaults() {
        let help = |mut c: clap::Command| c.render_long_help().to_string();
        let p = help(<P as clap::CommandFactory>::command());
        let b = help(<B as clap::CommandFactory>::command());
        for own in [
            "--go-alone-unprotected",
            "--on-backup-stop",
            "--digest-interval",
        ] {
            assert!(p.contains(own) && !b.contains(own), "{own}");
        }
        assert!(b.contains("--on-primary-stop") && !p.contains("--on-primary-stop"));
        for both in [
            "--throttle-target-ms",
            "--throttle-min-share",
            "--throttle-cgroup",
        ] {
            assert!(p.contains(both) && b.contains(both), "{both}");
        }
        assert!(b.contains("once it went live"), "{b}");
        assert!(
            p.contains(&format!("[default: {DEFAULT_PRIMARY_HEARTBEAT}]")),
            "{p}"
        );
        assert!(
            b.contains(&format!("[default: {DEFAULT_BACKUP_HEARTBEAT}]")),
            "{b}"
        );
        assert!(p.contains("transmits are outputs") && b.contains("service TAP"));
    }
}
