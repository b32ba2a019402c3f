//! Re-protection with real processes: a kv pair (`ftvm primary --accept-join`, `ftvm backup`)
//! over the tcp transport in a network namespace, a file arbiter, client load recording every
//! acknowledged SET. The backup is SIGKILLed, the primary goes on alone, and a new
//! `ftvm backup --join` (no guest image) is cloned from the running VM by live state transfer;
//! then the faults: the primary SIGKILLed (the joined backup goes live), the joiner SIGKILLed
//! in the middle of its transfer (the primary serves on, a retry joins), the old backup of an
//! older generation woken up after the join (it can never go live). Every test ends by reading
//! back every acknowledged write. Needs root and /dev/kvm (prints SKIP otherwise).

mod common;

use std::time::{Duration, Instant};

use ftvm::client::Load;
use ftvm::scenario::{Node, Scenario, Side, EXIT_FENCED, JOIN_PORT};

/// The arbiter's generations 1, 2, … are held by `holders`, in order.
fn assert_generations(s: &Scenario, holders: &[&str]) {
    let want: Vec<(u64, String)> = (1..).zip(holders.iter().map(|h| h.to_string())).collect();
    assert_eq!(s.generations(), want);
}

/// Sends SIG`name` to `node` (kill(1): the child is ours).
fn signal(node: &Node, name: &str) {
    let ok = std::process::Command::new("kill")
        .args([format!("-{name}"), node.pid().to_string()])
        .status()
        .expect("kill(1)");
    assert!(ok.success(), "kill -{name} {}", node.pid());
}

/// The primary accepts joins; both sides up, kv answering.
fn start(tag: &str) -> Scenario {
    let mut c = common::config(tag);
    c.transport = "tcp".into();
    let mut s = Scenario::prepare(c).expect("prepare");
    s.backup = Some(s.spawn(Side::Backup, &[]).expect("backup"));
    let mut extra = Scenario::accept_join_args();
    // Memory digests at every 4th checkpoint too: a joined backup whose memory differed from
    // the primary's would stop as diverged.
    extra.extend(["--mem-digest-every".into(), "4".into()]);
    s.primary = Some(s.spawn(Side::Primary, &extra).expect("primary"));
    s.wait_ready(Duration::from_secs(30)).expect("kv ready");
    s
}

/// The start of most tests: SKIP check, one scenario at a time, the pair (tag `tag`), client
/// load (key prefix `prefix`), the backup killed and the primary alone in generation 2.
fn lone_primary_under_load(
    test: &str,
    tag: &str,
    prefix: &str,
) -> Option<(std::sync::MutexGuard<'static, ()>, Scenario, Load)> {
    if common::skip(test) {
        return None;
    }
    let serial = common::serial();
    let mut s = start(tag);
    let load = common::load(&s, 4, prefix);
    kill_backup(&mut s, &load, 2);
    Some((serial, s, load))
}

