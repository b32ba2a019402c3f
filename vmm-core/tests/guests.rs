//! Each real guest boots and gives its expected output.

use ftvm_testkit::kv as common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ftvm_testkit::require_kvm;
use ftvm_vmm_core::guests;
use ftvm_vmm_core::vm::{buffer_console, RunOutcome, Vm, VmConfig};

fn run_cpu(cmdline: &str) -> (RunOutcome, String) {
    let (console, out) = buffer_console();
    let cfg = VmConfig {
        mem_size: 32 << 20,
        cmdline: cmdline.into(),
        console,
        ..Default::default()
    };
    let mut vm = Vm::new(&cfg, guests::by_name("cpu").expect("cpu embedded")).expect("vm");
    let r = vm.run().expect("run");
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    (r, text)
}

fn checksum(text: &str) -> String {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu: checksum="))
        .expect("checksum line");
    let hex = line.trim_start_matches("cpu: checksum=").to_string();
    assert_eq!(hex.len(), 16, "{line}");
    assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{line}");
    hex
}

#[test]
fn cpu_guest_prints_a_deterministic_checksum() {
    require_kvm!("cpu_guest_prints_a_deterministic_checksum");
    let (r1, t1) = run_cpu("size=1M rounds=8 seed=1");
    let (r2, t2) = run_cpu("size=1M rounds=8 seed=1");
    let (r3, t3) = run_cpu("size=1M rounds=8 seed=2");
    assert_eq!(
        (r1, r2, r3),
        (
            RunOutcome::PoweredOff(0),
            RunOutcome::PoweredOff(0),
            RunOutcome::PoweredOff(0)
        )
    );
    assert!(
        t1.starts_with("cpu: size=1048576 rounds=8 seed=1\n"),
        "{t1}"
    );
    assert_eq!(checksum(&t1), checksum(&t2));
    assert_ne!(checksum(&t1), checksum(&t3));
}

#[test]
fn cpu_guest_bad_cmdline_exits_2() {
    require_kvm!("cpu_guest_bad_cmdline_exits_2");
    let (r, _) = run_cpu("size=banana");
    assert_eq!(r, RunOutcome::PoweredOff(2));
}

#[test]
fn stream_guest_sinks_sources_and_reports() {
    if ftvm_testkit::skip::if_missing(
        "stream_guest_sinks_sources_and_reports",
        common::net_missing(),
    ) {
        return;
    }
    let ns = common::namespace("stream");
    let (console, out) = buffer_console();
    let cfg = VmConfig {
        mem_size: 64 << 20,
        cmdline: format!("ip={}/24 gw=10.0.2.1", common::GUEST_IP),
        tap: Some(common::TAP.into()),
        console,
        ..Default::default()
    };
    let elf = guests::by_name("stream").expect("stream embedded");
    let (tx, rx) = std::sync::mpsc::channel();
    let vm_thread = ns
        .spawn("stream-vcpu", move || {
            let mut vm = Vm::new(&cfg, elf).expect("vm");
            tx.send(vm.control()).expect("send control");
            vm.run().map_err(|e| format!("{e:?}"))
        })
        .expect("spawn");
    let control = rx.recv().expect("VM started");
    let result = ns
        .run(|| -> std::io::Result<String> {
            let addr = |port: u16| format!("{}:{port}", common::GUEST_IP);
            let connect = |port: u16| -> std::io::Result<TcpStream> {
                let mut last = None;
                for _ in 0..100 {
                    match TcpStream::connect_timeout(
                        &addr(port).parse().expect("addr"),
                        Duration::from_secs(1),
                    ) {
                        Ok(s) => {
                            s.set_read_timeout(Some(Duration::from_secs(10)))?;
                            return Ok(s);
                        }
                        Err(e) => last = Some(e),
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(last.unwrap_or_else(|| std::io::Error::other("no attempt")))
            };
            let mut sink = connect(5001)?;
            let data = vec![0x5au8; 1 << 20];
            sink.write_all(&data)?;
            drop(sink);
            let mut source = connect(5002)?;
            let mut got = vec![0u8; 200_000];
            source.read_exact(&mut got)?;
            for (i, b) in got.iter().enumerate() {
                assert_eq!(*b as usize, i % 251, "source byte {i}");
            }
            drop(source);
            let mut ctl = connect(5000)?;
            // The sink may still be draining: poll stats until all bytes were counted.
            let mut line = String::new();
            for _ in 0..50 {
                ctl.write_all(b"stats\n")?;
                line.clear();
                BufReader::new(&ctl).read_line(&mut line)?;
                if line.contains("sunk=1048576") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            ctl.write_all(b"quit\n")?;
            Ok(line)
        })
        .expect("enter netns");
    if result.is_err() {
        control.kick();
    }
    let stats = result.expect("talk to the stream guest");
    assert!(stats.contains("sunk=1048576"), "stats: {stats}");
    let outcome = vm_thread
        .join()
        .expect("join")
        .expect("netns")
        .expect("run");
    assert_eq!(outcome, RunOutcome::PoweredOff(0));
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    assert!(text.contains("stream: sink on 10.0.2.15:5001"), "{text}");
    assert!(text.contains("stream: totals: sunk=1048576"), "{text}");
}
