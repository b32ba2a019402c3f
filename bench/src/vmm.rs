//! `vmm`: what a VM exit costs, by kind, and what the `kv` guest serves through a TAP.
//!
//! - Exit cost: hand-assembled guests run a loop of `N` identical MMIO accesses (system device
//!   MAGIC read, CLOCK_NS read, DEBUG write, WAIT read returning at once, virtio QueueNotify);
//!   cost = (run time − run time of an empty guest) / N, median of several runs. The peer figure
//!   in the same run is a host `getpid(2)` system call (`std::process::id`).
//! - `kv`: the `kv` guest on a TAP device in a fresh network namespace (disk on a temporary
//!   image), driven by `redis-benchmark -c 50 -t set,get` from inside the namespace.
//!
//! Needs /dev/kvm; the `kv` part also needs root and redis-tools (skipped with a note if not).
//! Output: `results/vmm.json`, `results/vmm.svg`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ftvm_channel::netns::Netns;
use ftvm_testkit::{Asm, Reg};
use ftvm_vmm_core::devices::sys::{REG_CLOCK_NS, REG_DEBUG, REG_MAGIC, REG_WAIT};
use ftvm_vmm_core::devices::ConsoleOutput;
use ftvm_vmm_core::vm::{RunOutcome, Vm, VmConfig};
use serde::Serialize;

use crate::report::{self, Panel, Series};
use crate::Opts;

/// One row of `results/vmm.json`.
#[derive(Debug, Clone, Serialize)]
struct Row {
    /// Exits per measurement loop.
    exit_loop_iterations: u32,
    /// Nanoseconds per exit, by kind.
    exit_ns: BTreeMap<String, f64>,
    /// Peer: one host system call (getpid), ns.
    host_syscall_ns: f64,
    /// Ratio of a system-device read exit to a host syscall.
    sys_read_exit_vs_syscall: f64,
    /// redis-benchmark requests per run.
    kv_requests: u64,
    /// Concurrent clients.
    kv_clients: u32,
    /// SET requests/s (None when the kv part was skipped).
    kv_set_ops_per_s: Option<f64>,
    /// GET requests/s.
    kv_get_ops_per_s: Option<f64>,
    /// Exits the kv VM took per request (SET+GET run), from its exit counter.
    kv_exits_per_request: Option<f64>,
    /// Why the kv part was skipped, if it was.
    kv_skipped: Option<String>,
}

fn run_guest(elf: &[u8]) -> anyhow::Result<Duration> {
    let cfg = VmConfig {
        mem_size: 4 << 20,
        console: ConsoleOutput::Null,
        ..Default::default()
    };
    let mut vm = Vm::new(&cfg, elf)?;
    let t = Instant::now();
    let r = vm.run()?;
    let dt = t.elapsed();
    if r != RunOutcome::PoweredOff(0) {
        bail!("benchmark guest ended with {r:?}");
    }
    Ok(dt)
}

fn exit_cost(n: u32, reps: usize, body: Body) -> anyhow::Result<f64> {
    let empty = Asm::new().power_off(0).elf();
    let prog = Asm::new()
        .store_imm(REG_WAIT_DEADLINE_OFF, 0)
        .repeat(n, body)
        .power_off(0)
        .elf();
    let mut samples = Vec::new();
    for _ in 0..reps {
        let base = run_guest(&empty)?;
        let full = run_guest(&prog)?;
        samples.push(full.saturating_sub(base).as_nanos() as f64 / f64::from(n));
    }
    Ok(report::median(&mut samples))
}

const REG_WAIT_DEADLINE_OFF: u8 = 0x20;

