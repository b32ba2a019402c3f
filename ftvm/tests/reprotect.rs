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
use ftvm::exit::STOPPED;
use ftvm::scenario::{Node, Scenario, ScenarioConfig, Side, EXIT_FENCED, JOIN_PORT};

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

/// The pair of these tests (tag `tag`): kv over the tcp transport, a file arbiter.
fn tcp_config(tag: &str) -> ScenarioConfig {
    let mut c = common::config(tag);
    c.transport = "tcp".into();
    c
}

/// The primary accepts joins; both sides up, kv answering.
fn start(c: ScenarioConfig) -> Scenario {
    let mut s = Scenario::prepare(c).expect("prepare");
    s.backup = Some(s.spawn(Side::Backup, &[]).expect("backup"));
    let mut extra = Scenario::accept_join_args();
    // A register digest every 250 exits, memory digests at every 8th checkpoint too: a
    // joined backup whose state differed from the primary's would stop as diverged.
    extra.extend(["--digest-interval", "250", "--mem-digest-every", "8"].map(String::from));
    s.primary = Some(s.spawn(Side::Primary, &extra).expect("primary"));
    s.wait_ready(Duration::from_secs(30)).expect("kv ready");
    s
}

/// The start of most tests: SKIP check, one scenario at a time, the pair (`c`), client
/// load (key prefix `prefix`), the backup killed and the primary alone in generation 2.
fn lone_primary_under_load(
    test: &str,
    c: ScenarioConfig,
    prefix: &str,
) -> Option<(std::sync::MutexGuard<'static, ()>, Scenario, Load)> {
    if common::skip(test) {
        return None;
    }
    let serial = common::serial();
    let mut s = start(c);
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

/// Waits (at most `within`) for the primary's JOIN FAILED line and returns it; panics
/// without one, or if the primary re-protected meanwhile.
fn join_failed(s: &mut Scenario, within: Duration) -> String {
    let primary = s.primary.as_mut().expect("primary");
    let failed = primary
        .wait_line("JOIN FAILED", within)
        .unwrap_or_else(|| panic!("no JOIN FAILED line: {}", primary.stderr_text()));
    assert!(
        primary.find_line("REPROTECTED").is_none(),
        "{}",
        primary.stderr_text()
    );
    failed
}

/// A joiner whose join failed exits with an error (within 60 s) and prints `needle`.
fn assert_join_fails(joiner: &mut Node, needle: &str) {
    let status = joiner.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|st| !st.success()),
        "the joiner did not fail ({status:?}): {}",
        joiner.stderr_text()
    );
    assert!(
        joiner.stderr_text().contains(needle),
        "no {needle:?}: {}",
        joiner.stderr_text()
    );
}

/// Ends a run in which joiner `name` is the backup: no client error, every acknowledged
/// write read back, the guest powered off through both sides (exit 0); the joined backup
/// compared its register and memory digests at every checkpoint of the run without a
/// divergence (it would have stopped), and powered off with the primary's memory digest.
fn power_off_as_one(s: &mut Scenario, load: &mut Load, name: &str) {
    common::wait_ops(s, load, 400, Duration::from_secs(30));
    let stats = load.stop();
    assert_eq!(stats.errors, 0, "client errors: {:?}", load.last_error());
    common::assert_no_acked_write_lost(s, load.checker());
    s.shutdown_guest();
    common::assert_exits_with(s.primary.as_mut().expect("primary"), 0);
    common::assert_exits_with(s.backup.as_mut().expect("joiner"), 0);
    let p = s.report(Side::Primary).expect("primary report");
    let b = s.report_of(name).expect("joiner report");
    assert!(b["checkpoints"].as_u64().unwrap_or(0) > 0, "{b}");
    assert_eq!(p["mem_digest"], b["mem_digest"], "{p}\n{b}");
    assert_eq!(p["regs_digest"], b["regs_digest"], "{p}\n{b}");
}

