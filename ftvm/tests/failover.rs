//! Failover with real processes and real faults: `ftvm primary` and `ftvm backup` of the kv
//! guest in a network namespace with a persistent TAP, a file arbiter, client load recording
//! every acknowledged SET; the faults are SIGKILL, a cut logging link (nftables), a stale
//! primary restarted with its old state, and an unreachable arbiter; `ftvm demo` as a process
//! (file and etcd arbiters, `--shared-disk`). Every test ends by reading back every
//! acknowledged write. Needs root and /dev/kvm (prints SKIP otherwise).

mod common;

use std::time::{Duration, Instant};

use ftvm::scenario::{Scenario, Side, EXIT_FENCED};
use ftvm_ft::{Acquire, Arbiter, ArbiterError, FileArbiter, NodeId};

/// Kills the primary under load: the backup wins generation 2, attaches the TAP and serves;
/// every SET acknowledged before or after the failover is readable; the guest powers off
/// cleanly through the new primary.
#[test]
fn sigkill_primary_backup_goes_live_without_losing_acked_writes() {
    const TEST: &str = "sigkill_primary_backup_goes_live_without_losing_acked_writes";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let mut s = Scenario::start(common::config("kill-p")).expect("start pair");
    let mut load = common::load(&s, 4, "a");
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    let before = load.stats().ops;
    let t_kill = Instant::now();
    let mut primary = s.primary.take().expect("primary");
    primary.kill();
    load.mark(Instant::now());
    let first = common::wait_first_reply(&s, &load, Duration::from_secs(20));
    eprintln!(
        "{TEST}: {before} writes acked before the kill; first reply {:?} after it",
        first - t_kill
    );
    let backup = s.backup.as_mut().expect("backup");
    let live = backup
        .wait_line("LIVE", Duration::from_secs(5))
        .expect("the backup prints its LIVE line");
    assert!(live.contains("generation 2"), "{live}");
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    let stats = load.stop();
    let report = common::assert_no_acked_write_lost(&s, load.checker());
    assert!(report.checked >= stats.ops.min(400), "{report:?}");
    assert_eq!(
        s.generations(),
        vec![(1, "primary".to_string()), (2, "backup".to_string())]
    );
    s.shutdown_guest();
    common::assert_exits_with(s.backup.as_mut().expect("backup"), 0);
    let b = s.report(Side::Backup).expect("backup report");
    assert!(b["golive"].is_object(), "{b}");
}

