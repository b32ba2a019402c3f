//! EtcdArbiter scenarios against real etcd servers on loopback (random ports, temp data
//! directories, killed at the end even on failure): two racing processes, a stale generation,
//! etcd down and back, and a 3-member cluster with members down.
//!
//! Needs the `etcd` binary (Debian package `etcd-server`); prints `SKIP` without it.
#![cfg(feature = "etcd")]

mod arbiter_support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use arbiter_support::{env, expect_child_role, id, unix_nanos, ChildGuard, EtcdCluster};
use ftvm_ft::arbiter::{EtcdArbiter, EtcdConfig};
use ftvm_ft::{acquire_with_retry, Acquire, Arbiter, RetryPolicy};
use ftvm_testkit::CountingArbiter;

const ROUNDS: u64 = 30;
/// Time between two rounds of the lockstep race, in microseconds.
const STEP_US: u64 = 20_000;

/// Prints the SKIP line and returns false when etcd is missing.
fn require_etcd(test: &str) -> bool {
    !ftvm_testkit::skip_without(test, "etcd", "etcd-server")
}

fn arbiter(endpoints: Vec<String>, prefix: &str, op_timeout: Duration) -> EtcdArbiter {
    let mut config = EtcdConfig::new(endpoints, prefix);
    config.op_timeout = op_timeout;
    EtcdArbiter::new(config).expect("etcd arbiter")
}

/// Waits until the cluster answers reads through `arb` (a leader is elected).
fn wait_ready(arb: &EtcdArbiter, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        match arb.current() {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("etcd not ready after {limit:?}: {e}"),
        }
    }
}

/// Child-process entry point (ignored in a normal test run): claims generations
/// `1..=FTVM_ARB_ROUNDS` through etcd at `FTVM_ETCD_ENDPOINTS` as `FTVM_ARB_ID`, starting at
/// wall-clock time `FTVM_ARB_START` plus `FTVM_ARB_STEP_US` per round (lockstep), printing `ARB <generation> won|lost <generation> <winner>`.
#[test]
#[ignore = "child process entry point, run by its parent test"]
fn child_etcd_claimer() {
    expect_child_role("etcd-claimer");
    let endpoints = env("FTVM_ETCD_ENDPOINTS")
        .split(',')
        .map(str::to_string)
        .collect();
    let arb = arbiter(endpoints, &env("FTVM_ETCD_PREFIX"), Duration::from_secs(5));
    let me = id(&env("FTVM_ARB_ID"));
    let rounds: u64 = env("FTVM_ARB_ROUNDS").parse().expect("rounds");
    let start: u128 = env("FTVM_ARB_START").parse().expect("start");
    wait_ready(&arb, Duration::from_secs(10));
    let step: u128 = env("FTVM_ARB_STEP_US").parse().expect("step");
    for generation in 1..=rounds {
        // Lockstep: both processes claim generation g at the same instant.
        let at = start + u128::from(generation - 1) * step * 1000;
        while unix_nanos() < at {
            thread::sleep(Duration::from_micros(100));
        }
        match arb.try_acquire(generation, &me).expect("claim") {
            Acquire::Won => println!("ARB {generation} won"),
            Acquire::Lost {
                generation: g,
                winner,
            } => println!("ARB {generation} lost {g} {winner}"),
        }
    }
}

#[test]
fn etcd_two_processes_race_exactly_one_wins_and_stale_loses() {
    let _one = ftvm_testkit::one_at_a_time();
    if !require_etcd("etcd_two_processes_race_exactly_one_wins_and_stale_loses") {
        return;
    }
    let cluster = EtcdCluster::start(1);
    let endpoints = cluster.endpoints();
    let arb = arbiter(endpoints.clone(), "/ftvm/race", Duration::from_secs(5));
    wait_ready(&arb, Duration::from_secs(15));
    let start = unix_nanos() + 1_000_000_000; // both children connected by then
    let spawn = |who: &str| {
        ChildGuard::spawn_test(
            "child_etcd_claimer",
            "etcd-claimer",
            &[
                ("FTVM_ETCD_ENDPOINTS", endpoints.join(",")),
                ("FTVM_ETCD_PREFIX", "/ftvm/race".to_string()),
                ("FTVM_ARB_ID", who.to_string()),
                ("FTVM_ARB_ROUNDS", ROUNDS.to_string()),
                ("FTVM_ARB_START", start.to_string()),
                ("FTVM_ARB_STEP_US", STEP_US.to_string()),
            ],
        )
    };
    let (a, b) = (spawn("proc-a"), spawn("proc-b"));
    let parse = |lines: Vec<String>| -> BTreeMap<u64, (bool, u64, String)> {
        lines
            .iter()
            .map(|l| {
                let p: Vec<&str> = l.split_whitespace().collect();
                let g: u64 = p[0].parse().expect("generation");
                if p[1] == "won" {
                    (g, (true, g, String::new()))
                } else {
                    (g, (false, p[2].parse().expect("gen"), p[3].to_string()))
                }
            })
            .collect()
    };
    let a = parse(a.collect("ARB ", Duration::from_secs(40)));
    let b = parse(b.collect("ARB ", Duration::from_secs(40)));
    assert_eq!((a.len() as u64, b.len() as u64), (ROUNDS, ROUNDS));
    let mut wins = (0, 0);
    for g in 1..=ROUNDS {
        let (sa, sb) = (&a[&g], &b[&g]);
        match (sa.0, sb.0) {
            (true, true) => panic!("generation {g} won by both"),
            (false, false) => panic!("generation {g} won by nobody: {sa:?} {sb:?}"),
            (true, false) => {
                wins.0 += 1;
                assert!(sb.1 > g || sb.2 == "proc-a", "{sb:?}");
            }
            (false, true) => {
                wins.1 += 1;
                assert!(sa.1 > g || sa.2 == "proc-b", "{sa:?}");
            }
        }
    }
    eprintln!(
        "etcd race: {ROUNDS} generations, proc-a won {}, proc-b won {}",
        wins.0, wins.1
    );
    let (newest, holder) = arb.current().expect("current").expect("a claim");
    assert_eq!(newest, ROUNDS);
    // A stale generation loses, naming the newest claim; the next one wins.
    let late = id("late-node");
    assert_eq!(
        arb.try_acquire(ROUNDS / 2, &late).expect("claim"),
        Acquire::Lost {
            generation: ROUNDS,
            winner: holder
        }
    );
    assert_eq!(
        arb.try_acquire(ROUNDS + 1, &late).expect("claim"),
        Acquire::Won
    );
    // Idempotent for the holder (a retried claim whose reply was lost).
    assert_eq!(
        arb.try_acquire(ROUNDS + 1, &late).expect("claim"),
        Acquire::Won
    );
}