fn syscall_ns() -> f64 {
    let n = 200_000;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(std::process::id());
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

struct KvResult {
    set: f64,
    get: f64,
    exits_per_request: f64,
}

fn parse_rps(csv: &str, test: &str) -> Option<f64> {
    csv.lines().find_map(|l| {
        let mut f = l.split(',').map(|c| c.trim_matches('"'));
        (f.next()? == test)
            .then(|| f.next()?.parse().ok())
            .flatten()
    })
}

fn kv_bench(requests: u64, clients: u32) -> anyhow::Result<KvResult> {
    ftvm_channel::netns::require_root().map_err(|r| anyhow!(r))?;
    std::process::Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .context("redis-benchmark not installed (Debian redis-tools)")?;
    let ns = Netns::create(&format!("ftvm-bench-vmm-{}", std::process::id()))?;
    ns.add_tap("ftvmtap0", Some((Ipv4Addr::new(10, 0, 2, 1), 24)))?;
    let dir = std::env::temp_dir().join(format!("ftvm-bench-vmm-{}.img", std::process::id()));
    std::fs::File::create(&dir)?.set_len(64 << 20)?;
    let cfg = VmConfig {
        mem_size: 128 << 20,
        cmdline: "ip=10.0.2.15/24 gw=10.0.2.1 port=6379 conns=64".into(),
        disk: Some(dir.clone()),
        tap: Some("ftvmtap0".into()),
        console: ConsoleOutput::Null,
        ..Default::default()
    };
    let elf = ftvm_vmm_core::guests::by_name("kv").context("kv guest not embedded")?;
    let (tx, rx) = mpsc::channel();
    let vm_thread = ns.spawn("kv-vcpu", move || -> anyhow::Result<RunOutcome> {
        let mut vm = match Vm::new(&cfg, elf) {
            Ok(vm) => vm,
            Err(e) => {
                let _ = tx.send(None);
                return Err(e.into());
            }
        };
        let _ = tx.send(Some(vm.control()));
        Ok(vm.run()?)
    })?;
    let control = rx.recv()?.context("kv VM failed to start")?;
    let result = (|| -> anyhow::Result<KvResult> {
        let start = Instant::now();
        loop {
            let out = ns.exec("timeout", &["2", "redis-cli", "-h", "10.0.2.15", "PING"])?;
            if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
                break;
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("kv guest does not answer PING");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let exits0 = control.exits();
        let n = requests.to_string();
        let c = clients.to_string();
        // SET and GET as two runs with a pause between: the guest needs a moment to put closed
        // connections' sockets back into LISTEN before 50 new clients connect.
        let mut rps = Vec::new();
        for test in ["set", "get"] {
            let out = ns.exec(
                "timeout",
                &[
                    "300",
                    "redis-benchmark",
                    "-h",
                    "10.0.2.15",
                    "-p",
                    "6379",
                    "-c",
                    &c,
                    "-n",
                    &n,
                    "-t",
                    test,
                    "--csv",
                ],
            )?;
            let csv = String::from_utf8_lossy(&out.stdout).into_owned();
            if !out.status.success() {
                bail!(
                    "redis-benchmark -t {test} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let name = test.to_uppercase();
            rps.push(parse_rps(&csv, &name).with_context(|| format!("no {name} line in {csv:?}"))?);
            std::thread::sleep(Duration::from_secs(1));
        }
        let (set, get) = (rps[0], rps[1]);
        let exits = control.exits() - exits0;
        let _ = ns.exec(
            "timeout",
            &["1", "redis-cli", "-h", "10.0.2.15", "SHUTDOWN"],
        );
        Ok(KvResult {
            set,
            get,
            exits_per_request: exits as f64 / (2 * requests) as f64,
        })
    })();
    if result.is_err() {
        control.kick();
    }
    let vm_result = vm_thread
        .join()
        .map_err(|_| anyhow!("VM thread panicked"))?;
    let _ = std::fs::remove_file(&dir);
    let r = result?;
    match vm_result?? {
        RunOutcome::PoweredOff(0) => Ok(r),
        other => bail!("kv VM ended with {other:?}"),
    }
}

/// A loop body: one MMIO access.
type Body = fn(Asm) -> Asm;

/// Runs the benchmark.
///
/// # Errors
/// If KVM is missing or a guest fails.
pub fn run(opts: &Opts) -> anyhow::Result<()> {
    let (n, reps, requests) = if opts.quick {
        (2_000, 3, 5_000)
    } else {
        (20_000, 5, 50_000)
    };
    let clients = 50;
    let kinds: [(&str, Body); 5] = [
        ("sys_read", |a| a.load(Reg::Rbx, REG_MAGIC as u8)),
        ("sys_clock_read", |a| a.load(Reg::Rbx, REG_CLOCK_NS as u8)),
        ("sys_write", |a| a.store(Reg::Rbx, REG_DEBUG as u8)),
        ("wait", |a| a.load(Reg::Rbx, REG_WAIT as u8)),
        ("virtio_notify", |a| {
            a.mov_imm(Reg::Rdx, 1)
                .raw(&[0x48, 0x89, 0x90, 0x50, 0x30, 0, 0])
        }),
    ];
    let bar = report::progress(kinds.len() as u64 + 1, "vmm");
    let mut exit_ns = BTreeMap::new();
    for (name, body) in kinds {
        bar.set_message(name);
        exit_ns.insert(name.to_string(), exit_cost(n, reps, body)?);
        bar.inc(1);
    }
    let host_syscall_ns = syscall_ns();
    bar.set_message("kv + redis-benchmark");
    let kv = kv_bench(requests, clients);
    bar.inc(1);
    bar.finish_and_clear();
    let (kv_set, kv_get, kv_epr, kv_skipped) = match kv {
        Ok(r) => (Some(r.set), Some(r.get), Some(r.exits_per_request), None),
        Err(e) => {
            eprintln!("vmm: kv part skipped: {e:#}");
            (None, None, None, Some(format!("{e:#}")))
        }
    };
    let sys_read = exit_ns.get("sys_read").copied().unwrap_or(0.0);
    let row = Row {
        exit_loop_iterations: n,
        exit_ns: exit_ns.clone(),
        host_syscall_ns,
        sys_read_exit_vs_syscall: sys_read / host_syscall_ns.max(1e-9),
        kv_requests: requests,
        kv_clients: clients,
        kv_set_ops_per_s: kv_set,
        kv_get_ops_per_s: kv_get,
        kv_exits_per_request: kv_epr,
        kv_skipped,
    };
    let mut rows: Vec<Vec<String>> = exit_ns
        .iter()
        .map(|(k, v)| vec![k.clone(), format!("{:.0}", v)])
        .collect();
    rows.push(vec![
        "host getpid (peer)".into(),
        format!("{host_syscall_ns:.0}"),
    ]);
    report::print_table("VM exit cost (ns per exit)", &["kind", "ns"], &rows);
    if let (Some(s), Some(g)) = (kv_set, kv_get) {
        report::print_table(
            &format!("kv guest, redis-benchmark -c {clients} -n {requests}"),
            &["test", "requests/s", "exits/request"],
            &[
                vec![
                    "SET".into(),
                    format!("{s:.0}"),
                    format!("{:.1}", kv_epr.unwrap_or(0.0)),
                ],
                vec!["GET".into(), format!("{g:.0}"), String::new()],
            ],
        );
    }
    let rows = serde_json::to_value([&row])?;
    let json = report::write_json(opts, "vmm", &[row])?;
    let svg = plot(opts, &rows, None)?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}

/// The vmm plot from the results' row (JSON, as written): the cost of each kind of VM exit
/// beside a host syscall (two decades apart: log scale), and kv's requests/s; `stamp`: the
/// results file's revision and date (`None`: now).
///
/// # Errors
/// The plot cannot be written.
pub fn plot(
    opts: &Opts,
    rows: &serde_json::Value,
    stamp: Option<&str>,
) -> anyhow::Result<std::path::PathBuf> {
    let row = &rows[0];
    let exit_ns: Vec<(String, f64)> = row["exit_ns"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
    let syscall = row["host_syscall_ns"].as_f64().unwrap_or(0.0);
    let mut panels = vec![Panel {
        title: "VM exit cost by kind".into(),
        x_label: "exit kind".into(),
        y_label: "ns per exit (log scale)".into(),
        log_y: true,
        categories: exit_ns.iter().map(|(k, _)| k.clone()).collect(),
        series: vec![
            Series {
                label: "VM exit".into(),
                points: exit_ns
                    .iter()
                    .enumerate()
                    .map(|(i, (_, v))| (i as f64, *v))
                    .collect(),
            },
            Series {
                label: "host syscall (peer)".into(),
                points: (0..exit_ns.len()).map(|i| (i as f64, syscall)).collect(),
            },
        ],
        ..Default::default()
    }];
    if let (Some(s), Some(g)) = (
        row["kv_set_ops_per_s"].as_f64(),
        row["kv_get_ops_per_s"].as_f64(),
    ) {
        panels.push(Panel {
            title: format!(
                "kv via TAP, {} clients",
                row["kv_clients"].as_u64().unwrap_or(0)
            ),
            x_label: "request".into(),
            y_label: "requests/s".into(),
            categories: vec!["SET".into(), "GET".into()],
            series: vec![Series {
                label: "kv guest".into(),
                points: vec![(0.0, s), (1.0, g)],
            }],
            ..Default::default()
        });
    }
    report::plot_any(opts, "vmm", &panels, stamp)
}

#[cfg(test)]
mod tests {
    use super::parse_rps;

    #[test]
    fn parses_redis_benchmark_csv() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\"\n\"SET\",\"1234.56\",\"1.0\"\n\"GET\",\"2000.00\",\"0.5\"\n";
        assert_eq!(parse_rps(csv, "SET"), Some(1234.56));
        assert_eq!(parse_rps(csv, "GET"), Some(2000.0));
        assert_eq!(parse_rps(csv, "INCR"), None);
    }
}