/// Kills the backup under load: the primary wins generation 2 and carries on alone; the
/// clients see no error at all.
#[test]
fn sigkill_backup_primary_continues_alone_without_client_errors() {
    const TEST: &str = "sigkill_backup_primary_continues_alone_without_client_errors";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let mut s = Scenario::start(common::config("kill-b")).expect("start pair");
    let mut load = common::load(&s, 4, "b");
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    s.backup.take().expect("backup").kill();
    load.mark(Instant::now());
    common::wait_first_reply(&s, &load, Duration::from_secs(20));
    let primary = s.primary.as_mut().expect("primary");
    let alone = primary
        .wait_line("ALONE", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no ALONE line: {}", primary.stderr_text()));
    assert!(alone.contains("generation 2"), "{alone}");
    common::wait_ops(&s, &load, 300, Duration::from_secs(20));
    let stats = load.stop();
    assert_eq!(
        stats.errors,
        0,
        "clients saw errors: {:?}",
        load.last_error()
    );
    common::assert_no_acked_write_lost(&s, load.checker());
    assert_eq!(
        s.generations(),
        vec![(1, "primary".to_string()), (2, "primary".to_string())]
    );
    s.shutdown_guest();
    common::assert_exits_with(s.primary.as_mut().expect("primary"), 0);
}

/// Cuts the logging link and the heartbeats with both sides alive (nftables drops the tcp
/// transport's and the heartbeats' packets inside the namespace; the clients' traffic on the
/// TAP is untouched): both presume the other failed, both go for generation 2, exactly one
/// wins and serves; the other stops with the fenced status. No acknowledged write is lost.
///
/// Both sides have the same failure timeout (pairing refuses different ones, see
/// `pairing.rs`): they presume each other failed at about the same moment and race for
/// generation 2 on the arbiter. Either may win; exactly one does.
#[test]
fn cut_link_symmetric_timeouts_exactly_one_side_goes_live() {
    cut_link(
        "cut_link_symmetric_timeouts_exactly_one_side_goes_live",
        &[],
    );
}

/// The link-cut scenario; `backup_extra`: extra arguments of the backup.
fn cut_link(test: &str, backup_extra: &[String]) {
    if common::skip(test) || common::skip_without(test, "nft", "nftables") {
        return;
    }
    let _serial = common::serial();
    let mut config = common::config("cut");
    config.transport = "tcp".into();
    let mut s = Scenario::prepare(config).expect("prepare pair");
    s.backup = Some(s.spawn(Side::Backup, backup_extra).expect("spawn backup"));
    s.primary = Some(s.spawn(Side::Primary, &[]).expect("spawn primary"));
    s.wait_ready(Duration::from_secs(30)).expect("kv answers");
    let mut load = common::load(&s, 4, "c");
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    let log = ftvm::scenario::LOG_PORT.to_string();
    let hb = format!(
        "{{ {}, {} }}",
        ftvm::scenario::BACKUP_HEARTBEAT_PORT,
        ftvm::scenario::PRIMARY_HEARTBEAT_PORT
    );
    let nft: [&[&str]; 5] = [
        &["add", "table", "inet", "ftvmcut"],
        &[
            "add",
            "chain",
            "inet",
            "ftvmcut",
            "input",
            "{ type filter hook input priority 0 ; }",
        ],
        &[
            "add", "rule", "inet", "ftvmcut", "input", "tcp", "dport", &log, "drop",
        ],
        &[
            "add", "rule", "inet", "ftvmcut", "input", "tcp", "sport", &log, "drop",
        ],
        &[
            "add", "rule", "inet", "ftvmcut", "input", "udp", "dport", &hb, "drop",
        ],
    ];
    common::nft(&s, &nft);
    let t_cut = Instant::now();
    load.mark(t_cut);
    // One side stops (lost the arbiter), the other goes live.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (loser, winner) = loop {
        let p = s.primary.as_mut().expect("primary").try_status();
        let b = s.backup.as_mut().expect("backup").try_status();
        match (p, b) {
            (Some(st), None) => break (st, Side::Backup),
            (None, Some(st)) => break (st, Side::Primary),
            (Some(a), Some(b)) => panic!("both sides stopped ({a}, {b})\n{}", s.stderr_of_both()),
            (None, None) => {}
        }
        assert!(
            Instant::now() < deadline,
            "neither side stopped after the cut\n{}",
            s.stderr_of_both()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(loser.code(), Some(EXIT_FENCED), "{}", s.stderr_of_both());
    let (winner_node, loser_node, needle) = match winner {
        Side::Primary => (s.primary.as_mut(), s.backup.as_ref(), "ALONE"),
        Side::Backup => (s.backup.as_mut(), s.primary.as_ref(), "LIVE"),
    };
    let loser_text = loser_node.expect("loser").stderr_text();
    assert!(loser_text.contains("FENCED"), "{loser_text}");
    let line = winner_node
        .expect("winner")
        .wait_line(needle, Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!(
                "the winner printed no {needle} line\n{}",
                s.stderr_of_both()
            )
        });
    assert!(line.contains("generation 2"), "{line}");
    let first = common::wait_first_reply(&s, &load, Duration::from_secs(20));
    eprintln!(
        "{test}: the {} won generation 2, first reply {:?} after the cut; {line}",
        winner.name(),
        first.saturating_duration_since(t_cut)
    );
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    load.stop();
    let gens = s.generations();
    assert_eq!(gens.len(), 2, "{gens:?}");
    assert_eq!(gens[1], (2, winner.name().to_string()), "{gens:?}");
    common::assert_no_acked_write_lost(&s, load.checker());
    let node = match winner {
        Side::Primary => s.primary.as_mut(),
        Side::Backup => s.backup.as_mut(),
    }
    .expect("winner");
    assert!(node.try_status().is_none(), "the winner is still running");
}

/// After a failover, the killed primary is restarted with its old state (generation 1, its
/// old disk): it is fenced by the arbiter's generation 2, exits with the fenced status and
/// releases no output (its console stays empty, the new primary keeps serving every write).
#[test]
fn restarted_stale_primary_is_fenced_and_releases_nothing() {
    const TEST: &str = "restarted_stale_primary_is_fenced_and_releases_nothing";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let mut s = Scenario::start(common::config("stale")).expect("start pair");
    let mut load = common::load(&s, 2, "d");
    common::wait_ops(&s, &load, 100, Duration::from_secs(20));
    s.primary.take().expect("primary").kill();
    load.mark(Instant::now());
    common::wait_first_reply(&s, &load, Duration::from_secs(20));
    let console = s.dir().join("p.console");
    let _ = std::fs::remove_file(&console);
    let mut stale = s.spawn(Side::Primary, &[]).expect("restart primary");
    common::assert_exits_with(&mut stale, EXIT_FENCED);
    let text = stale.stderr_text();
    assert!(
        text.contains("FENCED") && text.contains("generation 2"),
        "{text}"
    );
    assert!(
        std::fs::read(&console).map_or(true, |c| c.is_empty()),
        "the stale primary released console output"
    );
    let before = load.stats().ops;
    common::wait_ops(&s, &load, 100, Duration::from_secs(20));
    assert!(load.stats().ops > before);
    load.stop();
    common::assert_no_acked_write_lost(&s, load.checker());
    assert_eq!(s.generations().last().map(|g| g.0), Some(2));
}

/// A primary started in generation 1 while the arbiter already holds generation 2 is fenced
/// before it opens anything (no VM, no TAP, no console).
#[test]
fn primary_of_an_old_generation_is_fenced_at_start() {
    const TEST: &str = "primary_of_an_old_generation_is_fenced_at_start";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let s = Scenario::prepare(common::config("oldgen")).expect("prepare");
    let arbiter = FileArbiter::new(s.arbiter_dir());
    let other = NodeId::new("backup").expect("node id");
    assert_eq!(arbiter.try_acquire(2, &other).expect("claim"), Acquire::Won);
    let mut p = s.spawn(Side::Primary, &[]).expect("spawn primary");
    common::assert_exits_with(&mut p, EXIT_FENCED);
    assert!(p.stderr_text().contains("FENCED"), "{}", p.stderr_text());
    assert!(!s.dir().join("p.console").exists());
    assert_eq!(s.generations(), vec![(2, "backup".to_string())]);
}

/// The arbiter's directory becomes unreachable (moved away), then the primary is killed: the
/// backup presumes it failed but does not go live while it cannot win the generation (no
/// client reply, no generation file); once the directory is back it goes live, and no
/// acknowledged write is lost.
#[test]
fn unreachable_arbiter_keeps_both_sides_from_going_live_until_it_returns() {
    const TEST: &str = "unreachable_arbiter_keeps_both_sides_from_going_live_until_it_returns";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let mut s = Scenario::start(common::config("noarb")).expect("start pair");
    let mut load = common::load(&s, 2, "e");
    common::wait_ops(&s, &load, 100, Duration::from_secs(20));
    let dir = s.arbiter_dir();
    let away = s.dir().join("arbiter.away");
    std::fs::rename(&dir, &away).expect("move the arbiter directory away");
    s.primary.take().expect("primary").kill();
    load.mark(Instant::now());
    // The backup presumed the primary failed and is claiming the next generation: waiting.
    let backup = s.backup.as_mut().expect("backup");
    assert!(
        backup
            .wait_line(
                "arbiter unreachable: waiting, not going live",
                Duration::from_secs(20)
            )
            .is_some(),
        "the backup never tried the arbiter: {}",
        backup.stderr_text()
    );
    assert!(
        backup.try_status().is_none(),
        "the backup gave up: {}",
        backup.stderr_text()
    );
    assert!(
        backup.find_line("LIVE").is_none(),
        "went live without the arbiter: {}",
        backup.stderr_text()
    );
    assert_eq!(
        load.first_reply_after_mark(),
        None,
        "a client was answered with no live side"
    );
    std::fs::rename(&away, &dir).expect("bring the arbiter directory back");
    common::wait_first_reply(&s, &load, Duration::from_secs(20));
    common::wait_ops(&s, &load, 100, Duration::from_secs(20));
    load.stop();
    common::assert_no_acked_write_lost(&s, load.checker());
    assert_eq!(
        s.generations(),
        vec![(1, "primary".to_string()), (2, "backup".to_string())]
    );
}

/// `ftvm demo` end to end (the README's main command), shortened, with `extra` flags: it exits
/// 0 and its report shows a failover, checked writes and none lost.
fn run_demo(extra: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("demo.json");
    let out = std::process::Command::new(common::ftvm_bin())
        .args(["demo", "--quiet", "--kill-after", "1.5", "--run-after", "1"])
        .args(extra)
        .arg("--report")
        .arg(&report)
        .output()
        .expect("run ftvm demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("--- ftvm demo summary ---"), "{stderr}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("JSON");
    assert_eq!(r["acked_writes_lost"], 0, "{r}");
    assert!(r["acked_writes_checked"].as_u64().unwrap_or(0) > 0, "{r}");
    assert!(r["failover_ms"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
    assert!(r["ops_per_s_after"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
    assert_eq!(r["backup_golive"]["generation"], 2, "{r}");
    r
}

#[test]
fn demo_command_fails_over_and_loses_no_acked_write() {
    const TEST: &str = "demo_command_fails_over_and_loses_no_acked_write";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let r = run_demo(&[]);
    assert!(
        r["arbiter"].as_str().unwrap_or("").starts_with("file:"),
        "{r}"
    );
    assert_eq!(r["disk_mode"], "own-copy", "{r}");
    assert!(r["shared_disk"].is_null(), "{r}");
}

/// The demo with `--arbiter etcd` (a local etcd in the demo's namespace): the test-and-set is
/// an etcd transaction; same outcome.
#[test]
fn demo_with_etcd_arbiter_fails_over_and_loses_no_acked_write() {
    const TEST: &str = "demo_with_etcd_arbiter_fails_over_and_loses_no_acked_write";
    if common::skip(TEST) {
        return;
    }
    if common::skip_without(TEST, "etcd", "etcd-server") {
        return;
    }
    let _serial = common::serial();
    let r = run_demo(&["--arbiter", "etcd"]);
    assert!(
        r["arbiter"].as_str().unwrap_or("").starts_with("etcd:"),
        "{r}"
    );
}

/// The demo with `--shared-disk`: both sides name one image, the backup drops the primary's
/// disk writes while it replays and writes the image itself once live; after the run `kv`
/// booted alone on that image recovers every acknowledged write from its log.
#[test]
fn demo_shared_disk_fails_over_and_the_disk_keeps_every_acked_write() {
    const TEST: &str = "demo_shared_disk_fails_over_and_the_disk_keeps_every_acked_write";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let r = run_demo(&["--shared-disk"]);
    assert_eq!(r["disk_mode"], "shared", "{r}");
    assert!(r["acked_writes"].as_u64().unwrap_or(0) > 0, "{r}");
    let d = &r["shared_disk"];
    assert_eq!(d["acked_writes_lost"], 0, "{r}");
    let checked = r["acked_writes_checked"].as_u64().unwrap_or(0);
    assert_eq!(d["acked_writes_checked"].as_u64(), Some(checked), "{r}");
    // Every acknowledged key is in the log on the image (keys are unique per write; writes
    // that reached the disk but whose reply was lost with the primary may add more).
    assert!(d["keys_recovered"].as_u64().unwrap_or(0) >= checked, "{r}");
    let c = &d["backup_disk"];
    assert!(
        c["dropped"].as_u64().unwrap_or(0) > 0,
        "the backup replayed no disk write: {r}"
    );
    assert!(
        c["writes"].as_u64().unwrap_or(0) > 0,
        "the live backup wrote nothing: {r}"
    );
    assert_eq!(
        d["image_bytes"].as_u64(),
        Some(ftvm::scenario::DISK_SIZE),
        "{r}"
    );
}

/// The arbiter is a three-member etcd cluster. While the pair runs under load, the member both
/// sides' arbiter clients use (the first endpoint they try, and the leader at start) crashes
/// (SIGKILL): the pair keeps serving (it needs the arbiter only for a failover). Then the
/// primary is killed: the backup wins generation 2 through an etcd transaction the two
/// surviving members agree on, goes live, the clients carry on, and no acknowledged write is
/// lost.
#[test]
fn etcd_member_down_sigkill_primary_backup_goes_live_without_losing_acked_writes() {
    const TEST: &str =
        "etcd_member_down_sigkill_primary_backup_goes_live_without_losing_acked_writes";
    if common::skip(TEST) || common::skip_without(TEST, "etcd", "etcd-server") {
        return;
    }
    let _serial = common::serial();
    let mut config = common::config("etcd3");
    config.arbiter = Some("etcd3".into());
    let mut s = Scenario::start(config).expect("start pair");
    let endpoints = s.etcd_endpoints();
    assert_eq!(endpoints.len(), 3, "{endpoints:?}");
    assert!(
        s.arbiter_spec()
            .starts_with(&format!("etcd:{}#", endpoints.join(","))),
        "{}",
        s.arbiter_spec()
    );
    let mut load = common::load(&s, 4, "f");
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    let leader = s.etcd_leader();
    let pid = s
        .kill_etcd_member(0)
        .expect("kill etcd member")
        .expect("member 0 was running");
    eprintln!(
        "{TEST}: SIGKILLed etcd member {} (pid {pid}, {})",
        endpoints[0],
        if leader == Some(0) {
            "the leader"
        } else {
            "a follower"
        }
    );
    // Both sides still live: the pair goes on without the arbiter.
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    let t_kill = Instant::now();
    s.primary.take().expect("primary").kill();
    load.mark(Instant::now());
    let first = common::wait_first_reply(&s, &load, Duration::from_secs(20));
    let backup = s.backup.as_mut().expect("backup");
    let live = backup
        .wait_line("LIVE", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no LIVE line: {}", backup.stderr_text()));
    eprintln!(
        "{TEST}: first reply {:?} after the primary's kill; {live}",
        first - t_kill
    );
    assert!(live.contains("generation 2"), "{live}");
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    let stats = load.stop();
    let report = common::assert_no_acked_write_lost(&s, load.checker());
    assert!(report.checked >= stats.ops.min(400), "{report:?}");
    // The claim is in etcd: read back (past the dead first endpoint) from the survivors, who
    // have a leader other than the dead member.
    let spec = s.arbiter_spec().to_string();
    let current = s
        .in_netns(move || ftvm_ft::arbiter::open(&spec).and_then(|a| a.current()))
        .expect("enter namespace")
        .unwrap_or_else(|e: ArbiterError| panic!("read the claim from etcd: {e}"));
    assert_eq!(
        current,
        Some((2, NodeId::new("backup").expect("node id"))),
        "{}",
        s.stderr_of_both()
    );
    let new_leader = s.etcd_leader();
    assert!(
        new_leader.is_some_and(|l| l != 0),
        "survivors' leader: {new_leader:?}"
    );
    s.shutdown_guest();
    common::assert_exits_with(s.backup.as_mut().expect("backup"), 0);
}