#[test]
fn etcd_down_waits_never_wins_then_wins_after_restart() {
    let _one = ftvm_testkit::one_at_a_time();
    if !require_etcd("etcd_down_waits_never_wins_then_wins_after_restart") {
        return;
    }
    let mut cluster = EtcdCluster::start(1);
    let arb = Arc::new(arbiter(
        cluster.endpoints(),
        "/ftvm/restart",
        Duration::from_millis(500),
    ));
    wait_ready(&arb, Duration::from_secs(15));
    let me = id("survivor");
    assert_eq!(arb.try_acquire(1, &me).expect("claim"), Acquire::Won);

    cluster.members[0].stop(); // SIGKILL
    let err = arb.try_acquire(2, &me).expect_err("etcd is down");
    assert!(err.is_unreachable(), "{err:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let counting = Arc::new(CountingArbiter::new(arb.clone()));
    {
        let (counting, me, stop) = (counting.clone(), me.clone(), stop.clone());
        thread::spawn(move || {
            let policy = RetryPolicy {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(200),
            };
            let r = acquire_with_retry(&*counting, 2, &me, policy, || stop.load(Ordering::Relaxed));
            let _ = tx.send(r);
        });
    }
    // It keeps trying (claims refused as unreachable) and does not return.
    counting.wait_unreachable(0, 3, Duration::from_secs(20));
    assert!(
        matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "returned while etcd was down"
    );

    let restarted = Instant::now();
    cluster.members[0].start();
    let r = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("claim completed after etcd came back");
    eprintln!(
        "etcd restart: claim completed {:.0} ms after the restart",
        restarted.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(r.expect("claim"), Acquire::Won);
    assert_eq!(arb.current().expect("current"), Some((2, me)));
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn etcd_three_members_one_down_still_decides_two_down_waits() {
    let _one = ftvm_testkit::one_at_a_time();
    if !require_etcd("etcd_three_members_one_down_still_decides_two_down_waits") {
        return;
    }
    let mut cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints();
    let probe = arbiter(endpoints.clone(), "/ftvm/cluster", Duration::from_secs(1));
    wait_ready(&probe, Duration::from_secs(20));

    // Member 0 crashes; it is the first endpoint each client tries.
    cluster.members[0].stop();
    let a = arbiter(endpoints.clone(), "/ftvm/cluster", Duration::from_secs(1));
    let b = arbiter(endpoints.clone(), "/ftvm/cluster", Duration::from_secs(1));
    // If member 0 was the leader, the others first elect a new one (election timeout 500 ms):
    // the claim waits for that, as a real take-over would.
    let started = Instant::now();
    let give_up = started + Duration::from_secs(20);
    let outcome = acquire_with_retry(&a, 1, &id("node-a"), RetryPolicy::default(), || {
        Instant::now() > give_up
    });
    assert_eq!(outcome.expect("claim"), Acquire::Won);
    eprintln!(
        "etcd 3 members, 1 down: test-and-set decided in {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(
        b.try_acquire(1, &id("node-b")).expect("claim"),
        Acquire::Lost {
            generation: 1,
            winner: id("node-a")
        }
    );

    // A second member down: no quorum, so no decision — unreachable, never won.
    cluster.members[1].stop();
    let err = b.try_acquire(2, &id("node-b")).expect_err("no quorum");
    assert!(err.is_unreachable(), "{err:?}");
}