/// kv under load, the backup killed, a new backup joins the lone primary (memory digest equal
/// to the primary's at the cut), the pair runs on (the new backup's digest checks stay quiet),
/// then the primary is killed: the joined backup goes live as generation 4 with every
/// acknowledged write, and the guest powers off cleanly through it.
#[test]
fn a_joined_backup_goes_live_with_every_acked_write_when_the_primary_is_killed() {
    joined_backup_goes_live(
        "a_joined_backup_goes_live_with_every_acked_write_when_the_primary_is_killed",
        tcp_config("rp-live"),
    );
}

/// As above with the `shm` transport: the joined pair's log runs over rings of its own
/// (`<prefix>.g3`), not over the join's connection.
#[test]
fn a_join_over_shm_goes_live_with_every_acked_write_when_the_primary_is_killed() {
    let mut c = common::config("rp-shm");
    c.transport = "shm".into();
    joined_backup_goes_live(
        "a_join_over_shm_goes_live_with_every_acked_write_when_the_primary_is_killed",
        c,
    );
}

/// As above with the `xdp` transport: the joiner opens AF_XDP on the backup's veth end, the
/// primary again on its own after the transfer.
#[cfg(feature = "xdp")]
#[test]
fn a_join_over_xdp_goes_live_with_every_acked_write_when_the_primary_is_killed() {
    let mut c = common::config("rp-xdp");
    c.transport = "xdp".into();
    joined_backup_goes_live(
        "a_join_over_xdp_goes_live_with_every_acked_write_when_the_primary_is_killed",
        c,
    );
}

