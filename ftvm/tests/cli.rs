//! The command-line contract of the `ftvm` binary: every failure is one line on stderr with
//! exit status 200 (no backtrace, even with `RUST_BACKTRACE=1`), usage errors exit 201, the
//! exit-status table and the defaults are in `--help`, and every malformed `--arbiter` is
//! refused at start (before any pairing, arbiter wait or KVM use) instead of waited on.
//! Nothing here needs root or KVM.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ftvm");

fn ftvm(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run ftvm")
}

/// Asserts `out` is a one-line error with status 200 containing `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(ftvm::exit::ERROR), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {err}");
    assert!(lines[0].starts_with("ftvm: error: "), "{err}");
    assert!(lines[0].contains(needle), "{needle:?} not in {err}");
    assert!(!err.contains("backtrace"), "{err}");
}

#[test]
fn every_bad_arbiter_is_refused_at_start() {
    let missing_dir = "file:/nonexistent/ftvm-arbiter-dir";
    for (spec, needle) in [
        ("zookeeper://10.0.0.1:2181", "unknown form"),
        ("/shared/arbiter", "unknown form"),
        ("", "unknown form"),
        ("file:", "not an existing directory"),
        (missing_dir, "not an existing directory"),
        ("etcd://", "bad etcd endpoint"),
        ("etcd://10.0.0.1", "bad etcd endpoint"),
        ("etcd://10.0.0.1:0", "bad etcd endpoint"),
        ("etcd://10.0.0.1:99999", "bad etcd endpoint"),
        ("etcd://10.0.0.1:2379,", "bad etcd endpoint"),
        ("etcd:", "bad etcd endpoint"),
        ("etcd:10.0.0.1:2379", "bad etcd endpoint"),
    ] {
        for role in ["primary", "backup"] {
            let t = Instant::now();
            let out = ftvm(&[
                role,
                "--guest",
                "cpu",
                "--peer",
                "127.0.0.1:1",
                "--arbiter",
                spec,
            ]);
            assert_one_line_error(&out, needle);
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{spec:?} was waited on"
            );
        }
    }
    // The demo takes the same forms (besides its own `etcd`).
    let out = ftvm(&["demo", "--arbiter", "bogus:1"]);
    assert_eq!(out.status.code(), Some(ftvm::exit::ERROR));
}

#[test]
fn usage_errors_exit_201_and_errors_200() {
    let out = ftvm(&["primary", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(ftvm::exit::USAGE));
    let out = ftvm(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(ftvm::exit::USAGE));
    let out = ftvm(&["run", "--guest", "no-such-guest"]);
    assert_one_line_error(&out, "no-such-guest");
    let out = ftvm(&[
        "primary",
        "--guest",
        "cpu",
        "--peer",
        "127.0.0.1:1",
        "--throttle-cgroup",
        "/no/such/dir",
    ]);
    assert_one_line_error(&out, "--throttle-cgroup");
    let out = ftvm(&["run", "--guest", "cpu", "--metrics", "not-an-address"]);
    assert_one_line_error(&out, "--metrics");
    let out = ftvm(&["stat", "--once", "127.0.0.1:1"]);
    assert_one_line_error(&out, "no answer from 127.0.0.1:1");
    let out = ftvm(&["stat", "--once", "nonsense"]);
    assert_one_line_error(&out, "not HOST:PORT");
}

#[test]
fn help_shows_the_exit_table_and_the_defaults() {
    let out = ftvm(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for own in ["200", "201", "202", "203", "207", "0-199"] {
        assert!(
            text.contains(&format!("\n  {own} ")),
            "{own} missing:\n{text}"
        );
    }
    let out = ftvm(&["primary", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for d in [
        "[default: 200]",
        "[default: tcp]",
        "[default: 100]",
        "[default: 64M]",
        "Exit status",
    ] {
        assert!(text.contains(d), "{d} missing:\n{text}");
    }
}

/// The example configurations under `contrib/` load (`--print-config` prints what each side
/// would run with), and a flag given beside `--config` overrides the file's key.
#[test]
fn contrib_configs_load_and_flags_override_them() {
    let contrib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/config");
    for (role, node, peer_hb) in [
        ("primary", "host-a", "192.0.2.11:7101"),
        ("backup", "host-b", "192.0.2.10:7102"),
    ] {
        let file = contrib.join(format!("{role}.toml"));
        let out = ftvm(&[
            role,
            "--config",
            &file.display().to_string(),
            "--print-config",
            "--fail-timeout",
            "300",
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{role}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in [
            format!("node = \"{node}\""),
            format!("peer_heartbeat = \"{peer_hb}\""),
            "fail_timeout = 300".to_string(),
            "transport = \"tcp\"".to_string(),
            "arbiter = \"etcd:http://192.0.2.20:2379,http://192.0.2.21:2379,http://192.0.2.22:2379#/ftvm/pair1\"".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "{role}: {line} missing:\n{text}");
        }
    }
}

/// A config file's unknown key, another role's key and a bad typed value are each refused with
/// one line naming the key (status 200).
#[test]
fn bad_config_files_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (role, body, needle) in [
        (
            "primary",
            "guest = \"cpu\"\nfrobnicate = 1\n",
            "unknown key `frobnicate`",
        ),
        (
            "backup",
            "digest_interval = 5\n",
            "a setting of ftvm primary only",
        ),
        (
            "primary",
            "on_primary_stop = \"stop\"\n",
            "a setting of ftvm backup only",
        ),
        (
            "primary",
            "transport = \"carrier-pigeon\"\n",
            "`transport` = \"carrier-pigeon\"",
        ),
        (
            "backup",
            "on_primary_stop = \"maybe\"\n",
            "`on_primary_stop` = \"maybe\"",
        ),
        ("primary", "idle = \"nap\"\n", "`idle` = \"nap\""),
    ] {
        let file = dir.path().join("c.toml");
        std::fs::write(&file, body).expect("write");
        let out = ftvm(&[role, "--config", &file.display().to_string()]);
        assert_one_line_error(&out, needle);
    }
}

/// `ftvm primary --help` lists only the primary's flags, `ftvm backup --help` only the
/// backup's; a primary-only flag given to the backup is a usage error.
#[test]
fn each_role_lists_only_its_own_flags() {
    let help = |role: &str| String::from_utf8_lossy(&ftvm(&[role, "--help"]).stdout).into_owned();
    let (p, b) = (help("primary"), help("backup"));
    for own in [
        "--go-alone-unprotected",
        "--on-backup-failure",
        "--on-backup-stop",
        "--digest-interval",
        "--stop-timeout-ms",
    ] {
        assert!(p.contains(own), "{own} not in primary --help");
        assert!(!b.contains(own), "{own} in backup --help");
    }
    assert!(b.contains("--on-primary-stop") && !p.contains("--on-primary-stop"));
    for both in [
        "--arbiter",
        "--heartbeat",
        "--net",
        "--config",
        "--print-config",
        // The backup applies them once it went live and serves joins as a primary.
        "--throttle-target-ms",
        "--throttle-cgroup",
    ] {
        assert!(p.contains(both) && b.contains(both), "{both}");
    }
    let out = ftvm(&[
        "backup",
        "--guest",
        "cpu",
        "--peer",
        "h:1",
        "--digest-interval",
        "5",
    ]);
    assert_eq!(out.status.code(), Some(ftvm::exit::USAGE));
}
