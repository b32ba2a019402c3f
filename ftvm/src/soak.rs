//! Soak: the demo's load on a fault-tolerant `kv` pair for minutes, watching the memory of both
//! `ftvm` processes and of the guest. Shared by `ftvm-bench soak` (minutes, a plot) and the
//! bounded CI test `ftvm/tests/soak.rs` (about a minute, asserted bounds).
//!
//! ```text
//! phase    boot ── fill ──────────────────────── flush ── load ────────────────────────── check
//! client   PING    SET soak:fill:<i> <64 KiB>     FLUSHALL  the demo's clients: SET demo:t:n  GET every
//!                  until the store answers -OOM             (+OK acked; -OOM once full again) acked key
//! sample   every second: VmRSS of both processes (/proc/<pid>/status), INFO memory of the guest
//!                                                           ├ warm-up ┼─── window (last 80 %) ──┤
//! ```
//!
//! Why the fill: a process's RSS grows while the guest touches its RAM for the first time (the
//! guest's memory is an anonymous mapping of the VMM). Filling the store until `kv` refuses a
//! write (`maxmemory`, `ftvm_guest_kv::memory` in `guests/`) touches the heap on both sides —
//! the backup replays the same writes — and pushes the guest's memory size through the log
//! (rings, shared-memory transport, output queues). After that, nothing in either process has a
//! reason to grow: the load writes into memory already touched, and every buffer of the pair is
//! bounded. The window starts after the warm-up ([`warmup`]: a fifth of the load, and not before
//! the shm transport's acknowledgement ring, which fills slowly, is touched through). So the
//! slope of each RSS over the window (least squares, KiB per minute) measures a leak; the fill
//! also proves that a full store answers `-OOM` and keeps serving.
//!
//! Measured (`ftvm-bench soak`, 64 MiB, 300 s): +62 / +84 KiB/min, the last of it the refill
//! touching a few guest pages the fill had not, then flat to the KiB through 416 k `-OOM`
//! replies.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{is_oom, Checker, ClientError, Load, LoadConfig, LoadStats, Reply, RespConn};
use crate::scenario::{Scenario, ScenarioConfig, ScenarioError, Side};

/// A failure of the soak run (a leak is not a failure here: it is in the report).
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    /// The pair could not be set up.
    #[error("scenario")]
    Scenario(#[from] ScenarioError),
    /// The guest could not be asked (fill, INFO, read-back).
    #[error("client")]
    Client(#[from] ClientError),
    /// A side exited during the run.
    #[error("the {side} exited during the soak ({status})\n{stderr}")]
    Exited {
        /// `primary` / `backup`.
        side: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Both sides' stderr.
        stderr: String,
    },
    /// The fill never got `-OOM`: the store took more than the guest's memory.
    #[error("the store accepted {values} values of {bytes} bytes without answering -OOM")]
    NeverFull {
        /// Values written.
        values: u64,
        /// Bytes of each.
        bytes: usize,
    },
    /// The guest answered something unexpected.
    #[error("{command} answered {reply:?}")]
    Reply {
        /// The command.
        command: &'static str,
        /// Its reply.
        reply: Reply,
    },
    /// The guest memory size does not parse.
    #[error("bad --mem {0:?}")]
    Mem(String),
}

/// Settings of a soak run.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// The pair (transport, memory, disks ...).
    pub scenario: ScenarioConfig,
    /// How long the demo's load runs after the fill.
    pub load_for: Duration,
    /// Client threads of the load.
    pub clients: usize,
    /// Sampling period.
    pub sample_every: Duration,
    /// Bytes of each value of the fill.
    pub fill_value: usize,
    /// Fraction of the load phase treated as warm-up at least (not in the window; see
    /// [`warmup`]).
    pub warmup_fraction: f64,
}

impl SoakConfig {
    /// Defaults: the demo's pair (shm transport, file arbiter, 64 MiB guests) with 512 MiB
    /// disks (the fill logs the guest's memory size), 5 minutes of load by 4 clients, a sample
    /// per second, 64 KiB fill values, a warm-up of 20 %.
    pub fn new(ftvm: PathBuf, tag: &str) -> Self {
        let mut scenario = ScenarioConfig::new(ftvm, tag);
        scenario.disk_size = 512 << 20;
        SoakConfig {
            scenario,
            load_for: Duration::from_secs(300),
            clients: 4,
            sample_every: Duration::from_secs(1),
            fill_value: 64 << 10,
            warmup_fraction: 0.2,
        }
    }
}

