//! The metrics endpoint of real `ftvm primary` / `ftvm backup` processes (cpu guest, TCP on
//! loopback): scraped over HTTP while the pair runs, the Prometheus text and `/status.json`
//! carry every part of the side, and each scraped counter is at most the final value the
//! `--report` JSON holds (the report serializes the same counters, as objects). Also `ftvm
//! stat --once --json` against both sides. Needs root and /dev/kvm (prints SKIP otherwise).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ftvm::metrics::http_get;
use ftvm_ft::observe::{SideRole, Snapshot};

const BIN: &str = env!("CARGO_BIN_EXE_ftvm");

/// The value of the sample `series` (`name` or `name{labels}`) in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn spawn(role: &str, peer: &str, metrics: &str, report: &std::path::Path) -> Child {
    Command::new(BIN)
        .args([
            role,
            "--guest",
            "cpu",
            // About 3 s of work: time to scrape while it runs.
            "--cmdline",
            "size=16M rounds=300",
            "--transport",
            "tcp",
            "--peer",
            peer,
            "--metrics",
            metrics,
        ])
        .arg("--report")
        .arg(report)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvm")
}

/// The last successful scrape of `path` before the process exits.
fn scrape_until_exit(child: &mut Child, addr: &str, path: &str) -> (Option<String>, usize) {
    let (mut last, mut n) = (None, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        if let Ok(body) = http_get(addr, path, Duration::from_secs(1)) {
            last = Some(body);
            n += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (last, n)
}

#[test]
fn metrics_scraped_over_http_match_the_report() {
    const TEST: &str = "metrics_scraped_over_http_match_the_report";
    if ftvm_testkit::skip::if_missing(TEST, ftvm::scenario::missing()) {
        return;
    }
    let [log, pm, bm] = ftvm_testkit::loopback_ports().expect("free ports");
    let (peer, pm, bm) = (
        format!("127.0.0.1:{log}"),
        format!("127.0.0.1:{pm}"),
        format!("127.0.0.1:{bm}"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (prep, brep) = (dir.path().join("p.json"), dir.path().join("b.json"));
    let mut backup = spawn("backup", &peer, &bm, &brep);
    let mut primary = spawn("primary", &peer, &pm, &prep);

    // Both sides at once, while they run: `ftvm stat --once --json`.
    let deadline = Instant::now() + Duration::from_secs(20);
    let stat = loop {
        let out = Command::new(BIN)
            .args(["stat", "--once", "--json", &pm, &bm])
            .output()
            .expect("ftvm stat");
        if out.status.success() {
            break out;
        }
        assert!(Instant::now() < deadline, "stat never succeeded: {out:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let both: serde_json::Value = serde_json::from_slice(&stat.stdout).expect("stat JSON");
    assert_eq!(both[0]["addr"], pm.as_str(), "{both}");
    assert_eq!(both[0]["status"]["role"], "primary", "{both}");
    assert_eq!(both[1]["status"]["role"], "backup", "{both}");

    let json = std::thread::scope(|s| {
        let b = s.spawn(|| scrape_until_exit(&mut backup, &bm, "/status.json"));
        let (text, n) = scrape_until_exit(&mut primary, &pm, "/metrics");
        (text, n, b.join().expect("backup scraper"))
    });
    let (text, n, (bjson, bn)) = json;
    let pst = primary.wait_with_output().expect("primary");
    let bst = backup.wait_with_output().expect("backup");
    assert!(
        pst.status.success(),
        "primary: {}",
        String::from_utf8_lossy(&pst.stderr)
    );
    assert!(
        bst.status.success(),
        "backup: {}",
        String::from_utf8_lossy(&bst.stderr)
    );
    let text = text.expect("no scrape of the primary succeeded");
    let bjson = bjson.expect("no scrape of the backup succeeded");
    eprintln!(
        "{TEST}: {n} scrapes of the primary, {bn} of the backup; last primary scrape:\n{text}"
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&prep).expect("primary report"))
            .expect("JSON");
    let breport: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&brep).expect("backup report"))
            .expect("JSON");
    // The channel is an object now, not a Debug string.
    assert!(report["channel"].is_object(), "{}", report["channel"]);
    let fin: Snapshot = serde_json::from_value(report["metrics"].clone()).expect("final snapshot");
    let bfin: Snapshot =
        serde_json::from_value(breport["metrics"].clone()).expect("backup's final snapshot");

    // Every part of the primary is there.
    for series in [
        "ftvm_side_info{role=\"primary\"}",
        "ftvm_generation",
        "ftvm_log_position{stage=\"written\"}",
        "ftvm_log_position{stage=\"sent\"}",
        "ftvm_log_position{stage=\"acked\"}",
        "ftvm_log_position{stage=\"executed\"}",
        "ftvm_lag_entries",
        "ftvm_throttle_share",
        "ftvm_outputs_held",
        "ftvm_output_delay_seconds_count",
        "ftvm_channel_frames_total{direction=\"sent\"}",
        "ftvm_channel_retransmits_total{kind=\"timeout\"}",
        "ftvm_exits_total{kind=\"wait\"}",
        "ftvm_log_stalls_total",
    ] {
        assert!(sample(&text, series).is_some(), "{series} missing");
    }
    let actuator = fin.throttle.as_ref().expect("throttle").actuator.clone();
    assert!(
        text.contains(&format!(
            "ftvm_throttle_actuator_info{{actuator=\"{actuator}\"}} 1"
        )),
        "actuator {actuator}"
    );
    // Scraped during the run ≤ final (counters and positions only grow).
    let le = |series: &str, fin: f64| {
        let v = sample(&text, series).expect(series);
        assert!(v <= fin + 1e-9, "{series}: scraped {v} > final {fin}");
        v
    };
    let log = fin.log.as_ref().expect("log");
    let written = le("ftvm_log_position{stage=\"written\"}", log.written as f64);
    assert!(written > 0.0, "nothing logged when scraped");
    le("ftvm_log_position{stage=\"acked\"}", log.acked as f64);
    le("ftvm_log_entries_total", log.entries as f64);
    let exits = fin.exits.as_ref().expect("exits");
    le(
        "ftvm_exits_total{kind=\"sys_read\"}",
        exits.by_kind["sys_read"] as f64,
    );
    let ch = &fin.channel.as_ref().expect("channel").counters;
    le(
        "ftvm_channel_frames_total{direction=\"sent\"}",
        ch.frames_sent as f64,
    );
    le(
        "ftvm_channel_bytes_total{direction=\"sent\"}",
        ch.bytes_sent as f64,
    );
    let out = fin.outputs.as_ref().expect("outputs");
    le("ftvm_outputs_released_total", out.released as f64);
    le("ftvm_output_delay_seconds_count", out.delay.count as f64);
    // The report's channel object and the final snapshot are the same counters.
    assert_eq!(
        report["channel"]["frames_sent"].as_u64(),
        Some(ch.frames_sent)
    );
    assert_eq!(fin.role, SideRole::Primary);
    assert_eq!(log.executed, log.written, "the backup executed everything");

    // The backup's JSON endpoint.
    let b: Snapshot = serde_json::from_str(&bjson).expect("backup snapshot");
    assert_eq!(b.role, SideRole::Backup);
    let (bl, bfl) = (b.log.expect("log"), bfin.log.expect("log"));
    assert!(bl.written <= bfl.written && bl.executed <= bfl.executed);
    assert!(b.throttle.is_none(), "the backup has no throttle");
    assert_eq!(
        bfl.written, log.written,
        "the backup received the whole log"
    );
}
