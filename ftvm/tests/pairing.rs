//! Pairing with real `ftvm` processes: settings both sides must agree on are refused on both
//! sides with the field named (exit 205, `PAIRING_REFUSED`), and a backup's logging port
//! survives stray connections (closed at once, garbage, a HELLO of another protocol version, a
//! connection that never sends) and pairs with the real primary afterwards, for every
//! connection-oriented transport; over shm, stale ring files do not stop it either.
//! Needs root and /dev/kvm (prints SKIP otherwise).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use ftvm::exit::PAIRING_REFUSED;
use ftvm::scenario::{
    Node, Scenario, Side, BACKUP_HEARTBEAT_PORT, LOG_PORT, PRIMARY_HEARTBEAT_PORT,
};
use ftvm_channel::frame::{self, Hello, Role};

/// A pair without the scenario's failover flags (each test gives its own), over tcp.
fn prepare(tag: &str, transport: &str) -> Scenario {
    let mut config = common::config(tag);
    config.transport = transport.into();
    config.no_failover = true;
    Scenario::prepare(config).expect("prepare pair")
}

/// The failover flags of `side` as the scenario would give them.
fn ft_args(s: &Scenario, side: Side) -> Vec<String> {
    let (me, peer) = match side {
        Side::Primary => (PRIMARY_HEARTBEAT_PORT, BACKUP_HEARTBEAT_PORT),
        Side::Backup => (BACKUP_HEARTBEAT_PORT, PRIMARY_HEARTBEAT_PORT),
    };
    [
        "--arbiter",
        s.arbiter_spec(),
        "--node",
        side.name(),
        "--heartbeat",
        &format!("127.0.0.1:{me}"),
        "--peer-heartbeat",
        &format!("127.0.0.1:{peer}"),
    ]
    .map(String::from)
    .to_vec()
}

fn refused_line(node: &mut Node) -> String {
    common::assert_exits_with(node, PAIRING_REFUSED);
    node.find_line("PAIRING REFUSED")
        .unwrap_or_else(|| panic!("no PAIRING REFUSED line\n{}", node.stderr_text()))
}

