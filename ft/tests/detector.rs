//! Failure detector scenarios on loopback UDP with real processes: a killed peer is declared
//! failed within the timeout plus a margin, traffic notes alone keep a silent peer alive,
//! old-generation heartbeats are ignored, and split-brain roles are reported.

#[path = "arbiter_support/mod.rs"]
mod arbiter_support;

use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use arbiter_support::{env, expect_child_role, free_ports, ChildGuard};
use ftvm_ft::{Detector, DetectorConfig, DetectorEvent, Fence, PeerState, Role};

const INTERVAL: Duration = Duration::from_millis(10);
const TIMEOUT: Duration = Duration::from_millis(300);
/// Allowed lateness of a declaration beyond the timeout (wake-up jitter on a loaded 2-core
/// machine running other tests in parallel).
const MARGIN: Duration = Duration::from_millis(250);

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn config(bind: u16, peer: u16, role: Role) -> DetectorConfig {
    let mut c = DetectorConfig::new(loopback(bind), loopback(peer), role);
    c.interval = INTERVAL;
    c.timeout = TIMEOUT;
    c
}

type Events = mpsc::Receiver<(Instant, DetectorEvent)>;

/// A detector whose events go to a channel.
fn detector(bind: u16, peer: u16, role: Role, fence: Fence) -> (Detector, Events) {
    let (tx, rx) = mpsc::channel();
    let d = Detector::spawn(config(bind, peer, role), fence, move |e| {
        let _ = tx.send((Instant::now(), e));
    })
    .unwrap_or_else(|e| panic!("spawn detector: {e:?}"));
    (d, rx)
}

/// Waits for the first event matching `pred` within `limit`.
fn wait_event(
    rx: &mpsc::Receiver<(Instant, DetectorEvent)>,
    limit: Duration,
    pred: impl Fn(&DetectorEvent) -> bool,
) -> Option<(Instant, DetectorEvent)> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, e)) if pred(&e) => return Some((at, e)),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

fn is_failed(e: &DetectorEvent) -> bool {
    matches!(e, DetectorEvent::PeerFailed { .. })
}

/// Waits until `d` has received at least `n` heartbeats.
fn wait_heard(d: &Detector, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.stats().heartbeats_received < n {
        assert!(Instant::now() < deadline, "no heartbeats: {:?}", d.stats());
        thread::sleep(Duration::from_millis(5));
    }
}

/// Child-process entry point (ignored in a normal test run): a primary's detector on
/// `FTVM_DET_BIND` beating towards `FTVM_DET_PEER` until killed (or 30 s).
#[test]
#[ignore = "child process entry point, run by its parent test"]
fn child_detector_peer() {
    expect_child_role("detector-peer");
    let bind: u16 = env("FTVM_DET_BIND").parse().expect("port");
    let peer: u16 = env("FTVM_DET_PEER").parse().expect("port");
    let d = Detector::spawn(config(bind, peer, Role::Primary), Fence::new(1), |_| {})
        .expect("spawn detector");
    println!("DET ready {}", d.local_addr());
    thread::sleep(Duration::from_secs(30));
}

#[test]
fn detector_declares_sigkilled_peer_process_failed_within_timeout() {
    let _one = ftvm_testkit::one_at_a_time();
    // The ports come from below the ephemeral range, so a test running in parallel cannot take
    // one before the detector binds it, as a port found by binding port 0 could (CI,
    // 2026-12-02, `Bind { .., AddrInUse }`).
    let [mine, theirs] = free_ports();
    let (d, rx) = detector(mine, theirs, Role::Backup, Fence::new(1));
    let mut child = ChildGuard::spawn_test(
        "child_detector_peer",
        "detector-peer",
        &[
            ("FTVM_DET_BIND", theirs.to_string()),
            ("FTVM_DET_PEER", mine.to_string()),
        ],
    );
    wait_heard(&d, 30);
    assert_eq!(d.peer_state(), PeerState::Alive);
    // Heartbeats that arrived while the child was starting may have let the start-up grace
    // period expire once: forget those events.
    while rx.try_recv().is_ok() {}

    child.kill(); // SIGKILL
    let killed = Instant::now();
    let (declared, event) =
        wait_event(&rx, TIMEOUT + Duration::from_secs(2), is_failed).expect("peer declared failed");
    let DetectorEvent::PeerFailed {
        detection_time,
        ever_heard,
    } = event
    else {
        unreachable!()
    };
    let after_kill = declared - killed;
    eprintln!(
        "detector: SIGKILL -> declared failed after {:.1} ms; detection time (last heartbeat -> \
         declared) {:.1} ms; timeout {} ms, interval {} ms",
        after_kill.as_secs_f64() * 1e3,
        detection_time.as_secs_f64() * 1e3,
        TIMEOUT.as_millis(),
        INTERVAL.as_millis()
    );
    assert!(ever_heard);
    assert!(detection_time >= TIMEOUT, "{detection_time:?}");
    assert!(
        detection_time <= TIMEOUT + MARGIN,
        "detection took {detection_time:?}"
    );
    assert!(
        after_kill <= TIMEOUT + MARGIN,
        "declared {after_kill:?} after the kill"
    );
    assert_eq!(d.peer_state(), PeerState::Failed);
    assert_eq!(d.stats().last_detection, Some(detection_time));
    let started = Instant::now();
    d.stop().expect("clean stop");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "stop took too long"
    );
}

