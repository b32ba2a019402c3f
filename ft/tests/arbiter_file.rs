//! FileArbiter scenarios with real processes and a real directory: racing claims, stale
//! generations, and a shared directory that goes away and comes back.

mod arbiter_support;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use arbiter_support::{env, expect_child_role, id, unix_nanos, ChildGuard};
use ftvm_ft::{
    acquire_with_retry, Acquire, Arbiter, ArbiterError, FileArbiter, NodeId, RetryPolicy,
};
use ftvm_testkit::CountingArbiter;

const ROUNDS: u64 = 200;
/// Time between two rounds of the lockstep race, in microseconds.
const STEP_US: u64 = 5_000;

/// Child-process entry point (ignored in a normal test run): claims generations
/// `1..=FTVM_ARB_ROUNDS` on `FTVM_ARB_DIR` as `FTVM_ARB_ID`, starting at wall-clock time
/// `FTVM_ARB_START` (ns) plus `FTVM_ARB_STEP_US` per round (lockstep), and prints one `ARB <generation> won|lost <generation> <winner>` line
/// per claim.
#[test]
#[ignore = "child process entry point, run by its parent test"]
fn child_file_claimer() {
    expect_child_role("file-claimer");
    let arbiter = FileArbiter::new(env("FTVM_ARB_DIR"));
    let me = id(&env("FTVM_ARB_ID"));
    let rounds: u64 = env("FTVM_ARB_ROUNDS").parse().expect("rounds");
    let first: u64 = env("FTVM_ARB_FIRST").parse().expect("first generation");
    let start: u128 = env("FTVM_ARB_START").parse().expect("start time");
    let step: u128 = env("FTVM_ARB_STEP_US").parse().expect("step");
    for generation in first..first + rounds {
        // Lockstep: both processes claim generation g at the same instant.
        let at = start + u128::from(generation - first) * step * 1000;
        while unix_nanos() < at {
            thread::sleep(Duration::from_micros(100));
        }
        match arbiter.try_acquire(generation, &me).expect("claim") {
            Acquire::Won => println!("ARB {generation} won"),
            Acquire::Lost {
                generation: g,
                winner,
            } => {
                println!("ARB {generation} lost {g} {winner}")
            }
        }
    }
}

fn spawn_claimer(dir: &Path, who: &str, first: u64, rounds: u64, start: u128) -> ChildGuard {
    ChildGuard::spawn_test(
        "child_file_claimer",
        "file-claimer",
        &[
            ("FTVM_ARB_DIR", dir.display().to_string()),
            ("FTVM_ARB_ID", who.to_string()),
            ("FTVM_ARB_ROUNDS", rounds.to_string()),
            ("FTVM_ARB_FIRST", first.to_string()),
            ("FTVM_ARB_START", start.to_string()),
            ("FTVM_ARB_STEP_US", STEP_US.to_string()),
        ],
    )
}

/// One process's reported outcome per generation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Won,
    Lost(u64, String),
}

fn parse_outcomes(lines: &[String]) -> BTreeMap<u64, Seen> {
    lines
        .iter()
        .map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            let generation = parts[0].parse().expect("generation");
            let seen = match parts[1] {
                "won" => Seen::Won,
                "lost" => Seen::Lost(parts[2].parse().expect("gen"), parts[3].to_string()),
                other => panic!("bad outcome {other}"),
            };
            (generation, seen)
        })
        .collect()
}

#[test]
fn file_two_processes_race_exactly_one_wins_each_generation() {
    let _one = ftvm_testkit::one_at_a_time();
    let dir = tempfile::tempdir().expect("temp dir");
    let start = unix_nanos() + 300_000_000; // both start together, 300 ms from now
    let a = spawn_claimer(dir.path(), "proc-a", 1, ROUNDS, start);
    let b = spawn_claimer(dir.path(), "proc-b", 1, ROUNDS, start);
    let a = parse_outcomes(&a.collect("ARB ", Duration::from_secs(60)));
    let b = parse_outcomes(&b.collect("ARB ", Duration::from_secs(60)));
    assert_eq!(a.len() as u64, ROUNDS);
    assert_eq!(b.len() as u64, ROUNDS);
    let arbiter = FileArbiter::new(dir.path());
    let (mut wins_a, mut wins_b) = (0, 0);
    for generation in 1..=ROUNDS {
        let (sa, sb) = (&a[&generation], &b[&generation]);
        let winner = match (sa, sb) {
            (Seen::Won, Seen::Won) => panic!("generation {generation} won by both processes"),
            (Seen::Won, Seen::Lost(g, w)) => {
                wins_a += 1;
                assert!(
                    *g > generation || w == "proc-a",
                    "b lost {generation} to {g} {w}"
                );
                "proc-a"
            }
            (Seen::Lost(g, w), Seen::Won) => {
                wins_b += 1;
                assert!(
                    *g > generation || w == "proc-b",
                    "a lost {generation} to {g} {w}"
                );
                "proc-b"
            }
            (Seen::Lost(..), Seen::Lost(..)) => {
                panic!("generation {generation} won by nobody: {sa:?} {sb:?}")
            }
        };
        // The record on disk agrees with the reported winner.
        let record =
            fs::read_to_string(dir.path().join(format!("gen-{generation}"))).expect("claim file");
        assert!(record.ends_with(&format!("winner {winner}\n")), "{record}");
    }
    assert_eq!(
        arbiter.current().expect("current").map(|(g, _)| g),
        Some(ROUNDS)
    );
    eprintln!("file race: {ROUNDS} generations, proc-a won {wins_a}, proc-b won {wins_b}");
}

