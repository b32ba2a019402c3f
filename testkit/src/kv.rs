//! Shared helpers of the integration tests: the `kv` guest in a network namespace, the `ftvm`
//! binary of the test's target directory, and the settings of in-process pairs.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::skip;
use ftvm_channel::netns::Netns;
use ftvm_vmm_core::devices::ConsoleOutput;
use ftvm_vmm_core::vm::{buffer_console, RunOutcome, Vm, VmConfig, VmControl};

/// A blank 8 MiB disk image `name` in `dir`.
pub fn blank_disk(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(8 << 20))
        .expect("disk");
    p
}

/// Blank disks of each side of a pair in `dir`: (`primary.img`, `backup.img`).
pub fn blank_disks(dir: &Path) -> (PathBuf, PathBuf) {
    (
        blank_disk(dir, "primary.img"),
        blank_disk(dir, "backup.img"),
    )
}

/// Guest address and port.
pub const GUEST_IP: &str = "10.0.2.15";
/// The TAP interface inside the namespace.
pub const TAP: &str = "ftvmtap0";

/// Why a networked test cannot run here, if it cannot.
pub fn net_missing() -> Option<String> {
    if let Some(r) = crate::kvm_missing() {
        return Some(r);
    }
    if let Err(r) = ftvm_channel::netns::require_root() {
        return Some(r);
    }
    if std::process::Command::new("redis-cli")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some("redis-cli not installed (Debian package redis-tools)".into());
    }
    None
}

/// A namespace with a TAP at 10.0.2.1/24; deleted on drop.
pub fn namespace(tag: &str) -> Netns {
    let name = format!("ftvm-vmm-{tag}-{}", std::process::id());
    let ns = Netns::create(&name).expect("create netns");
    ns.add_tap(TAP, Some((Ipv4Addr::new(10, 0, 2, 1), 24)))
        .expect("add tap");
    ns
}

/// A VM running on its own thread; kicked (stopped) and joined on drop.
#[derive(Debug)]
pub struct RunningVm {
    /// Stops (kicks) the VM.
    pub control: VmControl,
    /// What the guest printed so far.
    pub console: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    handle: Option<JoinHandle<Result<RunOutcome, String>>>,
}

impl RunningVm {
    /// Waits for the VM to stop and returns how.
    pub fn join(mut self) -> Result<RunOutcome, String> {
        let h = self.handle.take().expect("joined once");
        h.join().map_err(|_| "VM thread panicked".to_string())?
    }
    /// The console output so far.
    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().unwrap()).into_owned()
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.control.kick();
            let _ = h.join();
        }
    }
}

/// Starts the `kv` guest (64 MiB) with `disk` on the TAP of `ns`.
pub fn start_kv(ns: &Netns, disk: &Path, extra_cmdline: &str) -> RunningVm {
    start_kv_with_mem(ns, disk, extra_cmdline, 64 << 20)
}

/// Starts the `kv` guest with `mem_size` bytes of RAM and `disk` on the TAP of `ns`.
pub fn start_kv_with_mem(ns: &Netns, disk: &Path, extra_cmdline: &str, mem_size: u64) -> RunningVm {
    let (console, buf) = buffer_console();
    let config = VmConfig {
        mem_size,
        cmdline: format!("ip={GUEST_IP}/24 gw=10.0.2.1 port=6379 {extra_cmdline}"),
        disk: Some(disk.to_path_buf()),
        tap: Some(TAP.into()),
        console: ConsoleOutput::clone(&console),
        ..Default::default()
    };
    let elf = ftvm_vmm_core::guests::by_name("kv").expect("kv guest embedded");
    let (tx, rx) = mpsc::channel();
    let handle = ns
        .spawn("kv-vcpu", move || -> Result<RunOutcome, String> {
            let mut vm = match Vm::new(&config, elf) {
                Ok(vm) => vm,
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:?}")));
                    return Err(format!("{e:?}"));
                }
            };
            let _ = tx.send(Ok(vm.control()));
            vm.run().map_err(|e| format!("{e:?}"))
        })
        .expect("spawn VM thread");
    let control = rx.recv().expect("VM thread reports").expect("VM starts");
    let handle = Some(std::thread::spawn(move || match handle.join() {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("VM thread panicked".into()),
    }));
    RunningVm {
        control,
        console: buf,
        handle,
    }
}