/// A joiner `c` joins the lone primary (config `c`) under load, the primary is killed: the
/// joined backup goes live in generation 4 with every acknowledged write, and the guest powers
/// off cleanly through it.
fn joined_backup_goes_live(test: &str, c: ScenarioConfig) {
    let Some((_serial, mut s, mut load)) = lone_primary_under_load(test, c, "a") else {
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
        "{test}: first reply {:?} after the kill; {live}",
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
    let Some((_serial, mut s, mut load)) =
        lone_primary_under_load(TEST, tcp_config("rp-kill"), "k")
    else {
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
    let failed = join_failed(&mut s, Duration::from_secs(30));
    eprintln!("{TEST}: {failed}");
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
    let mut s = start(tcp_config("rp-stale"));
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
    let Some((_serial, mut s, mut load)) =
        lone_primary_under_load(TEST, tcp_config("rp-cycle"), "y")
    else {
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
    // The last live side (a joiner that went live, accepting joins) ran the primary's throttle
    // until the guest powered off, full speed while alone.
    let r = s.report_of("c2").expect("c2's report");
    assert_eq!(r["went_live"], true, "{r}");
    assert_eq!(r["throttle"]["enabled"], true, "{r}");
    assert_eq!(r["throttle"]["share"], 1.0, "{r}");
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

/// The link between the primary and a joiner dies in the middle of the transfer: an nftables
/// rule in the namespace drops every packet of the join's TCP connection, both ways, once 4 MB
/// of it went through (a named quota: the cut is real and always falls in the pre-copy of the
/// 64 MiB guest). No FIN, no RST: the primary's join gives up after its patience (its writes
/// time out; before the fix they blocked until TCP gave up, ~15 minutes, and no retry could be
/// served), the joiner too; the primary serves the clients throughout. The link comes back, a
/// second joiner joins in a new generation, and the pair powers off as one.
#[test]
fn a_link_cut_mid_transfer_leaves_the_primary_serving_and_a_retry_joins() {
    const TEST: &str = "a_link_cut_mid_transfer_leaves_the_primary_serving_and_a_retry_joins";
    if common::skip_without(TEST, "nft", "nftables") {
        return;
    }
    let Some((_serial, mut s, mut load)) = lone_primary_under_load(TEST, tcp_config("rp-cut"), "l")
    else {
        return;
    };
    let port = JOIN_PORT.to_string();
    common::nft(
        &s,
        &[
            &["add", "table", "inet", "ftvmjoin"],
            &[
                "add",
                "quota",
                "inet",
                "ftvmjoin",
                "link",
                "{ over 4 mbytes }",
            ],
            &[
                "add",
                "chain",
                "inet",
                "ftvmjoin",
                "output",
                "{ type filter hook output priority 0 ; }",
            ],
            &[
                "add", "rule", "inet", "ftvmjoin", "output", "tcp", "sport", &port, "quota",
                "name", "link", "drop",
            ],
            &[
                "add", "rule", "inet", "ftvmjoin", "output", "tcp", "dport", &port, "quota",
                "name", "link", "drop",
            ],
        ],
    );
    let mut joiner = s.spawn_joiner("c", (7111, JOIN_PORT), &[]).expect("joiner");
    let primary = s.primary.as_mut().expect("primary");
    primary
        .wait_line("join from c", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no join: {}", joiner.stderr_text()));
    // The primary serves on while its join hangs on the dead link.
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    let t_cut = Instant::now();
    let failed = join_failed(&mut s, Duration::from_secs(45));
    eprintln!("{TEST}: {:?} after the join: {failed}", t_cut.elapsed());
    assert!(failed.contains("before the cut"), "{failed}");
    assert_join_fails(&mut joiner, "cannot join the primary");
    load.mark(Instant::now());
    common::wait_first_reply(&s, &load, Duration::from_secs(10));
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    // The link comes back; the failed join spent generation 3.
    common::nft(&s, &[&["delete", "table", "inet", "ftvmjoin"]]);
    let (joiner, _) = join(&mut s, ("d", 7112), 4, true);
    s.backup = Some(joiner);
    assert_generations(&s, &["primary"; 4]);
    power_off_as_one(&mut s, &mut load, "d");
}

/// The arbiter (a single etcd member) is down when a backup asks to join: the primary cannot
/// win the next generation, refuses the join (the joiner says why and exits) and serves on
/// alone — it needs no arbiter while it runs. etcd is started again on its data, a second
/// joiner joins in generation 3 (the refused join spent none), etcd names the primary as its
/// holder, and the pair powers off as one.
#[test]
fn an_unreachable_arbiter_refuses_the_join_and_a_retry_joins_once_it_is_back() {
    const TEST: &str = "an_unreachable_arbiter_refuses_the_join_and_a_retry_joins_once_it_is_back";
    if common::skip_without(TEST, "etcd", "etcd-server") {
        return;
    }
    let mut c = tcp_config("rp-etcd");
    c.arbiter = Some("etcd".into());
    let Some((_serial, mut s, mut load)) = lone_primary_under_load(TEST, c, "e") else {
        return;
    };
    s.kill_etcd_member(0)
        .expect("kill etcd")
        .expect("etcd was running");
    let mut joiner = s.spawn_joiner("c", (7111, JOIN_PORT), &[]).expect("joiner");
    let failed = join_failed(&mut s, Duration::from_secs(30));
    eprintln!("{TEST}: {failed}");
    assert!(failed.contains("before the cut"), "{failed}");
    assert_join_fails(&mut joiner, "refused the join (Arbiter)");
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    s.restart_etcd_member(0).expect("restart etcd");
    let (joiner, _) = join(&mut s, ("d", 7112), 3, true);
    s.backup = Some(joiner);
    let spec = s.arbiter_spec().to_string();
    let current = s
        .in_netns(move || ftvm_ft::arbiter::open(&spec).and_then(|a| a.current()))
        .expect("enter namespace")
        .expect("read the claim from etcd");
    assert_eq!(
        current.map(|(g, n)| (g, n.to_string())),
        Some((3, "primary".to_string()))
    );
    power_off_as_one(&mut s, &mut load, "d");
}

/// Shared-disk mode: both sides name one image. A join copies memory only (no disk byte), the
/// disk's owner record goes to the new pair's generation with the primary as its only
/// writer: the joined backup replays the guest's disk writes without making them, with every
/// digest check quiet, and powers off with the primary's memory.
#[test]
fn a_join_in_shared_disk_mode_copies_no_disk_and_the_primary_keeps_writing_it() {
    const TEST: &str = "a_join_in_shared_disk_mode_copies_no_disk_and_the_primary_keeps_writing_it";
    let mut c = tcp_config("rp-share");
    c.shared_disk = true;
    let Some((_serial, mut s, mut load)) = lone_primary_under_load(TEST, c, "d") else {
        return;
    };
    let image = s.disk(Side::Primary);
    let owner = || {
        let b = std::fs::read(format!("{}.owner", image.display())).expect("owner record");
        u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
    };
    assert_eq!(owner(), 2, "the lone primary owns the disk");
    let (joiner, _) = join(&mut s, ("c", 7111), 3, true);
    let joined = joiner
        .find_line("replaying from exit")
        .expect("joined line");
    assert!(joined.contains(", 0.0 MB of disk"), "{joined}");
    s.backup = Some(joiner);
    common::wait_ops(&s, &load, 300, Duration::from_secs(30));
    assert_eq!(owner(), 3, "the pair's generation, taken by the primary");
    power_off_as_one(&mut s, &mut load, "c");
    let b = s.report_of("c").expect("joiner report");
    assert!(
        b["shared_disk"]["dropped"].as_u64().unwrap_or(0) > 0,
        "the joined backup replayed no disk write: {b}"
    );
    assert_eq!(b["shared_disk"]["writes"].as_u64(), Some(0), "{b}");
}

/// Shared-disk mode, a careless joiner: it names a copy of the image (taken with its owner
/// record while the primary ran alone in generation 2) instead of the image. The CUT names the
/// image the primary owns in generation 3; the joiner finds generation 2 in its copy's record,
/// refuses to pair and exits; the primary's join fails after the cut, it goes alone again
/// (generation 4) and serves on; a joiner naming the image then joins (generation 5).
#[test]
fn a_joiner_naming_a_copy_of_the_shared_image_refuses_to_pair() {
    const TEST: &str = "a_joiner_naming_a_copy_of_the_shared_image_refuses_to_pair";
    let mut c = tcp_config("rp-copy");
    c.shared_disk = true;
    let Some((_serial, mut s, mut load)) = lone_primary_under_load(TEST, c, "w") else {
        return;
    };
    let image = s.disk(Side::Primary);
    let copy = image.with_extension("copy.img");
    std::fs::copy(&image, &copy).expect("copy the image");
    std::fs::copy(
        format!("{}.owner", image.display()),
        format!("{}.owner", copy.display()),
    )
    .expect("copy the owner record");
    let extra = ["--disk".to_string(), copy.display().to_string()];
    let mut joiner = s
        .spawn_joiner("c", (7111, JOIN_PORT), &extra)
        .expect("joiner");
    let failed = join_failed(&mut s, Duration::from_secs(45));
    assert!(failed.contains("after the cut"), "{failed}");
    assert_join_fails(&mut joiner, "owner record holds generation 2");
    let primary = s.primary.as_mut().expect("primary");
    primary
        .wait_line("generation 4", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("not alone again: {}", primary.stderr_text()));
    load.mark(Instant::now());
    common::wait_first_reply(&s, &load, Duration::from_secs(10));
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    let (joiner, _) = join(&mut s, ("d", 7112), 5, true);
    s.backup = Some(joiner);
    assert_generations(&s, &["primary"; 5]);
    power_off_as_one(&mut s, &mut load, "d");
}

/// What a join of the `stream` guest dirtying 24 MiB without pause cost (from the primary's
/// REPROTECTED line): pre-copy rounds, pages copied at the cut, the lowest vCPU share, the
/// pause.
#[derive(Debug)]
struct DirtyJoin {
    rounds: u32,
    final_pages: u64,
    min_share: f64,
    pause_ms: f64,
    line: String,
}

/// The number after `key` in `line`.
fn number_after(line: &str, key: &str) -> f64 {
    let rest = &line[line
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?}: {line}"))
        + key.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key:?}: {line}"))
}

/// Most pre-copy rounds in [`join_dirtying_guest`].
const DIRTY_MAX_ROUNDS: u32 = 8;

/// A pair running `stream dirty=24M` (its vCPU rewrites 6144 pages as fast as it runs), with
/// `primary` and `backup` added to each side's flags; returns once the guest's sink is on.
fn dirtying_pair(tag: &str, primary: &[String], backup: &[String]) -> Scenario {
    let mut c = tcp_config(tag);
    c.guest = "stream".into();
    c.cmdline = Some("ip=10.0.2.15/24 gw=10.0.2.1 dirty=24M".into());
    let mut s = Scenario::prepare(c).expect("prepare");
    s.backup = Some(s.spawn(Side::Backup, backup).expect("backup"));
    s.primary = Some(s.spawn(Side::Primary, primary).expect("primary"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s.console(Some(Side::Primary)).contains("stream: sink on") {
        assert!(
            Instant::now() < deadline,
            "no stream guest\n{}",
            s.stderr_of_both()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

/// The flags of a side that serves joins of the dirtying guest on `port`: at most
/// [`DIRTY_MAX_ROUNDS`] pre-copy rounds, auto-converge `lever`.
fn dirty_join_args(port: u16, lever: bool) -> Vec<String> {
    let mut extra = accepting(port);
    extra.extend([
        "--join-max-rounds".into(),
        DIRTY_MAX_ROUNDS.to_string(),
        "--join-auto-converge".into(),
        lever.to_string(),
    ]);
    extra
}

/// The lone side of [`dirtying_pair`] (now `s.primary`) serves a join on `join_port` over a
/// 400 Mbit/s link (a token bucket on the namespace's loopback, which carries the join: slower
/// than the guest dirties its region, ~100 MB/s under nested paging here); joiner `c` (heartbeat
/// `heartbeat`) pairs in `generation` and replays without diverging. Returns the joiner and
/// what the join cost.
fn join_over_slow_link(
    s: &mut Scenario,
    (heartbeat, join_port): (u16, u16),
    generation: u64,
) -> (Node, DirtyJoin) {
    let tc = s
        .netns()
        .exec(
            "tc",
            &[
                "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "400mbit", "burst", "1mb",
                "latency", "100ms",
            ],
        )
        .expect("run tc");
    assert!(tc.status.success(), "tc: {tc:?}");
    let (mut joiner, line) = join_with(s, ("c", heartbeat, join_port), generation, &[]);
    // The joined backup replays the dirtying guest without diverging.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(joiner.try_status(), None, "{}", joiner.stderr_text());
    let primary = s.primary.as_ref().expect("primary");
    let rounds: Vec<String> = primary
        .lines()
        .into_iter()
        .filter(|l| l.contains("join round") || l.contains("throttle started"))
        .collect();
    eprintln!("{}", rounds.join("\n"));
    let join = DirtyJoin {
        rounds: number_after(&line, &format!("generation {generation}: ")) as u32,
        final_pages: number_after(&line, "ms (") as u64,
        min_share: number_after(&line, "lowest vCPU share "),
        pause_ms: number_after(&line, "pause "),
        line,
    };
    (joiner, join)
}

/// [`dirtying_pair`], the primary accepting joins (auto-converge `lever`); the backup killed, a
/// new backup joins the lone primary.
fn join_dirtying_guest(tag: &str, lever: bool) -> DirtyJoin {
    let mut s = dirtying_pair(tag, &dirty_join_args(JOIN_PORT, lever), &[]);
    s.backup.take().expect("backup").kill();
    let primary = s.primary.as_mut().expect("primary");
    primary
        .wait_line("ALONE", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no ALONE line: {}", primary.stderr_text()));
    join_over_slow_link(&mut s, (7111, JOIN_PORT), 3).1
}

/// Auto-converge: the `stream` guest dirties 24 MiB faster than a 400 Mbit/s link copies it, so
/// pre-copy never converges by itself. Without the lever the join runs all
/// [`DIRTY_MAX_ROUNDS`] rounds and copies the whole region at the cut; with it the primary
/// lowers the vCPU's CPU share round by round (the throttle's cgroup quota), pre-copy
/// converges in fewer rounds, and far fewer pages are left for the cut. (The pause itself
/// is printed, not asserted: `ftvm-bench reprotect` measures it.)
#[test]
fn auto_converge_lowers_the_cpu_share_until_precopy_of_a_dirtying_guest_converges() {
    const TEST: &str =
        "auto_converge_lowers_the_cpu_share_until_precopy_of_a_dirtying_guest_converges";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let without = join_dirtying_guest("rp-nolev", false);
    eprintln!("{TEST}: without the lever: {without:?}");
    assert_eq!(without.rounds, DIRTY_MAX_ROUNDS, "{}", without.line);
    assert_eq!(without.min_share, 1.0, "{}", without.line);
    let with = join_dirtying_guest("rp-lever", true);
    eprintln!("{TEST}: with the lever: {with:?}");
    assert!(
        with.min_share < 1.0,
        "the share was never lowered: {}",
        with.line
    );
    assert!(
        with.rounds < DIRTY_MAX_ROUNDS,
        "no convergence: {}",
        with.line
    );
    assert!(
        with.final_pages * 2 < without.final_pages,
        "{} pages at the cut with the lever, {} without",
        with.final_pages,
        without.final_pages
    );
    eprintln!(
        "{TEST}: pause {:.1} ms with the lever, {:.1} ms without",
        with.pause_ms, without.pause_ms
    );
}

/// Auto-converge on a backup that went live: [`dirtying_pair`] with the backup accepting joins
/// (default throttle flags, which apply once it runs as a primary); the primary killed, the
/// backup goes live in generation 2 and a new backup joins it over the slow link. Its CPU
/// throttle obeys the join's lever: the share goes down round by round and pre-copy converges
/// before [`DIRTY_MAX_ROUNDS`] (before the fix the went-live side ran no throttle: all rounds,
/// share 1). Then the went-live side is stopped (SIGTERM) and its report names the throttle,
/// which gave the vCPU its full share back.
#[test]
fn a_backup_that_went_live_auto_converges_a_join_of_a_dirtying_guest() {
    const TEST: &str = "a_backup_that_went_live_auto_converges_a_join_of_a_dirtying_guest";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let mut s = dirtying_pair("rp-livelev", &[], &dirty_join_args(7301, true));
    s.primary.take().expect("primary").kill();
    let backup = s.backup.as_mut().expect("backup");
    let live = backup
        .wait_line("LIVE", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no LIVE line: {}", backup.stderr_text()));
    assert!(live.contains("generation 2"), "{live}");
    s.primary = s.backup.take();
    let (joiner, join) = join_over_slow_link(&mut s, (7111, 7301), 3);
    eprintln!("{TEST}: {join:?}");
    assert!(
        join.min_share < 1.0,
        "the share was never lowered: {}",
        join.line
    );
    assert!(
        join.rounds < DIRTY_MAX_ROUNDS,
        "no convergence: {}",
        join.line
    );
    s.backup = Some(joiner);
    // A planned stop of the went-live side (the stream guest is not reachable from the
    // namespace here, so it cannot be told to power off): its report has the throttle too.
    signal(s.primary.as_ref().expect("went-live side"), "TERM");
    common::assert_exits_with(s.primary.as_mut().expect("went-live side"), STOPPED);
    let r = s.report(Side::Backup).expect("the went-live side's report");
    let t = &r["throttle"];
    assert_eq!(t["enabled"], true, "{r}");
    assert!(
        ["cgroup-v2", "cgroup-v1", "pacer"].contains(&t["actuator"].as_str().unwrap_or("")),
        "{t}"
    );
    assert!(t["min_share"].as_f64().unwrap_or(1.0) < 1.0, "{t}");
    assert_eq!(t["share"], 1.0, "full speed given back at the end: {t}");
    // The side's metrics (its `--metrics` endpoint, embedded in the report) show the
    // throttle of its run as a primary too, not only the replay's counters.
    let m = &r["metrics"]["throttle"];
    assert_eq!(m["actuator"], t["actuator"], "metrics: {m}");
    assert!(m["min_share"].as_f64().unwrap_or(1.0) < 1.0, "metrics: {m}");
}