#[test]
fn file_stale_generation_loses() {
    let _one = ftvm_testkit::one_at_a_time();
    let dir = tempfile::tempdir().expect("temp dir");
    // Another process takes generations 5..=7.
    let other = spawn_claimer(dir.path(), "proc-new", 5, 3, 0);
    let seen = parse_outcomes(&other.collect("ARB ", Duration::from_secs(30)));
    assert!(seen.values().all(|s| *s == Seen::Won), "{seen:?}");
    let arbiter = FileArbiter::new(dir.path());
    let me = id("proc-old");
    for stale in [1, 4, 6, 7] {
        assert_eq!(
            arbiter.try_acquire(stale, &me).expect("claim"),
            Acquire::Lost {
                generation: 7,
                winner: id("proc-new")
            },
            "stale generation {stale}"
        );
    }
    assert!(!dir.path().join("gen-4").exists());
    assert_eq!(arbiter.try_acquire(8, &me).expect("claim"), Acquire::Won);
    assert_eq!(arbiter.current().expect("current"), Some((8, me)));
}

/// A claim retried in the background ([`retry_in_background`]).
struct Retrying {
    stop: Arc<AtomicBool>,
    outcome: mpsc::Receiver<Result<Acquire, ArbiterError>>,
    arbiter: Arc<CountingArbiter<FileArbiter>>,
}

impl Retrying {
    /// Asserts that the claim is still waiting: `n` more of its attempts were refused as
    /// unreachable (the event that shows it tried, rather than a sleep), and it has not
    /// returned.
    fn assert_waiting(&self, n: u64, what: &str) {
        self.arbiter
            .wait_unreachable(self.arbiter.unreachable(), n, Duration::from_secs(10));
        assert!(
            matches!(self.outcome.try_recv(), Err(mpsc::TryRecvError::Empty)),
            "returned {what}"
        );
    }
}

/// Runs `acquire_with_retry` for `generation` on a thread.
fn retry_in_background(arbiter: FileArbiter, generation: u64, who: NodeId) -> Retrying {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let flag = stop.clone();
    let policy = RetryPolicy {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(50),
    };
    let counting = Arc::new(CountingArbiter::new(arbiter));
    let a = counting.clone();
    thread::spawn(move || {
        let r = acquire_with_retry(&*a, generation, &who, policy, || {
            flag.load(Ordering::Relaxed)
        });
        let _ = tx.send(r);
    });
    Retrying {
        stop,
        outcome: rx,
        arbiter: counting,
    }
}

#[test]
fn file_unreachable_directory_waits_then_wins() {
    let _one = ftvm_testkit::one_at_a_time();
    let root = tempfile::tempdir().expect("temp dir");
    let share = root.path().join("share");
    let away = root.path().join("away");
    fs::create_dir(&share).expect("mkdir");
    let arbiter = FileArbiter::new(&share);
    let me = id("survivor");

    // The directory disappears (unmounted / renamed away): unreachable, never created.
    fs::rename(&share, &away).expect("rename away");
    let err = arbiter.try_acquire(1, &me).expect_err("gone");
    assert!(err.is_unreachable(), "{err:?}");
    let retrying = retry_in_background(arbiter.clone(), 1, me.clone());
    retrying.assert_waiting(5, "while the directory was gone");
    assert!(!share.exists(), "the arbiter created the missing directory");

    // A regular file where the directory was (a stale mount point gone wrong): still waiting.
    fs::write(&share, b"not a directory").expect("file");
    assert!(arbiter
        .try_acquire(1, &me)
        .expect_err("file")
        .is_unreachable());
    retrying.assert_waiting(3, "while the path was a file");

    // The directory comes back: the waiting claim completes and wins.
    fs::remove_file(&share).expect("rm file");
    fs::rename(&away, &share).expect("rename back");
    let r = retrying
        .outcome
        .recv_timeout(Duration::from_secs(5))
        .expect("claim completed after the directory returned");
    assert_eq!(r.expect("claim"), Acquire::Won);
    assert_eq!(arbiter.current().expect("current"), Some((1, me)));
    retrying.stop.store(true, Ordering::Relaxed);
}