/// `redis-cli -h GUEST_IP ARGS...` inside `ns`, with a 10 s timeout.
pub fn redis(ns: &Netns, args: &[&str]) -> Output {
    let mut all = vec!["10", "redis-cli", "-h", GUEST_IP, "-p", "6379"];
    all.extend_from_slice(args);
    ns.exec("timeout", &all).expect("run redis-cli")
}

/// The reply of a redis-cli command, trimmed.
pub fn redis_reply(ns: &Netns, args: &[&str]) -> String {
    let out = redis(ns, args);
    assert!(out.status.success(), "redis-cli {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// After a crash at `crashed`: retries `GET key` (1 s per try) until the new primary answers with
/// a non-empty value, which it returns; fails after 20 s with `context()` in the message.
pub fn get_after_crash(
    ns: &Netns,
    key: &str,
    crashed: Instant,
    context: impl Fn() -> String,
) -> String {
    loop {
        let out = ns
            .exec("timeout", &["1", "redis-cli", "-h", GUEST_IP, "GET", key])
            .expect("redis-cli");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !text.is_empty() {
            return text;
        }
        assert!(
            crashed.elapsed() < Duration::from_secs(20),
            "no answer after the crash{}",
            context()
        );
    }
}

/// Waits until the guest answers PING (at most 15 s).
pub fn wait_ready(ns: &Netns, vm: &RunningVm) {
    wait_ready_with(ns, &vm.console);
}

/// Sends SHUTDOWN (the guest powers off without closing the connection, so redis-cli is given
/// only 1 s to wait for a reply that never comes).
pub fn redis_shutdown(ns: &Netns) {
    let _ = ns.exec(
        "timeout",
        &["1", "redis-cli", "-h", GUEST_IP, "-p", "6379", "SHUTDOWN"],
    );
}

/// Waits until the guest answers PING (at most 15 s); `console` is shown on failure.
pub fn wait_ready_with(ns: &Netns, console: &std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let start = Instant::now();
    loop {
        let all = ["2", "redis-cli", "-h", GUEST_IP, "-p", "6379", "PING"];
        let out = ns.exec("timeout", &all).expect("redis-cli");
        if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "kv guest did not answer PING; console: {}",
            String::from_utf8_lossy(&console.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `ftvm` binary of this test's target directory (`cargo build -p ftvm`; `cargo test
/// --workspace` builds it); prints SKIP and returns `None` without KVM or the binary.
pub fn ftvm_binary(test: &str) -> Option<PathBuf> {
    if skip::if_missing(test, crate::kvm_missing()) {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("ftvm");
    if bin.exists() {
        Some(bin)
    } else {
        skip::skip(
            test,
            format_args!("{} not built (cargo build -p ftvm)", bin.display()),
        );
        None
    }
}

/// Waits for a child process (at most `timeout`, then kills it and panics with its stderr).
pub fn wait_child(mut c: std::process::Child, what: &str, timeout: Duration) -> Output {
    let start = Instant::now();
    loop {
        if c.try_wait().expect("try_wait").is_some() {
            return c.wait_with_output().expect("output");
        }
        if start.elapsed() > timeout {
            let _ = c.kill();
            let out = c.wait_with_output().expect("output");
            panic!(
                "{what} did not finish in {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to 60 s each) for a pair's primary and backup processes; returns their outputs.
pub fn wait_pair(primary: std::process::Child, backup: std::process::Child) -> (Output, Output) {
    let po = wait_child(primary, "primary", Duration::from_secs(60));
    let bo = wait_child(backup, "backup", Duration::from_secs(60));
    (po, bo)
}

/// [`wait_pair`], asserting that both processes exited successfully (stderr in the message).
pub fn wait_pair_ok(primary: std::process::Child, backup: std::process::Child) -> (Output, Output) {
    let (po, bo) = wait_pair(primary, backup);
    for out in [&po, &bo] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (po, bo)
}

/// A JSON report an `ftvm` process wrote.
pub fn report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("report written");
    serde_json::from_str(&text).expect("report is JSON")
}

/// A loopback port for this test and its children (see
/// [`crate::loopback_ports`]).
pub fn free_port() -> u16 {
    let [port] = crate::loopback_ports().expect("free loopback port");
    port
}

/// `N` distinct loopback addresses (for detectors' UDP heartbeats).
pub fn free_udp<const N: usize>() -> [std::net::SocketAddr; N] {
    let ports: [u16; N] = crate::loopback_ports().expect("free loopback ports");
    ports.map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p)))
}

/// Waits (at most 30 s) until `kv` answers PING in `ns`; panics with `what` otherwise.
pub fn wait_pong(ns: &Netns, what: &str) {
    let start = Instant::now();
    loop {
        let out = ns
            .exec("timeout", &["2", "redis-cli", "-h", GUEST_IP, "PING"])
            .expect("redis-cli");
        if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `redis-benchmark -n requests -c clients -t tests -q` against `kv` in `ns` (at most 60 s).
pub fn redis_benchmark(ns: &Netns, requests: &str, clients: &str, tests: &str) -> Output {
    ns.exec(
        "timeout",
        &[
            "60",
            "redis-benchmark",
            "-h",
            GUEST_IP,
            "-n",
            requests,
            "-c",
            clients,
            "-t",
            tests,
            "-q",
        ],
    )
    .expect("redis-benchmark")
}

/// Failover settings of one side for the in-process pairs: heartbeats every 10 ms, failure
/// presumed after 250 ms, arbiter retries from 5 ms to 50 ms, generation 1.
pub fn ft_config(
    arbiter: &std::sync::Arc<dyn ftvm_ft::arbiter::Arbiter>,
    node: &str,
    bind: std::net::SocketAddr,
    peer: std::net::SocketAddr,
) -> ftvm_ft::golive::FtConfig {
    use ftvm_ft::arbiter::RetryPolicy;
    use ftvm_ft::detector::DetectorConfig;
    use ftvm_ft::golive::FtConfig;
    use ftvm_ft::node::{NodeId, Role};
    let mut detector = DetectorConfig::new(bind, peer, Role::Primary);
    detector.interval = Duration::from_millis(10);
    detector.timeout = Duration::from_millis(250);
    FtConfig {
        retry: RetryPolicy {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(50),
        },
        ..FtConfig::new(
            std::sync::Arc::clone(arbiter),
            NodeId::new(node).expect("node id"),
            1,
            detector,
        )
    }
}

/// A primary VM's configuration: `mem` bytes, `cmdline`, `disk`, the network device on
/// [`TAP`] (in the namespace the VM runs in), and a console buffer (returned).
pub fn primary_vm_config(
    mem: u64,
    cmdline: String,
    disk: PathBuf,
) -> (VmConfig, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let (cfg, buf) = vm_config(mem, cmdline, disk);
    let tap = Some(TAP.into());
    (VmConfig { tap, ..cfg }, buf)
}

/// A backup VM's configuration: `mem` bytes, `cmdline`, `disk`, the network device without a
/// backend (it replays), and a console buffer (returned).
pub fn backup_vm_config(
    mem: u64,
    cmdline: String,
    disk: PathBuf,
) -> (VmConfig, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let (cfg, buf) = vm_config(mem, cmdline, disk);
    let net_without_backend = true;
    (
        VmConfig {
            net_without_backend,
            ..cfg
        },
        buf,
    )
}

/// `mem` bytes, `cmdline`, `disk` and a console buffer (returned); no network device.
fn vm_config(
    mem: u64,
    cmdline: String,
    disk: PathBuf,
) -> (VmConfig, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let (console, buf) = buffer_console();
    let cfg = VmConfig {
        mem_size: mem,
        cmdline,
        disk: Some(disk),
        console,
        ..Default::default()
    };
    (cfg, buf)
}
