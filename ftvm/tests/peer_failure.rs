//! A pair **without an arbiter** whose peer fails (real `ftvm` processes, kv under client load,
//! SIGKILL): "the pair stops when a side fails". The primary stops promptly with status 204
//! (`PEER_FAILED`) and a clear message, without spinning; the backup replays what it received
//! and stops the same way (it never goes live without an arbiter); `--go-alone-unprotected`
//! lets the primary serve on alone instead, with a loud warning. Needs root and /dev/kvm
//! (prints SKIP otherwise).

mod common;

use std::time::{Duration, Instant};

use ftvm::exit::PEER_FAILED;
use ftvm::scenario::{Node, Scenario, Side};

/// A kv pair without an arbiter over tcp (a killed peer's connection closes at once), under
/// client load; `primary_extra`: extra flags of the primary.
fn pair_without_arbiter(tag: &str, primary_extra: &[String]) -> Scenario {
    let mut config = common::config(tag);
    config.transport = "tcp".into();
    config.no_failover = true;
    let mut s = Scenario::prepare(config).expect("prepare pair");
    s.backup = Some(s.spawn(Side::Backup, &[]).expect("spawn backup"));
    s.primary = Some(
        s.spawn(Side::Primary, primary_extra)
            .expect("spawn primary"),
    );
    s.wait_ready(Duration::from_secs(30)).expect("kv answers");
    s
}

/// CPU time (user + system) of a process so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // The fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// Waits for `node` to exit with [`PEER_FAILED`] within `limit` of `since`, its message naming
/// the failed `peer`.
fn assert_peer_failed(node: &mut Node, since: Instant, limit: Duration, peer: &str) {
    let status = node.wait_exit(limit.saturating_sub(since.elapsed()));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(PEER_FAILED),
        "the {} did not stop with PEER_FAILED within {limit:?} of the kill\n{}",
        node.name(),
        node.stderr_text()
    );
    let line = node
        .find_line("PEER FAILED")
        .unwrap_or_else(|| panic!("no PEER FAILED line\n{}", node.stderr_text()));
    assert!(line.contains(&format!("the {peer} failed")), "{line}");
    eprintln!(
        "{}: {line} ({:?} after the kill)",
        node.name(),
        since.elapsed()
    );
}

/// The backup is SIGKILLed under load: the primary stops within 3 s with status 204 and says
/// the backup failed and there is no arbiter (it used to run on at 100 % CPU, serving nothing,
/// and never exit).
#[test]
fn primary_without_arbiter_stops_promptly_when_its_backup_is_killed() {
    const TEST: &str = "primary_without_arbiter_stops_promptly_when_its_backup_is_killed";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let mut s = pair_without_arbiter("pf-p", &[]);
    let mut load = common::load(&s, 2, "p");
    common::wait_ops(&s, &load, 100, Duration::from_secs(20));
    s.backup.take().expect("backup").kill();
    let killed = Instant::now();
    let primary = s.primary.as_mut().expect("primary");
    assert_peer_failed(primary, killed, Duration::from_secs(3), "backup");
    load.stop();
}

/// The primary is SIGKILLed under load: the backup, which has no arbiter and so never goes
/// live, replays what it received and stops with status 204, saying the primary failed.
#[test]
fn backup_without_arbiter_stops_when_its_primary_is_killed() {
    const TEST: &str = "backup_without_arbiter_stops_when_its_primary_is_killed";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let mut s = pair_without_arbiter("pf-b", &[]);
    let mut load = common::load(&s, 2, "b");
    common::wait_ops(&s, &load, 100, Duration::from_secs(20));
    s.primary.take().expect("primary").kill();
    let killed = Instant::now();
    let backup = s.backup.as_mut().expect("backup");
    assert_peer_failed(backup, killed, Duration::from_secs(3), "primary");
    assert!(
        backup.find_line("LIVE").is_none(),
        "{}",
        backup.stderr_text()
    );
    load.stop();
}

/// With `--go-alone-unprotected` the primary whose backup was SIGKILLed warns loudly, serves
/// on alone (new writes acknowledged, every acknowledged write readable) and idles without
/// spinning; the guest then powers off cleanly through it.
#[test]
fn primary_without_arbiter_goes_alone_unprotected_when_asked() {
    const TEST: &str = "primary_without_arbiter_goes_alone_unprotected_when_asked";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let mut s = pair_without_arbiter("pf-a", &["--go-alone-unprotected".into()]);
    let mut load = common::load(&s, 2, "a");
    common::wait_ops(&s, &load, 100, Duration::from_secs(20));
    s.backup.take().expect("backup").kill();
    common::assert_primary_serves_on(&mut s, &mut load);
    let primary = s.primary.as_mut().expect("primary");
    assert!(
        primary.find_line("UNPROTECTED").is_some(),
        "no loud warning\n{}",
        primary.stderr_text()
    );
    // Idle without load: no thread of the lone primary spins.
    let pid = primary.pid();
    let (t0, c0) = (Instant::now(), cpu_time(pid));
    std::thread::sleep(Duration::from_secs(2));
    let share = (cpu_time(pid) - c0).as_secs_f64() / t0.elapsed().as_secs_f64();
    eprintln!(
        "{TEST}: the lone primary used {:.1} % of a CPU while idle",
        share * 100.0
    );
    assert!(
        share < 0.5,
        "the lone primary spins: {:.0} % of a CPU",
        share * 100.0
    );
    s.shutdown_guest();
    common::assert_exits_with(s.primary.as_mut().expect("primary"), 0);
}