#[test]
fn file_unreachable_side_loses_to_the_side_that_could_reach_it() {
    let _one = ftvm_testkit::one_at_a_time();
    let root = tempfile::tempdir().expect("temp dir");
    let share = root.path().join("share");
    let away = root.path().join("away");
    fs::create_dir(&share).expect("mkdir");
    let arbiter = FileArbiter::new(&share);

    // We lose access; meanwhile another process, which still reaches the storage (at its
    // other path), wins generation 1.
    fs::rename(&share, &away).expect("rename away");
    let retrying = retry_in_background(arbiter.clone(), 1, id("cut-off"));
    let other = spawn_claimer(&away, "reached-it", 1, 1, 0);
    let seen = parse_outcomes(&other.collect("ARB ", Duration::from_secs(30)));
    assert_eq!(seen[&1], Seen::Won);
    retrying.assert_waiting(3, "while the directory was gone");

    // Access returns: our waiting claim must lose, never win.
    fs::rename(&away, &share).expect("rename back");
    let r = retrying
        .outcome
        .recv_timeout(Duration::from_secs(5))
        .expect("claim completed");
    assert_eq!(
        r.expect("claim"),
        Acquire::Lost {
            generation: 1,
            winner: id("reached-it")
        }
    );
    retrying.stop.store(true, Ordering::Relaxed);
}

#[test]
fn file_retry_can_be_stopped_while_unreachable() {
    let _one = ftvm_testkit::one_at_a_time();
    let root = tempfile::tempdir().expect("temp dir");
    let arbiter = FileArbiter::new(root.path().join("never-mounted"));
    let retrying = retry_in_background(arbiter, 1, id("a"));
    retrying.assert_waiting(3, "while the directory was never there");
    retrying.stop.store(true, Ordering::Relaxed);
    let r = retrying
        .outcome
        .recv_timeout(Duration::from_secs(2))
        .expect("stopped");
    assert!(matches!(r, Err(ArbiterError::Stopped)), "{r:?}");
}

/// A read-only bind mount of a directory over itself, unmounted on drop (also on failure).
struct ReadOnlyMount {
    path: std::path::PathBuf,
}

impl ReadOnlyMount {
    /// `None` when the mounts fail.
    fn new(path: &Path) -> Option<Self> {
        let run = |args: &[&str]| {
            std::process::Command::new(args[0])
                .args(&args[1..])
                .status()
                .is_ok_and(|s| s.success())
        };
        let p = path.to_str().expect("utf-8 path");
        if !run(&["mount", "--bind", p, p]) {
            return None;
        }
        let guard = Self {
            path: path.to_path_buf(),
        };
        if !run(&["mount", "-o", "remount,bind,ro", p]) {
            return None; // the guard unmounts the bind mount
        }
        Some(guard)
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

#[test]
fn file_read_only_directory_waits_then_wins() {
    const TEST: &str = "file_read_only_directory_waits_then_wins";
    let _one = ftvm_testkit::one_at_a_time();
    // Bind mounts need root; as root they must work.
    if ftvm_testkit::skip::if_missing(TEST, ftvm_channel::netns::require_root().err()) {
        return;
    }
    let root = tempfile::tempdir().expect("temp dir");
    let share = root.path().join("share");
    fs::create_dir(&share).expect("mkdir");
    let arbiter = FileArbiter::new(&share);
    let me = id("survivor");
    assert_eq!(
        arbiter.try_acquire(1, &id("old")).expect("claim"),
        Acquire::Won
    );

    let mount = ReadOnlyMount::new(&share).expect("a read-only bind mount (as root)");
    // Readable but not writable (a storage server exporting read-only after an error).
    assert_eq!(arbiter.current().expect("readable"), Some((1, id("old"))));
    let err = arbiter.try_acquire(2, &me).expect_err("read-only");
    assert!(err.is_unreachable(), "{err:?}");
    let retrying = retry_in_background(arbiter.clone(), 2, me.clone());
    retrying.assert_waiting(5, "while the directory was read-only");
    drop(mount);
    let r = retrying
        .outcome
        .recv_timeout(Duration::from_secs(5))
        .expect("claim completed after the directory became writable");
    assert_eq!(r.expect("claim"), Acquire::Won);
    assert_eq!(arbiter.current().expect("current"), Some((2, me)));
    retrying.stop.store(true, Ordering::Relaxed);
}