#[test]
fn detector_detection_time_over_repeated_stops() {
    let _one = ftvm_testkit::one_at_a_time();
    // Five in-process trials: stop one side, measure the other's detection time.
    let mut times = Vec::new();
    for _ in 0..5 {
        let [a, b] = free_ports();
        let (watcher, rx) = detector(a, b, Role::Primary, Fence::new(3));
        let (peer, _peer_rx) = detector(b, a, Role::Backup, Fence::new(3));
        wait_heard(&watcher, 10);
        while rx.try_recv().is_ok() {}
        peer.stop().expect("clean stop");
        let (_, event) = wait_event(&rx, TIMEOUT + Duration::from_secs(2), is_failed)
            .expect("peer declared failed");
        let DetectorEvent::PeerFailed { detection_time, .. } = event else {
            unreachable!()
        };
        assert!(detection_time >= TIMEOUT && detection_time <= TIMEOUT + MARGIN);
        times.push(detection_time);
        // The stopped side is gone for good: no recovery.
        assert!(wait_event(&rx, Duration::from_millis(50), |_| true).is_none());
        watcher.stop().expect("clean stop");
    }
    times.sort();
    eprintln!(
        "detector: detection time over {} stops (timeout {} ms): min {:.1} ms, median {:.1} ms, \
         max {:.1} ms",
        times.len(),
        TIMEOUT.as_millis(),
        times[0].as_secs_f64() * 1e3,
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );
}

#[test]
fn detector_traffic_notes_alone_keep_a_silent_peer_alive() {
    let _one = ftvm_testkit::one_at_a_time();
    // The peer's heartbeat port is bound but never sends: only traffic notes show life.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    let [mine] = free_ports();
    let (d, rx) = detector(mine, silent_port, Role::Primary, Fence::new(1));
    let traffic = d.traffic();
    let feeding_until = Instant::now() + TIMEOUT * 4;
    while Instant::now() < feeding_until {
        traffic.note();
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        wait_event(&rx, Duration::ZERO, is_failed).is_none(),
        "declared failed while traffic flowed"
    );
    assert_eq!(d.peer_state(), PeerState::Alive);
    let stats = d.stats();
    assert_eq!(stats.heartbeats_received, 0);
    assert!(stats.traffic_samples >= 10, "{stats:?}");
    assert!(stats.heartbeats_sent > 0);

    // Traffic stops: declared failed after the timeout.
    let stopped = Instant::now();
    let (declared, _) = wait_event(&rx, TIMEOUT + Duration::from_secs(2), is_failed)
        .expect("declared failed once traffic stopped");
    let after = declared - stopped;
    // (The last note may precede `stopped` by one feeding period plus scheduling delay.)
    assert!(
        after >= TIMEOUT / 2,
        "declared only {after:?} after traffic stopped"
    );
    assert!(after <= TIMEOUT + MARGIN, "{after:?}");

    // Traffic resumes: recovered.
    traffic.note();
    let recovered = wait_event(&rx, Duration::from_secs(1), |e| {
        matches!(e, DetectorEvent::PeerRecovered { .. })
    });
    assert!(recovered.is_some(), "no recovery after traffic resumed");
    assert_eq!(d.peer_state(), PeerState::Alive);
}

