//! `ftvm primary` and `ftvm backup` as real processes: the cpu guest over TCP, and the kv guest
//! under redis-benchmark load (shared-memory transport) in a network namespace. At the end the
//! backup's memory digest, disk image and console output equal the primary's, and no output
//! left the primary before the backup acknowledged its log position.
//!
//! The `ftvm` binary is taken from the target directory of this test (`cargo test --workspace`
//! builds it); the tests print SKIP when it is missing.

use ftvm_testkit::kv as common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{free_port, ftvm_binary, report};

fn check_equal_runs(dir: &Path, disk: bool) {
    let p = report(&dir.join("p.json"));
    let b = report(&dir.join("b.json"));
    assert_eq!(p["code"], 0, "{p}");
    assert_eq!(b["code"], p["code"]);
    assert_eq!(b["exits"], p["exits"]);
    assert_eq!(b["mem_digest"], p["mem_digest"]);
    assert_eq!(b["regs_digest"], p["regs_digest"]);
    // Output-verified replay: every output of the primary (console lines, kv's transmitted
    // frames) was reproduced by the backup with the same digest, at the same exit.
    assert!(b["outputs_verified"].as_u64().is_some_and(|n| n > 0), "{b}");
    if disk {
        assert!(p["disk_digest"].is_string(), "{p}");
        assert_eq!(b["disk_digest"], p["disk_digest"]);
    }
    let pc = std::fs::read(dir.join("p.console")).expect("primary console");
    let bc = std::fs::read(dir.join("b.console")).expect("backup console");
    assert!(!pc.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&pc),
        String::from_utf8_lossy(&bc),
        "console output differs"
    );
    // The output rule, from the counters: every release saw an ack at or past its tag.
    assert_eq!(p["outputs_early"], 0, "{p}");
    for r in p["releases"].as_array().expect("releases") {
        let (tag, acked) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
        assert!(acked >= tag, "output tagged {tag} released at ack {acked}");
    }
    assert_eq!(p["backup_finished"], true, "{p}");
}

/// The arguments of `role`: `common`, and `primary_only` (flags `ftvm backup` does not take)
/// on the primary.
fn pair_args<'a>(
    role: &'a str,
    dir: &'a Path,
    common: &[&'a str],
    primary_only: &[&'a str],
) -> Vec<String> {
    let mut v: Vec<String> = vec![role.into()];
    v.extend(common.iter().map(|s| s.to_string()));
    if role == "primary" {
        v.extend(primary_only.iter().map(|s| s.to_string()));
    }
    let tag = if role == "primary" { "p" } else { "b" };
    v.extend([
        "--console".into(),
        dir.join(format!("{tag}.console")).display().to_string(),
        "--report".into(),
        dir.join(format!("{tag}.json")).display().to_string(),
        "--log".into(),
        "warn".into(),
    ]);
    v
}

#[test]
fn ft_processes_replay_cpu_over_tcp() {
    let Some(bin) = ftvm_binary("ft_processes_replay_cpu_over_tcp") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let peer = format!("127.0.0.1:{}", free_port());
    let common = [
        "--guest",
        "cpu",
        "--mem",
        "16M",
        "--cmdline",
        "size=1M rounds=8 timing",
        "--peer",
        &peer,
        "--transport",
        "tcp",
    ];
    let primary_only = ["--digest-interval", "2", "--mem-digest-every", "1"];
    let backup = Command::new(&bin)
        .args(pair_args("backup", dir.path(), &common, &primary_only))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backup");
    let primary = Command::new(&bin)
        .args(pair_args("primary", dir.path(), &common, &primary_only))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn primary");
    common::wait_pair_ok(primary, backup);
    check_equal_runs(dir.path(), false);
}

#[test]
fn ft_processes_refuse_different_initial_state() {
    let Some(bin) = ftvm_binary("ft_processes_refuse_different_initial_state") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let peer = format!("127.0.0.1:{}", free_port());
    let args = |seed: &str| {
        vec![
            "--guest".to_string(),
            "cpu".into(),
            "--mem".into(),
            "16M".into(),
            "--cmdline".into(),
            format!("size=64k rounds=1 seed={seed}"),
            "--peer".into(),
            peer.clone(),
            "--transport".into(),
            "tcp".into(),
            "--log".into(),
            "error".into(),
        ]
    };
    let backup = Command::new(&bin)
        .arg("backup")
        .args(args("1"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backup");
    let primary = Command::new(&bin)
        .arg("primary")
        .args(args("2"))
        .current_dir(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn primary");
    let (po, bo) = common::wait_pair(primary, backup);
    assert!(!po.status.success() && !bo.status.success());
    let text = String::from_utf8_lossy(&po.stderr);
    assert!(text.contains("pairing digest mismatch"), "{text}");
}

#[test]
fn ft_processes_kv_under_redis_benchmark() {
    const TEST: &str = "ft_processes_kv_under_redis_benchmark";
    let Some(bin) = ftvm_binary(TEST) else {
        return;
    };
    if ftvm_testkit::skip::if_missing(TEST, common::net_missing()) {
        return;
    }
    if ftvm_testkit::skip_without(TEST, "redis-benchmark", "redis-tools") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for d in ["a.img", "b.img"] {
        std::fs::File::create(dir.path().join(d))
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
    }
    let ns = common::namespace("ftpair");
    let shm = format!("/dev/shm/ftvm-test-kv-{}", std::process::id());
    let cmdline = format!("ip={}/24 gw=10.0.2.1 port=6379", common::GUEST_IP);
    let net = format!("tap:{}", common::TAP);
    let spawn = |role: &str, disk: &str| -> Child {
        let d = dir.path().join(disk).display().to_string();
        let common_args = [
            "--guest",
            "kv",
            "--mem",
            "64M",
            "--disk",
            &d,
            "--net",
            &net,
            "--cmdline",
            &cmdline,
            "--peer",
            &shm,
            "--transport",
            "shm",
        ];
        let primary_only = ["--digest-interval", "5000", "--mem-digest-every", "20"];
        ns.command(
            &bin.display().to_string(),
            &pair_args(role, dir.path(), &common_args, &primary_only),
        )
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
    };
    let backup = spawn("backup", "b.img");
    let primary = spawn("primary", "a.img");
    // Wait until kv answers (through the primary; replies are released under the output rule).
    common::wait_pong(&ns, "kv under FT did not answer PING");
    let out = common::redis_benchmark(&ns, "3000", "8", "set,get");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "redis-benchmark: {text}");
    assert!(text.contains("SET") && text.contains("GET"), "{text}");
    assert_eq!(common::redis_reply(&ns, &["SET", "ftkey", "ftvalue"]), "OK");
    common::redis_shutdown(&ns);
    common::wait_pair_ok(primary, backup);
    check_equal_runs(dir.path(), true);
    let p = report(&dir.path().join("p.json"));
    assert!(p["outputs_released"].as_u64().unwrap() > 0);
    // Both disks hold the same log, including the last SET.
    let a = std::fs::read(dir.path().join("a.img")).unwrap();
    let b = std::fs::read(dir.path().join("b.img")).unwrap();
    assert!(a == b, "disk images differ");
    assert!(a.windows(7).any(|w| w == b"ftvalue"));
}
