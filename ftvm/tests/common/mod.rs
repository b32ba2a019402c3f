//! Shared helpers of the process-level fault tests: a kv pair of real `ftvm` processes in a
//! network namespace ([`ftvm::scenario`]), client load with an acknowledged-writes checker
//! ([`ftvm::client`]), one test at a time.

#![allow(dead_code, unused_imports)]

use std::path::PathBuf;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use ftvm::client::{CheckReport, Checker, Load, LoadConfig, RespConn};
use ftvm::scenario::{Node, Scenario, ScenarioConfig};

/// The `ftvm` binary built with these tests, or the one `FTVM_TEST_BIN` names (to check that
/// a test fails against an older build: `FTVM_TEST_BIN=/tmp/ftvm-old cargo test ...`).
pub fn ftvm_bin() -> PathBuf {
    match std::env::var_os("FTVM_TEST_BIN") {
        Some(p) => {
            eprintln!(
                "testing the ftvm binary {} (FTVM_TEST_BIN)",
                p.to_string_lossy()
            );
            PathBuf::from(p)
        }
        None => PathBuf::from(env!("CARGO_BIN_EXE_ftvm")),
    }
}

/// Prints `SKIP <test>: <reason>` and returns true when the scenario cannot run here.
pub fn skip(test: &str) -> bool {
    ftvm_testkit::skip::if_missing(test, ftvm::scenario::missing())
}

#[allow(unused_imports)] // not every test file uses it
pub use ftvm_testkit::skip_without;

/// One scenario at a time: two VMs per test already fill this 2-core machine, and a starved
/// heartbeat thread would look like a failure.
pub fn serial() -> MutexGuard<'static, ()> {
    ftvm_testkit::one_at_a_time()
}

/// A scenario configuration for `tag` (transport shm, file arbiter, children log at info).
pub fn config(tag: &str) -> ScenarioConfig {
    let mut c = ScenarioConfig::new(ftvm_bin(), tag);
    c.log = "info".into();
    c
}

/// Client load on the scenario's guest (`threads` connections; a 10 s reply timeout, so a
/// failover pause is not an error).
pub fn load(s: &Scenario, threads: usize, prefix: &str) -> Load {
    Load::start(
        &LoadConfig {
            netns: Some(s.netns().name().to_string()),
            addr: Scenario::guest_addr(),
            threads,
            timeout: Duration::from_secs(10),
            prefix: prefix.into(),
        },
        Arc::new(Checker::default()),
    )
    .expect("start client load")
}

/// Waits until `load` has `n` more acknowledged writes than now (panics after `timeout`, with
/// both sides' stderr).
pub fn wait_ops(s: &Scenario, load: &Load, n: u64, timeout: Duration) {
    let start = load.stats().ops;
    let deadline = Instant::now() + timeout;
    while load.stats().ops < start + n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} acknowledged writes in {timeout:?} (last client error: {:?})\n{}",
            load.last_error(),
            s.stderr_of_both()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for the first client reply after the load's mark (panics after `timeout`).
pub fn wait_first_reply(s: &Scenario, load: &Load, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = load.first_reply_after_mark() {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "no client reply within {timeout:?} (last client error: {:?})\n{}",
            load.last_error(),
            s.stderr_of_both()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// After the peer of `s`'s primary left (killed or stopped): the clients are answered again
/// within 10 s, 200 more writes are acknowledged, no client saw an error, every acknowledged
/// write is readable, and the primary still runs. Stops `load`.
pub fn assert_primary_serves_on(s: &mut Scenario, load: &mut Load) {
    load.mark(Instant::now());
    wait_first_reply(s, load, Duration::from_secs(10));
    wait_ops(s, load, 200, Duration::from_secs(20));
    let stats = load.stop();
    assert_eq!(stats.errors, 0, "client errors: {:?}", load.last_error());
    assert_no_acked_write_lost(s, load.checker());
    let primary = s.primary.as_mut().expect("primary");
    assert_eq!(primary.try_status(), None, "{}", primary.stderr_text());
}

/// Reads back every write acknowledged to `checker` (from inside the namespace).
pub fn verify(s: &Scenario, checker: &Checker) -> CheckReport {
    s.in_netns(|| {
        let mut c = RespConn::connect(Scenario::guest_addr(), Duration::from_secs(10))?;
        checker.verify(&mut c)
    })
    .expect("enter namespace")
    .unwrap_or_else(|e| panic!("read back: {e:?}\n{}", s.stderr_of_both()))
}

/// Asserts that every acknowledged write is readable and that there were some.
pub fn assert_no_acked_write_lost(s: &Scenario, checker: &Checker) -> CheckReport {
    let r = verify(s, checker);
    assert!(r.checked > 0, "no acknowledged write to check");
    assert_eq!(
        r.lost,
        0,
        "acknowledged writes lost: {:?}\n{}",
        r.examples,
        s.stderr_of_both()
    );
    r
}

/// Waits (at most 20 s) for `node` to exit and asserts its exit code (its stderr otherwise).
pub fn assert_exits_with(node: &mut Node, code: i32) {
    let status = node.wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.and_then(|st| st.code()),
        Some(code),
        "{}",
        node.stderr_text()
    );
}

/// A small tmpfs mounted for one test (`mount -t tmpfs -o size=<size>` on a fresh temporary
/// directory): a filesystem that fills up. Unmounted (lazily if still busy) and removed on drop;
/// drop it after every process that has files open on it.
#[derive(Debug)]
pub struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// Mounts a tmpfs of `size` bytes (`mount`'s syntax: `64k`, `1m`).
    pub fn mount(size: &str) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ftvm-small-").tempdir()?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "ftvm-small"])
            .arg(dir.path())
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "mount -t tmpfs -o size={size} on {}: {}",
                dir.path().display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(SmallFs { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut c = std::process::Command::new("umount");
            if lazy {
                c.arg("-l");
            }
            c.arg(self.dir.path()).status().is_ok_and(|st| st.success())
        };
        if !umount(false) && !umount(true) {
            eprintln!("cannot unmount {}", self.dir.path().display());
        }
    }
}

/// Runs `nft` with each of `commands` inside the scenario's namespace (panics on a failure).
pub fn nft(s: &Scenario, commands: &[&[&str]]) {
    for args in commands {
        let out = s.netns().exec("nft", args).expect("run nft");
        assert!(out.status.success(), "nft {args:?}: {out:?}");
    }
}