#[test]
fn detector_ignores_old_generation_heartbeats() {
    let _one = ftvm_testkit::one_at_a_time();
    // We are in generation 2; the peer still beats in generation 1 (a superseded primary).
    let stale_fence = Fence::new(1);
    let [a, b] = free_ports();
    let (d, rx) = detector(a, b, Role::Primary, Fence::new(2));
    let (peer, _peer_rx) = detector(b, a, Role::Backup, stale_fence.clone());
    let (_, event) = wait_event(&rx, TIMEOUT + Duration::from_secs(2), is_failed)
        .expect("stale heartbeats must not keep the peer alive");
    assert!(
        matches!(
            event,
            DetectorEvent::PeerFailed {
                ever_heard: false,
                ..
            }
        ),
        "{event:?}"
    );
    let stats = d.stats();
    assert!(stats.stale_heartbeats >= 10, "{stats:?}");
    assert_eq!(stats.stale_heartbeats, stats.heartbeats_received);

    // The peer moves to the current generation: alive again.
    assert!(stale_fence.advance(2));
    assert!(
        wait_event(&rx, Duration::from_secs(1), |e| matches!(
            e,
            DetectorEvent::PeerRecovered { .. }
        ))
        .is_some(),
        "current-generation heartbeats must revive the peer"
    );

    // The peer moves past us: we are superseded.
    assert!(stale_fence.advance(5));
    let superseded = wait_event(&rx, Duration::from_secs(1), |e| {
        matches!(e, DetectorEvent::Superseded { .. })
    });
    assert_eq!(
        superseded.map(|(_, e)| e),
        Some(DetectorEvent::Superseded {
            peer_generation: 5,
            ours: 2
        })
    );
    peer.stop().expect("clean stop");
    d.stop().expect("clean stop");
}

#[test]
fn detector_reports_two_live_roles_and_drops_foreign_datagrams() {
    let _one = ftvm_testkit::one_at_a_time();
    let [a, b] = free_ports();
    let (d, rx) = detector(a, b, Role::Primary, Fence::new(1));
    // Garbage and a heartbeat-sized datagram from a stranger are dropped.
    let stranger = UdpSocket::bind("127.0.0.1:0").expect("bind");
    stranger.send_to(b"hello", loopback(a)).expect("send");
    stranger.send_to(&[0u8; 32], loopback(a)).expect("send");
    let (peer, _peer_rx) = detector(b, a, Role::Alone, Fence::new(1));
    let conflict = wait_event(&rx, Duration::from_secs(2), |e| {
        matches!(e, DetectorEvent::RoleConflict { .. })
    });
    assert_eq!(
        conflict.map(|(_, e)| e),
        Some(DetectorEvent::RoleConflict {
            peer: Role::Alone,
            ours: Role::Primary
        })
    );
    // Once we step down to backup, no more conflict; the peer stays alive throughout.
    d.set_role(Role::Backup);
    thread::sleep(Duration::from_millis(100));
    let s = d.stats();
    assert!(s.dropped >= 2, "{s:?}");
    assert_eq!(s.failures_declared, 0, "{s:?}");
    peer.stop().expect("clean stop");
    d.stop().expect("clean stop");
}

/// Gaps in the peer's heartbeat sequence are counted as missed heartbeats (per incarnation:
/// a restarted peer starts a new sequence without a gap); reordered and duplicated ones
/// are not counted twice.
#[test]
fn gaps_in_the_peers_sequence_are_missed_heartbeats() {
    use ftvm_ft::detector::Heartbeat;
    let _one = ftvm_testkit::one_at_a_time();
    let [mine, theirs] = free_ports();
    let (d, _rx) = detector(mine, theirs, Role::Backup, Fence::new(1));
    let peer = UdpSocket::bind(loopback(theirs)).expect("bind the peer's port");
    let send = |incarnation: u64, sequence: u64| {
        let hb = Heartbeat {
            role: Role::Primary,
            generation: 1,
            sequence,
            incarnation,
        };
        peer.send_to(&hb.encode(), loopback(mine)).expect("send");
    };
    // 1, 2, 3, 7 (4..6 lost), 5 (late), 7 (duplicate), 8: three missed.
    for seq in [1, 2, 3, 7, 5, 7, 8] {
        send(11, seq);
    }
    // A restarted peer: a new incarnation whose sequence starts over, then skips one.
    for seq in [1, 2, 4] {
        send(12, seq);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut s = d.stats();
    while s.heartbeats_received < 10 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
        s = d.stats();
    }
    assert_eq!(s.heartbeats_received, 10, "{s:?}");
    assert_eq!(s.heartbeats_missed, 3 + 1, "{s:?}");
    d.stop().expect("clean stop");
}