/// Every setting both sides must agree on, mismatched in turn: both sides refuse with status
/// 205 and a message naming the field (the refusal of the arbiter on one side only is the
/// defect: the backup used to pair, presume the silent primary failed after 0.2 s and take
/// over while the primary served on).
#[test]
fn every_settings_mismatch_is_refused_on_both_sides_with_the_field_named() {
    const TEST: &str = "every_settings_mismatch_is_refused_on_both_sides_with_the_field_named";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    type Case = (&'static str, fn(&Scenario) -> (Vec<String>, Vec<String>));
    let cases: [Case; 7] = [
        ("arbiter", |s| (Vec::new(), ft_args(s, Side::Backup))),
        ("arbiter", |s| (ft_args(s, Side::Primary), Vec::new())),
        ("shared_disk", |_| {
            (vec!["--shared-disk".into()], Vec::new())
        }),
        ("heartbeat addresses", |s| {
            let mut b = ft_args(s, Side::Backup);
            b[7] = "127.0.0.1:7999".into();
            (ft_args(s, Side::Primary), b)
        }),
        ("fail_timeout_ms", |s| {
            let mut b = ft_args(s, Side::Backup);
            b.extend(["--fail-timeout".into(), "600".into()]);
            (ft_args(s, Side::Primary), b)
        }),
        ("generation", |s| {
            let mut b = ft_args(s, Side::Backup);
            b.extend(["--generation".into(), "2".into()]);
            (ft_args(s, Side::Primary), b)
        }),
        ("node", |s| {
            let mut b = ft_args(s, Side::Backup);
            b[3] = "primary".into();
            (ft_args(s, Side::Primary), b)
        }),
    ];
    for (field, args) in cases {
        let mut s = prepare("refuse", "tcp");
        let (p, b) = args(&s);
        s.backup = Some(s.spawn(Side::Backup, &b).expect("spawn backup"));
        s.primary = Some(s.spawn(Side::Primary, &p).expect("spawn primary"));
        let pl = refused_line(s.primary.as_mut().expect("primary"));
        let bl = refused_line(s.backup.as_mut().expect("backup"));
        eprintln!("{TEST}: {field}:\n  {pl}\n  {bl}");
        for line in [&pl, &bl] {
            assert!(line.contains(field), "{field} not named: {line}");
        }
    }
}

/// A HELLO of the next protocol version (valid checksum), as an older or newer ftvm sends.
fn hello_of_another_version() -> Vec<u8> {
    let mut b = Vec::new();
    let h = Hello {
        role: Role::Primary,
        max_frame: 65536,
        capacity: 1 << 16,
        max_payload: 1000,
        seq: 1,
        executed: 0,
        digest: [1; 32],
    };
    frame::encode_hello(&mut b, 1, &h, &[]);
    b[frame::VERSION_OFFSET] = frame::VERSION + 1;
    frame::finish(&mut b);
    let mut framed = (b.len() as u32).to_le_bytes().to_vec();
    framed.extend_from_slice(&b);
    framed
}

/// Stray connections at the backup's logging port before the primary comes, then the real
/// pair under load to a clean power-off.
fn strays_then_pair(transport: &str) {
    let test = format!("stray_connections_do_not_stop_a_waiting_backup_{transport}");
    if common::skip(&test) {
        return;
    }
    let _serial = common::serial();
    let mut s = prepare(&format!("stray-{transport}"), transport);
    let b = ft_args(&s, Side::Backup);
    s.backup = Some(s.spawn(Side::Backup, &b).expect("spawn backup"));
    s.backup
        .as_mut()
        .expect("backup")
        .wait_line("listening on", Duration::from_secs(20))
        .expect("the backup listens");
    let addr = format!("127.0.0.1:{LOG_PORT}");
    let silent = s
        .in_netns(|| {
            // Connect and close.
            drop(TcpStream::connect(&addr).expect("connect"));
            // Connect and send garbage.
            let mut g = TcpStream::connect(&addr).expect("connect");
            g.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("garbage");
            drop(g);
            // A handshake of another protocol version.
            let mut v = TcpStream::connect(&addr).expect("connect");
            v.write_all(&hello_of_another_version()).expect("hello");
            std::thread::sleep(Duration::from_millis(200));
            drop(v);
            // Half-open: connects, never sends, stays open while the primary pairs.
            TcpStream::connect(&addr).expect("connect")
        })
        .expect("enter namespace");
    std::thread::sleep(Duration::from_millis(500));
    let backup = s.backup.as_mut().expect("backup");
    assert_eq!(backup.try_status(), None, "{}", backup.stderr_text());
    let p = ft_args(&s, Side::Primary);
    s.primary = Some(s.spawn(Side::Primary, &p).expect("spawn primary"));
    s.wait_ready(Duration::from_secs(30)).expect("kv answers");
    let mut load = common::load(&s, 2, "s");
    common::wait_ops(&s, &load, 200, Duration::from_secs(20));
    load.stop();
    common::assert_no_acked_write_lost(&s, load.checker());
    drop(silent);
    let backup = s.backup.as_ref().expect("backup");
    let paired = backup
        .find_line("paired with the primary")
        .unwrap_or_else(|| panic!("no pairing line\n{}", backup.stderr_text()));
    eprintln!("{test}: {paired}");
    assert!(paired.contains("3 stray connection(s)"), "{paired}");
    assert!(
        backup
            .find_line("stray connection on the logging port")
            .is_some(),
        "{}",
        backup.stderr_text()
    );
    s.shutdown_guest();
    common::assert_exits_with(s.primary.as_mut().expect("primary"), 0);
    common::assert_exits_with(s.backup.as_mut().expect("backup"), 0);
}

#[test]
fn stray_connections_do_not_stop_a_waiting_backup_tcp() {
    strays_then_pair("tcp");
}

#[test]
fn stray_connections_do_not_stop_a_waiting_backup_tcp_spin() {
    strays_then_pair("tcp-spin");
}

#[test]
fn stray_connections_do_not_stop_a_waiting_backup_uring() {
    strays_then_pair("uring");
}

/// Stale shm ring files (garbage, as a killed earlier backup or another program may leave)
/// at the prefix: the backup replaces them and the pair runs to a clean power-off.
#[test]
fn stale_shm_files_do_not_stop_a_pair() {
    const TEST: &str = "stale_shm_files_do_not_stop_a_pair";
    if common::skip(TEST) {
        return;
    }
    let _serial = common::serial();
    let mut s = prepare("stale", "shm");
    let prefix = s.args(Side::Backup);
    let prefix = &prefix[prefix.iter().position(|a| a == "--peer").expect("--peer") + 1];
    for ext in ["a2b", "b2a", "bell"] {
        std::fs::write(format!("{prefix}.{ext}"), [0xA5u8; 4096]).expect("stale file");
    }
    let b = ft_args(&s, Side::Backup);
    s.backup = Some(s.spawn(Side::Backup, &b).expect("spawn backup"));
    s.backup
        .as_mut()
        .expect("backup")
        .wait_line("shm rings at", Duration::from_secs(20))
        .expect("the backup creates its rings");
    let p = ft_args(&s, Side::Primary);
    s.primary = Some(s.spawn(Side::Primary, &p).expect("spawn primary"));
    s.wait_ready(Duration::from_secs(30)).expect("kv answers");
    s.shutdown_guest();
    common::assert_exits_with(s.primary.as_mut().expect("primary"), 0);
    common::assert_exits_with(s.backup.as_mut().expect("backup"), 0);
}