/// Resident memory of one process (`/proc/<pid>/status`), KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Rss {
    /// `VmRSS`: all resident pages.
    pub vm_rss_kib: u64,
    /// `RssAnon`: anonymous pages (heap, the guest's RAM).
    pub rss_anon_kib: u64,
    /// `RssFile`: mapped files.
    pub rss_file_kib: u64,
    /// `RssShmem`: shared memory (the shm transport's rings).
    pub rss_shmem_kib: u64,
}

impl Rss {
    /// Reads `/proc/<pid>/status`; `None` when the process is gone.
    pub fn of(pid: u32) -> Option<Rss> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse().ok())
        };
        Some(Rss {
            vm_rss_kib: field("VmRSS:")?,
            rss_anon_kib: field("RssAnon:").unwrap_or(0),
            rss_file_kib: field("RssFile:").unwrap_or(0),
            rss_shmem_kib: field("RssShmem:").unwrap_or(0),
        })
    }
}

/// One sample.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the load started (negative during the fill).
    pub t_s: f64,
    /// `fill` or `load`.
    pub phase: &'static str,
    /// The primary's memory.
    pub primary: Rss,
    /// The backup's memory.
    pub backup: Rss,
    /// The guest's `used_memory` (INFO memory), bytes.
    pub guest_used_memory: Option<u64>,
    /// The guest's keys (INFO keyspace).
    pub guest_keys: Option<u64>,
    /// Acknowledged writes of the load so far.
    pub acked: u64,
    /// `-OOM` replies of the load so far.
    pub oom: u64,
}

/// How a series behaved over the window (after the warm-up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Trend {
    /// First value in the window.
    pub first: f64,
    /// Last value in the window.
    pub last: f64,
    /// Smallest value in the window.
    pub min: f64,
    /// Largest value in the window.
    pub max: f64,
    /// Least-squares slope over the window, per minute.
    pub slope_per_min: f64,
}

impl Trend {
    /// The trend of `(t_s, value)` points; `None` with fewer than 2 points.
    pub fn of(points: &[(f64, f64)]) -> Option<Trend> {
        if points.len() < 2 {
            return None;
        }
        let n = points.len() as f64;
        let mt = points.iter().map(|p| p.0).sum::<f64>() / n;
        let mv = points.iter().map(|p| p.1).sum::<f64>() / n;
        let cov: f64 = points.iter().map(|p| (p.0 - mt) * (p.1 - mv)).sum();
        let var: f64 = points.iter().map(|p| (p.0 - mt).powi(2)).sum();
        let slope = if var > 0.0 { cov / var } else { 0.0 };
        Some(Trend {
            first: points[0].1,
            last: points[points.len() - 1].1,
            min: points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min),
            max: points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max),
            slope_per_min: slope * 60.0,
        })
    }
}

/// What the fill did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FillReport {
    /// Values stored before the first `-OOM`.
    pub values: u64,
    /// Bytes of each value.
    pub value_bytes: usize,
    /// Seconds the fill took.
    pub seconds: f64,
    /// The first `-OOM` reply.
    pub oom_reply: String,
    /// INFO memory when full: `used_memory`.
    pub used_memory: u64,
    /// INFO memory: `maxmemory`.
    pub maxmemory: u64,
    /// Keys when full, and after `FLUSHALL` (0).
    pub keys_when_full: u64,
}

/// The result of a soak run.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// Guest memory (`--mem`).
    pub mem: String,
    /// Transport of the log.
    pub transport: String,
    /// Client threads.
    pub clients: usize,
    /// Seconds of load.
    pub load_s: f64,
    /// Seconds of load before the window ([`warmup`]).
    pub warmup_s: f64,
    /// Seconds of load in the window.
    pub window_s: f64,
    /// The fill.
    pub fill: FillReport,
    /// The primary's VmRSS (KiB) over the window.
    pub primary_rss_kib: Trend,
    /// The backup's VmRSS (KiB) over the window.
    pub backup_rss_kib: Trend,
    /// The guest's `used_memory` (bytes) over the window.
    pub guest_used_memory: Trend,
    /// Largest VmRSS of the primary over the whole run, KiB.
    pub primary_rss_max_kib: u64,
    /// Largest VmRSS of the backup over the whole run, KiB.
    pub backup_rss_max_kib: u64,
    /// Acknowledged writes of the load.
    pub acked_writes: u64,
    /// Writes of the load answered `-OOM`.
    pub oom_replies: u64,
    /// Client errors of the load (connection failures, timeouts, other error replies).
    pub client_errors: u64,
    /// The last client error, if any.
    pub last_client_error: Option<String>,
    /// Acknowledged writes read back at the end.
    pub acked_writes_checked: u64,
    /// Of those, missing or different (must be 0).
    pub acked_writes_lost: u64,
    /// Exit codes of the primary and the backup after `SHUTDOWN` (`None`: still running after
    /// [`EXIT_WAIT`], then killed).
    pub exit_codes: [Option<i32>; 2],
    /// Seconds from `SHUTDOWN` to each exit. The backup exits once it has replayed the
    /// power-off: as late as its lag (up to a full log buffer) when it ran behind.
    pub exit_s: [Option<f64>; 2],
    /// Every sample.
    pub samples: Vec<Sample>,
}

