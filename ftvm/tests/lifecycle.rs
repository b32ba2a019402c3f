//! The service lifecycle of real `ftvm` processes: SIGTERM is a planned stop, not a failure.
//! - the primary of a kv pair with an arbiter, SIGTERMed under client load: it releases what it
//!   held, tells the backup; the backup does not go live (the arbiter still holds generation
//!   1 only); both exit with status 207; every acknowledged write is on both disks afterwards
//!   (read back by `kv` booted alone on each);
//! - the backup SIGTERMed under load: the primary goes on alone (the default
//!   `--on-backup-stop alone`, with or without an arbiter) and keeps serving; with
//!   `--on-backup-stop stop` (no arbiter) it stops with 207 instead of 204 (peer failed);
//! - a handover (`--on-primary-stop take-over`): the SIGTERMed primary's backup goes live at
//!   once;
//! - `ftvm run` SIGTERMed: the summary and status 207;
//! - `sd_notify`: READY=1 after pairing, STATUS= with role and generation, WATCHDOG=1 at half
//!   `WATCHDOG_USEC`, STOPPING=1 on SIGTERM, received on a datagram socket the test binds.
//!
//! Needs root and /dev/kvm (prints SKIP otherwise).

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ftvm::exit::STOPPED;
use ftvm::scenario::{Node, Scenario, Side};

fn sigterm(pid: u32) {
    let pid = libc::pid_t::try_from(pid).expect("pid");
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "kill");
}

/// For a test that needs the kv pair: `None` (after a SKIP line) where it cannot run, else
/// this test's turn ([`common::serial`]) and the pair ([`pair`]).
fn setup(
    test: &str,
    tag: &str,
    no_failover: bool,
    extra: (&[String], &[String]),
) -> Option<(std::sync::MutexGuard<'static, ()>, Scenario)> {
    if common::skip(test) {
        return None;
    }
    let turn = common::serial();
    Some((turn, pair(tag, no_failover, extra)))
}

/// A kv pair over tcp (with the file arbiter unless `no_failover`), under client load.
fn pair(tag: &str, no_failover: bool, extra: (&[String], &[String])) -> Scenario {
    let mut config = common::config(tag);
    config.transport = "tcp".into();
    config.no_failover = no_failover;
    // These tests are about planned stops, which need no failure detection: a 200 ms timeout
    // (the default) saw a side starved of CPU by a parallel build for 200 ms, and a correct
    // but unwanted take-over raced the planned one (the test then failed).
    config.fail_timeout_ms = Some(1000);
    let mut s = Scenario::prepare(config).expect("prepare pair");
    s.backup = Some(s.spawn(Side::Backup, extra.1).expect("spawn backup"));
    s.primary = Some(s.spawn(Side::Primary, extra.0).expect("spawn primary"));
    s.wait_ready(Duration::from_secs(30)).expect("kv answers");
    s
}

/// Waits for `node` to exit with [`STOPPED`] and a `STOPPED (planned)` line; returns the line.
fn assert_planned_stop(node: &mut Node) -> String {
    common::assert_exits_with(node, STOPPED);
    node.find_line("STOPPED (planned)")
        .unwrap_or_else(|| panic!("no STOPPED line\n{}", node.stderr_text()))
}

