//! The `kv` guest through a TAP device in a network namespace, driven by `redis-cli`,
//! `redis-benchmark` and a few raw RESP requests.

use ftvm_testkit::kv as common;

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use common::{namespace, net_missing, redis_reply, start_kv, start_kv_with_mem, wait_ready};
use ftvm_testkit::netns::Netns;
use ftvm_vmm_core::vm::RunOutcome;

fn disk(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let p = dir.path().join("kv.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(8 << 20).unwrap();
    p
}

#[test]
fn redis_cli_set_get_incr() {
    if ftvm_testkit::skip::if_missing("redis_cli_set_get_incr", net_missing()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&dir);
    let ns = namespace("kv");
    let vm = start_kv(&ns, &disk, "");
    wait_ready(&ns, &vm);
    assert_eq!(redis_reply(&ns, &["SET", "greeting", "hello world"]), "OK");
    assert_eq!(redis_reply(&ns, &["GET", "greeting"]), "hello world");
    assert_eq!(redis_reply(&ns, &["INCR", "counter"]), "1");
    assert_eq!(redis_reply(&ns, &["INCR", "counter"]), "2");
    assert_eq!(redis_reply(&ns, &["GET", "missing"]), "");
    common::redis_shutdown(&ns);
    assert_eq!(vm.join(), Ok(RunOutcome::PoweredOff(0)));
}

#[test]
fn kv_data_survives_a_restart_from_the_same_disk() {
    if ftvm_testkit::skip::if_missing(
        "kv_data_survives_a_restart_from_the_same_disk",
        net_missing(),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&dir);
    let ns = namespace("kvp");
    {
        let vm = start_kv(&ns, &disk, "");
        wait_ready(&ns, &vm);
        assert_eq!(redis_reply(&ns, &["SET", "persist", "across-boots"]), "OK");
        assert_eq!(redis_reply(&ns, &["INCRBY", "n", "41"]), "41");
        common::redis_shutdown(&ns);
        assert_eq!(vm.join(), Ok(RunOutcome::PoweredOff(0)));
    }
    let vm = start_kv(&ns, &disk, "");
    wait_ready(&ns, &vm);
    assert_eq!(redis_reply(&ns, &["GET", "persist"]), "across-boots");
    assert_eq!(redis_reply(&ns, &["INCR", "n"]), "42");
    common::redis_shutdown(&ns);
    let console = vm.console.clone();
    assert_eq!(vm.join(), Ok(RunOutcome::PoweredOff(0)));
    let text = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    assert!(
        text.contains("2 keys recovered"),
        "second boot console: {text}"
    );
}

/// One request on a fresh connection from inside `ns`; the reply's first line and, for a bulk
/// string, its data.
fn request(ns: &Netns, args: &[&[u8]]) -> (String, Vec<u8>) {
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
    ns.run(|| {
        let addr = (common::GUEST_IP, 6379u16);
        let s = std::net::TcpStream::connect(addr).expect("connect to kv");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (&s).write_all(&req).expect("send");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).expect("reply line");
        let line = line.trim_end().to_string();
        let mut data = Vec::new();
        if let Some(n) = line.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
            data.resize(n + 2, 0);
            r.read_exact(&mut data).expect("bulk data");
            data.truncate(n);
        }
        (line, data)
    })
    .expect("enter namespace")
}

/// `used_memory` and `maxmemory` from `INFO memory`.
fn info_memory(ns: &Netns) -> (u64, u64) {
    let (_, text) = request(ns, &[b"INFO", b"memory"]);
    let text = String::from_utf8(text).expect("INFO is text");
    let field = |k: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {text:?}"))
    };
    (field("used_memory"), field("maxmemory"))
}

/// Defect: a 16 MiB `kv` under `redis-benchmark -r` (unique keys) filled its heap and
/// panicked ("memory allocation of ... bytes failed", exit 101) within seconds. Now the full
/// store answers `-OOM`, reads go on, a DEL makes room for writes again, and the guest runs on
/// until SHUTDOWN.
#[test]
fn a_full_kv_answers_oom_and_keeps_serving() {
    const TEST: &str = "a_full_kv_answers_oom_and_keeps_serving";
    if ftvm_testkit::skip::if_missing(TEST, net_missing()) {
        return;
    }
    if ftvm_testkit::skip_without(TEST, "redis-benchmark", "redis-tools") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("kv.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .expect("disk");
    let ns = namespace("kvoom");
    let vm = start_kv_with_mem(&ns, &disk, "", 16 << 20);
    wait_ready(&ns, &vm);
    let old = vec![b'o'; 100 << 10];
    assert_eq!(request(&ns, &[b"SET", b"old", &old]).0, "+OK");

    // Fill with unique keys until the store refuses (redis-benchmark stops at the first error).
    let out = ns
        .exec(
            "timeout",
            &[
                "60",
                "redis-benchmark",
                "-h",
                common::GUEST_IP,
                "-t",
                "set",
                "-r",
                "100000000",
                "-n",
                "100000",
                "-d",
                "1000",
                "-c",
                "20",
                "-q",
            ],
        )
        .expect("redis-benchmark");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("OOM command not allowed when used memory > 'maxmemory'"),
        "redis-benchmark saw no OOM reply: {}\nconsole: {}",
        text.chars()
            .rev()
            .take(600)
            .collect::<String>()
            .chars()
            .rev()
            .collect::<String>(),
        vm.console_text()
    );
    let (used, max) = info_memory(&ns);
    assert!(
        max > 0 && used > max / 10 * 9,
        "used_memory {used} maxmemory {max}"
    );
    eprintln!("{TEST}: full at used_memory {used} of maxmemory {max}");

    // Full: a write is refused and changes nothing; reads go on.
    let big = vec![b'n'; 30 << 10];
    let oom = "-OOM command not allowed when used memory > 'maxmemory'.";
    assert_eq!(request(&ns, &[b"SET", b"new", &big]).0, oom);
    assert_eq!(request(&ns, &[b"GET", b"new"]).0, "$-1");
    assert_eq!(
        request(&ns, &[b"GET", b"old"]),
        (format!("${}", old.len()), old)
    );
    // A DEL frees room: the same write succeeds now.
    assert_eq!(request(&ns, &[b"DEL", b"old"]).0, ":1");
    assert_eq!(request(&ns, &[b"SET", b"new", &big]).0, "+OK");
    assert_eq!(
        request(&ns, &[b"GET", b"new"]),
        (format!("${}", big.len()), big)
    );

    assert!(
        !vm.console_text().contains("panic"),
        "{}",
        vm.console_text()
    );
    common::redis_shutdown(&ns);
    let console = vm.console.clone();
    assert_eq!(
        vm.join(),
        Ok(RunOutcome::PoweredOff(0)),
        "the guest never exited before SHUTDOWN"
    );
    let text = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    assert!(text.contains("writes refused (OOM)"), "{text}");
}