/// How long each side is given to exit after `SHUTDOWN`.
pub const EXIT_WAIT: Duration = Duration::from_secs(20);

/// Where the window starts, in seconds of load: after `min_s`, and after the shared memory of
/// both processes stopped growing (the shm transport's fixed rings are touched for the first
/// time as they fill: the acknowledgement ring takes a while). Shared memory that grows until
/// the end leaves no window ([`SoakReport::window_s`] 0), which a test can refuse.
pub fn warmup(samples: &[Sample], min_s: f64) -> f64 {
    let load: Vec<&Sample> = samples.iter().filter(|x| x.phase == "load").collect();
    let Some(last) = load.last() else {
        return min_s;
    };
    let settled = load
        .iter()
        .find(|x| {
            x.primary.rss_shmem_kib >= last.primary.rss_shmem_kib
                && x.backup.rss_shmem_kib >= last.backup.rss_shmem_kib
        })
        .map_or(last.t_s, |x| x.t_s);
    settled.max(min_s)
}

/// Parses an `INFO` reply's `key:value` lines (`db0:keys=N,...` gives `db0`).
pub fn parse_info(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// `INFO` over `conn`, parsed.
fn info(conn: &mut RespConn) -> Result<std::collections::BTreeMap<String, String>, SoakError> {
    match conn.command(&[b"INFO"])? {
        Reply::Bulk(Some(b)) => Ok(parse_info(&String::from_utf8_lossy(&b))),
        reply => Err(SoakError::Reply {
            command: "INFO",
            reply,
        }),
    }
}

fn number(info: &std::collections::BTreeMap<String, String>, key: &str) -> Option<u64> {
    info.get(key)?.parse().ok()
}

fn keys(info: &std::collections::BTreeMap<String, String>) -> Option<u64> {
    info.get("db0")?
        .split(',')
        .find_map(|kv| kv.strip_prefix("keys="))?
        .parse()
        .ok()
}

/// Takes samples and watches that both sides stay up.
struct Sampler {
    pids: [u32; 2],
    info: RespConn,
    every: Duration,
    next: Instant,
    /// Times are taken from here (then shifted so that the load starts at 0).
    t0: Instant,
    samples: Vec<Sample>,
}

impl Sampler {
    /// Samples if a period has passed; fails if a side has exited.
    fn tick(
        &mut self,
        s: &mut Scenario,
        phase: &'static str,
        load: Option<&LoadStats>,
        show: &mut dyn FnMut(&Sample),
    ) -> Result<(), SoakError> {
        let exited = [("primary", &mut s.primary), ("backup", &mut s.backup)]
            .into_iter()
            .find_map(|(side, n)| Some((side, n.as_mut()?.try_status()?)));
        if let Some((side, status)) = exited {
            return Err(SoakError::Exited {
                side,
                status,
                stderr: s.stderr_of_both(),
            });
        }
        let now = Instant::now();
        if now < self.next {
            return Ok(());
        }
        self.next += self.every;
        let info = info(&mut self.info)?;
        let sample = Sample {
            t_s: now.duration_since(self.t0).as_secs_f64(),
            phase,
            primary: Rss::of(self.pids[0]).unwrap_or_default(),
            backup: Rss::of(self.pids[1]).unwrap_or_default(),
            guest_used_memory: number(&info, "used_memory"),
            guest_keys: keys(&info),
            acked: load.map_or(0, |l| l.ops),
            oom: load.map_or(0, |l| l.oom),
        };
        show(&sample);
        self.samples.push(sample);
        Ok(())
    }
}

/// Runs the soak: see the [module docs](self). `show` sees every sample as it is taken.
///
/// # Errors
/// [`SoakError`]: setup, a side exiting, the fill never answered `-OOM`, the guest unreachable.
pub fn run(cfg: &SoakConfig, show: &mut dyn FnMut(&Sample)) -> Result<SoakReport, SoakError> {
    let mem = cfg.scenario.mem.clone();
    let mem_bytes = crate::parse_size(&mem).map_err(|_| SoakError::Mem(mem.clone()))?;
    let mut s = Scenario::start(cfg.scenario.clone())?;
    let pid = |n: &Option<crate::scenario::Node>| n.as_ref().map_or(0, |n| n.pid());
    let connect = || RespConn::connect(Scenario::guest_addr(), Duration::from_secs(10));
    let mut sampler = Sampler {
        pids: [pid(&s.primary), pid(&s.backup)],
        info: s.in_netns(connect)??,
        every: cfg.sample_every,
        next: Instant::now(),
        t0: Instant::now(),
        samples: Vec::new(),
    };

    // Fill until -OOM, sampling in between.
    let mut fill = FillReport {
        value_bytes: cfg.fill_value,
        ..FillReport::default()
    };
    let mut conn = s.in_netns(connect)??;
    let value = vec![b'f'; cfg.fill_value];
    let limit = 2 * mem_bytes / cfg.fill_value as u64 + 16;
    let t_fill = Instant::now();
    loop {
        sampler.tick(&mut s, "fill", None, show)?;
        let key = format!("soak:fill:{}", fill.values);
        match conn.command(&[b"SET", key.as_bytes(), &value])? {
            Reply::Simple(r) if r == "OK" => fill.values += 1,
            Reply::Error(e) if is_oom(&e) => {
                fill.oom_reply = e;
                break;
            }
            reply => {
                return Err(SoakError::Reply {
                    command: "SET",
                    reply,
                })
            }
        }
        if fill.values >= limit {
            return Err(SoakError::NeverFull {
                values: fill.values,
                bytes: cfg.fill_value,
            });
        }
    }
    fill.seconds = t_fill.elapsed().as_secs_f64();
    let full = info(&mut conn)?;
    fill.used_memory = number(&full, "used_memory").unwrap_or(0);
    fill.maxmemory = number(&full, "maxmemory").unwrap_or(0);
    fill.keys_when_full = keys(&full).unwrap_or(0);
    match conn.command(&[b"FLUSHALL"])? {
        Reply::Simple(r) if r == "OK" => {}
        reply => {
            return Err(SoakError::Reply {
                command: "FLUSHALL",
                reply,
            })
        }
    }
    drop(conn);

    // The demo's load.
    let checker = Arc::new(Checker::default());
    let mut load = Load::start(
        &LoadConfig {
            netns: Some(s.netns().name().to_string()),
            addr: Scenario::guest_addr(),
            threads: cfg.clients.max(1),
            timeout: Duration::from_secs(5),
            prefix: "soak".into(),
        },
        checker.clone(),
    )?;
    let load_start = Instant::now();
    let end = load_start + cfg.load_for;
    while Instant::now() < end {
        sampler.tick(&mut s, "load", Some(&load.stats()), show)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let last_client_error = load.last_error();
    let stats = load.stop();
    sampler.next = Instant::now();
    sampler.tick(&mut s, "load", Some(&stats), show)?;
    let load_s = load_start.elapsed().as_secs_f64();
    let shift = load_start.duration_since(sampler.t0).as_secs_f64();
    for x in &mut sampler.samples {
        x.t_s -= shift;
    }

    let check = s.in_netns(|| -> Result<_, ClientError> { checker.verify(&mut connect()?) })??;
    drop(sampler.info);
    s.shutdown_guest();
    let t_shutdown = Instant::now();
    let mut exit_codes = [None, None];
    let mut exit_s = [None, None];
    for ((code, secs), node) in exit_codes
        .iter_mut()
        .zip(&mut exit_s)
        .zip([&mut s.primary, &mut s.backup])
    {
        if let Some(n) = node.as_mut() {
            *code = n.wait_exit(EXIT_WAIT).and_then(|st| st.code());
            *secs = code.map(|_| t_shutdown.elapsed().as_secs_f64());
        }
    }

    let warmup_s = warmup(&sampler.samples, load_s * cfg.warmup_fraction);
    let window: Vec<&Sample> = sampler
        .samples
        .iter()
        .filter(|x| x.phase == "load" && x.t_s >= warmup_s)
        .collect();
    let trend = |f: &dyn Fn(&Sample) -> Option<f64>| {
        let points: Vec<(f64, f64)> = window.iter().filter_map(|x| Some((x.t_s, f(x)?))).collect();
        Trend::of(&points).unwrap_or_default()
    };
    let max = |side: Side| {
        sampler
            .samples
            .iter()
            .map(|x| match side {
                Side::Primary => x.primary.vm_rss_kib,
                Side::Backup => x.backup.vm_rss_kib,
            })
            .max()
            .unwrap_or(0)
    };
    Ok(SoakReport {
        mem,
        transport: cfg.scenario.transport.clone(),
        clients: cfg.clients,
        load_s,
        warmup_s,
        window_s: load_s - warmup_s,
        fill,
        primary_rss_kib: trend(&|x| Some(x.primary.vm_rss_kib as f64)),
        backup_rss_kib: trend(&|x| Some(x.backup.vm_rss_kib as f64)),
        guest_used_memory: trend(&|x| x.guest_used_memory.map(|v| v as f64)),
        primary_rss_max_kib: max(Side::Primary),
        backup_rss_max_kib: max(Side::Backup),
        acked_writes: stats.ops,
        oom_replies: stats.oom,
        client_errors: stats.errors,
        last_client_error,
        acked_writes_checked: check.checked,
        acked_writes_lost: check.lost,
        exit_codes,
        exit_s,
        samples: sampler.samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trend_is_the_least_squares_slope() {
        let flat: Vec<(f64, f64)> = (0..60).map(|t| (t as f64, 1000.0)).collect();
        assert_eq!(Trend::of(&flat).unwrap().slope_per_min, 0.0);
        // 1 MiB per minute, with ±64 KiB of alternating noise.
        let leak: Vec<(f64, f64)> = (0..60)
            .map(|t| {
                let noise = if t % 2 == 0 { 64.0 } else { -64.0 };
                (t as f64, 5000.0 + t as f64 * 1024.0 / 60.0 + noise)
            })
            .collect();
        let tr = Trend::of(&leak).unwrap();
        assert!((tr.slope_per_min - 1024.0).abs() < 10.0, "{tr:?}");
        assert_eq!(tr.min, 5000.0 - 64.0 + 1024.0 / 60.0);
        assert!(Trend::of(&flat[..1]).is_none());
    }

    fn sample(t_s: f64, shmem: [u64; 2]) -> Sample {
        let rss = |k| Rss {
            rss_shmem_kib: k,
            ..Rss::default()
        };
        Sample {
            t_s,
            phase: "load",
            primary: rss(shmem[0]),
            backup: rss(shmem[1]),
            guest_used_memory: None,
            guest_keys: None,
            acked: 0,
            oom: 0,
        }
    }

    #[test]
    fn warmup_waits_for_the_shared_memory_to_settle() {
        let s: Vec<Sample> = (0..10)
            .map(|t| sample(t as f64, [(t as u64).min(4), (t as u64).min(6)]))
            .collect();
        assert_eq!(warmup(&s, 2.0), 6.0, "the backup's rings settle at 6 s");
        assert_eq!(warmup(&s, 8.0), 8.0);
        let growing: Vec<Sample> = (0..10).map(|t| sample(t as f64, [t, 0])).collect();
        assert_eq!(warmup(&growing, 2.0), 9.0, "no window while it grows");
        assert_eq!(warmup(&[], 2.0), 2.0);
    }

    #[test]
    fn info_lines_parse() {
        let i = parse_info(
            "# Memory\r\nused_memory:123\r\nmaxmemory:456\r\n\r\n# Keyspace\r\n\
             db0:keys=7,expires=0,avg_ttl=0\r\n",
        );
        assert_eq!(number(&i, "used_memory"), Some(123));
        assert_eq!(number(&i, "maxmemory"), Some(456));
        assert_eq!(keys(&i), Some(7));
    }

    #[test]
    fn rss_of_this_process() {
        let r = Rss::of(std::process::id()).expect("/proc/self/status");
        assert!(r.vm_rss_kib > 0 && r.vm_rss_kib >= r.rss_anon_kib, "{r:?}");
        assert!(Rss::of(u32::MAX).is_none());
    }
}