/// Boots `kv` alone on `side`'s disk and checks that every acknowledged write is there.
fn read_back_from_disk(s: &Scenario, side: Side, load: &ftvm::client::Load) {
    let mut alone = s.spawn_alone(&s.disk(side)).expect("kv alone");
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.command(&[b"PING"], Duration::from_secs(1)).is_err() {
        assert!(
            Instant::now() < deadline,
            "kv alone on the {} disk does not answer\n{}",
            side.name(),
            alone.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = common::assert_no_acked_write_lost(s, load.checker());
    eprintln!(
        "{} disk: {} acknowledged writes read back, none lost",
        side.name(),
        r.checked
    );
    s.shutdown_guest();
    alone.wait_exit(Duration::from_secs(20));
}

/// SIGTERM of the primary under load: the backup does not go live, both exit 207, and every
/// acknowledged write is on both disks. (Before the planned stop the primary died of the
/// signal and the backup took over as generation 2.)
#[test]
fn sigterm_of_the_primary_stops_the_pair_without_failover_and_loses_no_write() {
    const TEST: &str = "sigterm_of_the_primary_stops_the_pair_without_failover_and_loses_no_write";
    let Some((_turn, mut s)) = setup(TEST, "lc-p", false, (&[], &[])) else {
        return;
    };
    let mut load = common::load(&s, 2, "p");
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    sigterm(s.primary.as_ref().expect("primary").pid());
    let p = assert_planned_stop(s.primary.as_mut().expect("primary"));
    let b = assert_planned_stop(s.backup.as_mut().expect("backup"));
    eprintln!("{TEST}:\n  {p}\n  {b}");
    load.stop();
    assert!(p.contains("the peer was told"), "{p}");
    assert!(b.contains("the peer stopped as planned"), "{b}");
    let backup = s.backup.as_ref().expect("backup");
    assert!(
        backup.find_line("LIVE").is_none(),
        "the backup went live\n{}",
        backup.stderr_text()
    );
    assert_eq!(
        s.generations().iter().map(|(g, _)| *g).collect::<Vec<_>>(),
        vec![1],
        "a generation was taken after the planned stop"
    );
    let report = s.report(Side::Primary).expect("primary report");
    assert_eq!(report["stopped"]["outputs_held"], 0, "{report}");
    assert_eq!(report["stopped"]["told_peer"], true, "{report}");
    // Both sides gone: the disks can be read back.
    s.primary.take();
    s.backup.take();
    read_back_from_disk(&s, Side::Primary, &load);
    read_back_from_disk(&s, Side::Backup, &load);
}

/// SIGTERMs the backup of `s` under load and checks that it stops as planned while the
/// primary serves on alone (no client error, new writes acknowledged, none lost), then powers
/// the guest off through the primary (status 0).
fn backup_stops_and_primary_serves_alone(test: &str, mut s: Scenario, tag: &str) {
    let mut load = common::load(&s, 2, tag);
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    sigterm(s.backup.as_ref().expect("backup").pid());
    let b = assert_planned_stop(s.backup.as_mut().expect("backup"));
    eprintln!("{test}: {b}");
    assert!(b.contains("the peer was told"), "{b}");
    common::assert_primary_serves_on(&mut s, &mut load);
    let primary = s.primary.as_mut().expect("primary");
    assert!(
        primary.find_line("stopped as planned").is_some(),
        "{}",
        primary.stderr_text()
    );
    s.shutdown_guest();
    common::assert_exits_with(s.primary.as_mut().expect("primary"), 0);
}

/// SIGTERM of the backup under load: it exits 207, the primary goes on alone (the default
/// policy, after winning generation 2) and keeps serving; every acknowledged write stays
/// readable.
#[test]
fn sigterm_of_the_backup_leaves_the_primary_serving_alone() {
    const TEST: &str = "sigterm_of_the_backup_leaves_the_primary_serving_alone";
    let Some((_turn, s)) = setup(TEST, "lc-b", false, (&[], &[])) else {
        return;
    };
    backup_stops_and_primary_serves_alone(TEST, s, "b");
}

/// The same without an arbiter: the backup promised not to go live, so the primary goes on
/// alone (it used to stop with 204, the peer failed, under the default
/// `--on-backup-failure stop`).
#[test]
fn sigterm_of_the_backup_without_arbiter_leaves_the_primary_serving_alone() {
    const TEST: &str = "sigterm_of_the_backup_without_arbiter_leaves_the_primary_serving_alone";
    let Some((_turn, s)) = setup(TEST, "lc-n", true, (&[], &[])) else {
        return;
    };
    backup_stops_and_primary_serves_alone(TEST, s, "n");
}

/// A handover: with `--on-primary-stop take-over` the backup of a SIGTERMed primary goes live
/// at once (generation 2) and serves on; no acknowledged write is lost. SIGTERMed in turn, the
/// live backup stops as planned (207).
#[test]
fn sigterm_of_the_primary_hands_over_with_on_primary_stop_take_over() {
    const TEST: &str = "sigterm_of_the_primary_hands_over_with_on_primary_stop_take_over";
    let extra = ["--on-primary-stop".to_string(), "take-over".to_string()];
    let Some((_turn, mut s)) = setup(TEST, "lc-h", false, (&[], &extra)) else {
        return;
    };
    let mut load = common::load(&s, 2, "h");
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    sigterm(s.primary.as_ref().expect("primary").pid());
    assert_planned_stop(s.primary.as_mut().expect("primary"));
    let backup = s.backup.as_mut().expect("backup");
    let live = backup
        .wait_line("LIVE", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the backup did not take over\n{}", backup.stderr_text()));
    eprintln!("{TEST}: {live}");
    load.mark(Instant::now());
    common::wait_first_reply(&s, &load, Duration::from_secs(10));
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    load.stop();
    common::assert_no_acked_write_lost(&s, load.checker());
    assert_eq!(
        s.generations().last().map(|(g, w)| (*g, w.clone())),
        Some((2, "backup".to_string()))
    );
    // The survivor, now the lone primary, stopped as planned too.
    let backup = s.backup.as_mut().expect("backup");
    sigterm(backup.pid());
    assert_planned_stop(backup);
}

/// Without an arbiter and with `--on-backup-stop stop`, a primary whose backup is SIGTERMed
/// stops too, with 207 (a planned stop), not 204 (the peer failed).
#[test]
fn primary_with_on_backup_stop_stop_stops_too() {
    const TEST: &str = "primary_with_on_backup_stop_stop_stops_too";
    let extra = ["--on-backup-stop".to_string(), "stop".to_string()];
    let Some((_turn, mut s)) = setup(TEST, "lc-s", true, (&extra, &[])) else {
        return;
    };
    let mut load = common::load(&s, 2, "s");
    common::wait_ops(&s, &load, 100, Duration::from_secs(20));
    sigterm(s.backup.as_ref().expect("backup").pid());
    assert_planned_stop(s.backup.as_mut().expect("backup"));
    let p = assert_planned_stop(s.primary.as_mut().expect("primary"));
    load.stop();
    assert!(p.contains("the peer stopped as planned"), "{p}");
}

/// A datagram socket standing in for the service manager's `NOTIFY_SOCKET`.
struct NotifySocket {
    sock: UnixDatagram,
    path: std::path::PathBuf,
    got: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &std::path::Path, name: &str) -> Self {
        let path = dir.join(name);
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        NotifySocket {
            sock,
            path,
            got: Vec::new(),
        }
    }

    /// Receives until a message has a line starting with `line` (at most `timeout`); returns
    /// that line.
    fn wait(&mut self, line: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .got
                .iter()
                .flat_map(|m| m.lines())
                .find(|l| l.starts_with(line))
            {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {line:?} within {timeout:?}; got {:?}",
                self.got
            );
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.got
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    /// Receives whatever arrives during `d`.
    fn drain(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.got
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    fn count(&self, line: &str) -> usize {
        self.got
            .iter()
            .flat_map(|m| m.lines())
            .filter(|l| *l == line)
            .count()
    }
}

fn spawn_side(role: &str, peer: &str, notify: &NotifySocket) -> Child {
    Command::new(common::ftvm_bin())
        .args([
            role,
            "--guest",
            "cpu",
            "--mem",
            "16M",
            // Minutes of work: stopped by the test.
            "--cmdline",
            "size=1M rounds=100000",
            "--transport",
            "tcp",
            "--peer",
            peer,
        ])
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvm")
}

/// `sd_notify` of a pair without an arbiter: READY=1 once paired, STATUS= naming the role and
/// generation, WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM; the SIGTERMed
/// primary exits 207 and so does its backup (without an arbiter it used to stop with 204, the
/// peer failed).
#[test]
fn sd_notify_ready_status_watchdog_stopping_of_a_pair() {
    const TEST: &str = "sd_notify_ready_status_watchdog_stopping_of_a_pair";
    if let Some(r) = ftvm::scenario::missing() {
        eprintln!("SKIP {TEST}: {r}");
        return;
    }
    let _serial = common::serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let [port] = ftvm_testkit::loopback_ports().expect("port");
    let peer = format!("127.0.0.1:{port}");
    let (mut pn, mut bn) = (
        NotifySocket::bind(dir.path(), "p.sock"),
        NotifySocket::bind(dir.path(), "b.sock"),
    );
    let mut backup = spawn_side("backup", &peer, &bn);
    let mut primary = spawn_side("primary", &peer, &pn);
    let limit = Duration::from_secs(30);
    pn.wait("READY=1", limit);
    bn.wait("READY=1", limit);
    let ps = pn.wait("STATUS=primary", limit);
    let bs = bn.wait("STATUS=backup", limit);
    assert!(ps.contains("generation 1"), "{ps}");
    assert!(bs.contains("generation 1"), "{bs}");
    // 200 ms watchdog: a ping every 100 ms.
    pn.drain(Duration::from_millis(600));
    pn.wait("WATCHDOG=1", limit);
    bn.wait("WATCHDOG=1", limit);
    assert!(pn.count("WATCHDOG=1") >= 3, "{:?}", pn.got);
    sigterm(primary.id());
    pn.wait("STOPPING=1", limit);
    let wait = |c: &mut Child| {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (p, b) = (wait(&mut primary), wait(&mut backup));
    let text = |c: Child| {
        String::from_utf8_lossy(&c.wait_with_output().expect("output").stderr).into_owned()
    };
    let (pt, bt) = (text(primary), text(backup));
    assert_eq!(p, Some(STOPPED), "primary:\n{pt}");
    assert_eq!(b, Some(STOPPED), "backup:\n{bt}");
    assert!(bt.contains("the peer stopped as planned"), "{bt}");
}

/// SIGTERM of `ftvm run`: the VM stops, the summary is printed, status 207; with a
/// NOTIFY_SOCKET it said READY=1 and STOPPING=1.
#[test]
fn sigterm_of_ftvm_run_prints_the_summary_and_exits_207() {
    const TEST: &str = "sigterm_of_ftvm_run_prints_the_summary_and_exits_207";
    if let Some(r) = ftvm_testkit::kvm_missing() {
        eprintln!("SKIP {TEST}: {r}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut n = NotifySocket::bind(dir.path(), "run.sock");
    let child = Command::new(common::ftvm_bin())
        .args([
            "run",
            "--guest",
            "cpu",
            "--mem",
            "16M",
            "--cmdline",
            "size=1M rounds=100000",
            "--quiet",
        ])
        .env("NOTIFY_SOCKET", &n.path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvm run");
    n.wait("READY=1", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    sigterm(child.id());
    n.wait("STOPPING=1", Duration::from_secs(5));
    let t = Instant::now();
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(STOPPED), "{err}");
    assert!(err.contains("--- ftvm run summary ---"), "{err}");
    assert!(err.contains("stopped    by SIGTERM"), "{err}");
}