/// Kills the backup under load and waits until the primary runs alone in `generation`.
fn kill_backup(s: &mut Scenario, load: &Load, generation: u64) {
    common::wait_ops(s, load, 200, Duration::from_secs(20));
    s.backup.take().expect("backup").kill();
    let primary = s.primary.as_mut().expect("primary");
    let alone = primary
        .wait_line("ALONE", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no ALONE line: {}", primary.stderr_text()));
    assert!(
        alone.contains(&format!("generation {generation}")),
        "{alone}"
    );
    common::wait_ops(s, load, 100, Duration::from_secs(20));
}

/// Starts joiner `name` and waits until it replays (its "joined the primary" line) and the
/// primary reports the join done in `generation`; returns the joiner and the primary's line.
/// `verify`: with `--verify-cut` (the memory digests at the cut compared; costs the pause a
/// digest of guest memory).
fn join(
    s: &mut Scenario,
    (name, heartbeat): (&str, u16),
    generation: u64,
    verify: bool,
) -> (Node, String) {
    let extra: Vec<String> = if verify {
        vec!["--verify-cut".into()]
    } else {
        Vec::new()
    };
    join_with(s, (name, heartbeat, JOIN_PORT), generation, &extra)
}

/// As [`join`], to the side accepting joins on `join_port`, with `extra` flags.
fn join_with(
    s: &mut Scenario,
    (name, heartbeat, join_port): (&str, u16, u16),
    generation: u64,
    extra: &[String],
) -> (Node, String) {
    let verify = extra.iter().any(|a| a == "--verify-cut");
    let mut joiner = s
        .spawn_joiner(name, (heartbeat, join_port), extra)
        .expect("joiner");
    let joined = joiner.wait_line("replaying from exit", Duration::from_secs(60));
    let primary = s.primary.as_mut().expect("primary");
    let done = primary.wait_line("REPROTECTED", Duration::from_secs(10));
    let (Some(joined), Some(done)) = (joined, done) else {
        panic!(
            "the join did not complete\n--- joiner ---\n{}\n{}",
            joiner.stderr_text(),
            s.stderr_of_both()
        );
    };
    assert!(
        done.contains(&format!("as generation {generation}")),
        "{done}"
    );
    // The cloned VM's memory equals the primary's at the cut (--verify-cut: the joiner
    // refuses to pair otherwise).
    assert_eq!(
        joined.contains("equal to the primary's"),
        verify,
        "{joined}"
    );
    eprintln!("{done}\n{joined}");
    (joiner, done)
}

/// kv under load, the backup killed, a new backup joins the lone primary (memory digest equal
/// to the primary's at the cut), the pair runs on (the new backup's digest checks stay quiet),
/// then the primary is killed: the joined backup goes live as generation 4 with every
/// acknowledged write, and the guest powers off cleanly through it.
#[test]
fn a_joined_backup_goes_live_with_every_acked_write_when_the_primary_is_killed() {
    const TEST: &str =
        "a_joined_backup_goes_live_with_every_acked_write_when_the_primary_is_killed";
    let Some((_serial, mut s, mut load)) = lone_primary_under_load(TEST, "rp-live", "a") else {
        return;
    };
    let (joiner, _) = join(&mut s, ("c", 7111), 3, true);
    s.backup = Some(joiner);
    // Under the joined pair, outputs wait for the new backup's acknowledgements.
    common::wait_ops(&s, &load, 300, Duration::from_secs(30));
    let backup = s.backup.as_mut().expect("joiner");
    assert_eq!(
        backup.try_status(),
        None,
        "the joined backup stopped (diverged?): {}",
        backup.stderr_text()
    );
    let t_kill = Instant::now();
    s.primary.take().expect("primary").kill();
    load.mark(Instant::now());
    let first = common::wait_first_reply(&s, &load, Duration::from_secs(20));
    let backup = s.backup.as_mut().expect("joiner");
    let live = backup
        .wait_line("LIVE", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no LIVE line: {}", backup.stderr_text()));
    assert!(live.contains("generation 4"), "{live}");
    eprintln!(
        "{TEST}: first reply {:?} after the kill; {live}",
        first - t_kill
    );
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    let stats = load.stop();
    let report = common::assert_no_acked_write_lost(&s, load.checker());
    assert!(report.checked >= stats.ops.min(800), "{report:?}");
    assert_generations(&s, &["primary", "primary", "primary", "c"]);
    s.shutdown_guest();
    common::assert_exits_with(s.backup.as_mut().expect("joiner"), 0);
    let r = s.report_of("c").expect("joiner report");
    assert!(r["golive"].is_object(), "{r}");
}

/// The joiner is stopped (SIGSTOP) as soon as the primary accepted it, then SIGKILLed, in the
/// middle of its transfer: the primary keeps serving without a client error, and a second
/// joiner then joins.
#[test]
fn a_joiner_killed_mid_transfer_leaves_the_primary_serving_and_a_retry_joins() {
    const TEST: &str = "a_joiner_killed_mid_transfer_leaves_the_primary_serving_and_a_retry_joins";
    let Some((_serial, mut s, mut load)) = lone_primary_under_load(TEST, "rp-kill", "k") else {
        return;
    };
    let mut joiner = s.spawn_joiner("c", (7111, JOIN_PORT), &[]).expect("joiner");
    let primary = s.primary.as_mut().expect("primary");
    primary
        .wait_line("join from c", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no join: {}", joiner.stderr_text()));
    signal(&joiner, "STOP");
    std::thread::sleep(Duration::from_millis(300));
    joiner.kill();
    let primary = s.primary.as_mut().expect("primary");
    let failed = primary
        .wait_line("JOIN FAILED", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no JOIN FAILED line: {}", primary.stderr_text()));
    eprintln!("{TEST}: {failed}");
    assert!(
        primary.find_line("REPROTECTED").is_none(),
        "{}",
        primary.stderr_text()
    );
    load.mark(Instant::now());
    common::wait_first_reply(&s, &load, Duration::from_secs(10));
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    // The retry: a new generation again (the failed join's is spent).
    let generation = if failed.contains("after the cut") {
        5
    } else {
        4
    };
    let (joiner, done) = join(&mut s, ("d", 7112), generation, false);
    eprintln!("{TEST}: {done}");
    s.backup = Some(joiner);
    common::wait_ops(&s, &load, 200, Duration::from_secs(30));
    let stats = load.stop();
    assert_eq!(stats.errors, 0, "client errors: {:?}", load.last_error());
    common::assert_no_acked_write_lost(&s, load.checker());
    s.shutdown_guest();
    common::assert_exits_with(s.primary.as_mut().expect("primary"), 0);
    common::assert_exits_with(s.backup.as_mut().expect("joiner"), 0);
}

/// The first backup is stopped (SIGSTOP) instead of killed: the primary presumes it failed
/// and goes on alone in generation 2, a new backup joins in generation 3; the old backup,
/// woken up (SIGCONT), finds its log link gone and contests generation 2 — held by the
/// primary: it stops fenced and never goes live, while the joined pair serves on.
#[test]
fn a_stale_backup_of_an_older_generation_never_goes_live_after_a_join() {
    const TEST: &str = "a_stale_backup_of_an_older_generation_never_goes_live_after_a_join";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let mut s = start("rp-stale");
    let mut load = common::load(&s, 4, "s");
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    let mut stale = s.backup.take().expect("backup");
    signal(&stale, "STOP");
    let primary = s.primary.as_mut().expect("primary");
    let alone = primary
        .wait_line("ALONE", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no ALONE line: {}", primary.stderr_text()));
    assert!(alone.contains("generation 2"), "{alone}");
    let (joiner, _) = join(&mut s, ("c", 7111), 3, true);
    s.backup = Some(joiner);
    common::wait_ops(&s, &load, 200, Duration::from_secs(30));
    signal(&stale, "CONT");
    let status = stale.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|st| st.code()),
        Some(EXIT_FENCED),
        "{}",
        stale.stderr_text()
    );
    assert!(stale.find_line("LIVE").is_none(), "{}", stale.stderr_text());
    common::wait_ops(&s, &load, 200, Duration::from_secs(30));
    let stats = load.stop();
    assert_eq!(stats.errors, 0, "client errors: {:?}", load.last_error());
    common::assert_no_acked_write_lost(&s, load.checker());
    assert_generations(&s, &["primary", "primary", "primary"]);
    let backup = s.backup.as_mut().expect("joiner");
    assert_eq!(backup.try_status(), None, "{}", backup.stderr_text());
}

/// `--accept-join` on `port` (for a joiner that will accept joins once it went live).
fn accepting(port: u16) -> Vec<String> {
    vec!["--accept-join".into(), format!("127.0.0.1:{port}")]
}

/// Three cycles of failure and re-protection under load: the backup killed, a new backup
/// joins the lone primary; then three times the primary is killed, the joined backup goes live
/// and a new backup joins it (a backup that went live accepts joins without a restart). Every
/// acknowledged write is read back at the end, and the arbiter's generations tell the story.
#[test]
fn three_cycles_of_kill_and_reprotect_lose_no_acked_write() {
    const TEST: &str = "three_cycles_of_kill_and_reprotect_lose_no_acked_write";
    let Some((_serial, mut s, mut load)) = lone_primary_under_load(TEST, "rp-cycle", "y") else {
        return;
    };
    let (joiner, _) = join_with(&mut s, ("c0", 7130, JOIN_PORT), 3, &accepting(7301));
    s.backup = Some(joiner);
    let mut generation = 3;
    for cycle in 0..3u16 {
        common::wait_ops(&s, &load, 200, Duration::from_secs(30));
        let t_kill = Instant::now();
        s.primary.take().expect("primary").kill();
        load.mark(Instant::now());
        let first = common::wait_first_reply(&s, &load, Duration::from_secs(20));
        let live = {
            let b = s.backup.as_mut().expect("backup");
            b.wait_line("LIVE", Duration::from_secs(10))
                .unwrap_or_else(|| panic!("no LIVE line: {}", b.stderr_text()))
        };
        generation += 1;
        assert!(live.contains(&format!("generation {generation}")), "{live}");
        eprintln!(
            "{TEST}: cycle {cycle}: first reply {:?} after the kill; {live}",
            first - t_kill
        );
        s.primary = s.backup.take();
        common::wait_ops(&s, &load, 100, Duration::from_secs(20));
        if cycle < 2 {
            generation += 1;
            let name = format!("c{}", cycle + 1);
            let (joiner, done) = join_with(
                &mut s,
                (&name, 7131 + cycle, 7301 + cycle),
                generation,
                &accepting(7302 + cycle),
            );
            eprintln!("{TEST}: cycle {cycle}: {done}");
            s.backup = Some(joiner);
        }
    }
    common::wait_ops(&s, &load, 200, Duration::from_secs(30));
    let stats = load.stop();
    let report = common::assert_no_acked_write_lost(&s, load.checker());
    assert!(report.checked >= stats.ops.min(1000), "{report:?}");
    assert_generations(
        &s,
        &[
            "primary", "primary", "primary", "c0", "c0", "c1", "c1", "c2",
        ],
    );
    s.shutdown_guest();
    common::assert_exits_with(s.primary.as_mut().expect("last live side"), 0);
}

/// `ftvm demo --cycles 3` as a process: three failovers in a row, a new backup joining the
/// survivor after each of the first two, the clients running throughout; 0 acked writes lost,
/// and the summary has each cycle's failover time and re-protection pause.
#[test]
fn demo_with_three_cycles_reprotects_after_each_failover() {
    const TEST: &str = "demo_with_three_cycles_reprotects_after_each_failover";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("demo.json");
    let out = std::process::Command::new(common::ftvm_bin())
        .args(["demo", "--quiet", "--cycles", "3", "--transport", "tcp"])
        .args(["--kill-after", "1.5", "--run-after", "1", "--report"])
        .arg(&report)
        .output()
        .expect("run ftvm demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("JSON");
    assert_eq!(r["acked_writes_lost"], 0, "{r}");
    assert!(r["acked_writes_checked"].as_u64().unwrap_or(0) > 0, "{r}");
    let cycles = r["cycles"].as_array().expect("cycles");
    assert_eq!(cycles.len(), 3, "{r}");
    for c in &cycles[..2] {
        assert!(
            c["reprotect_pause_ms"].as_f64().unwrap_or(-1.0) >= 0.0,
            "{r}"
        );
    }
    assert!(cycles[2]["reprotect_pause_ms"].is_null(), "{r}");
    // Three failovers and two joins: the last live side holds generation 2 + 2 × 2.
    assert_eq!(r["backup_golive"]["generation"], 6, "{r}");
    eprintln!(
        "{TEST}: {}",
        serde_json::to_string(&r["cycles"]).unwrap_or_default()
    );
}
