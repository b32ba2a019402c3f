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
