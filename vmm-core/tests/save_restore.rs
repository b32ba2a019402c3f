//! Save → restore → the restored VM continues and ends exactly like an uninterrupted run.

use std::time::Duration;

use ftvm_testkit::require_kvm;
use ftvm_vmm_core::guests;
use ftvm_vmm_core::state::StateError;
use ftvm_vmm_core::vm::{buffer_console, RunOutcome, Vm, VmConfig, VmError};

const CMDLINE: &str = "size=4M rounds=480 seed=7";

fn config() -> (VmConfig, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let (console, out) = buffer_console();
    (
        VmConfig {
            mem_size: 32 << 20,
            cmdline: CMDLINE.into(),
            console,
            ..Default::default()
        },
        out,
    )
}

fn uninterrupted() -> (RunOutcome, Vec<u8>, u64) {
    let (cfg, out) = config();
    let mut vm = Vm::new(&cfg, guests::by_name("cpu").unwrap()).unwrap();
    let r = vm.run().unwrap();
    let text = out.lock().unwrap().clone();
    (r, text, vm.memory_digest())
}

fn restore_and_finish(path: &std::path::Path, mut before: Vec<u8>) -> (RunOutcome, Vec<u8>, u64) {
    let (cfg, out) = config();
    let mut vm = Vm::restore(&cfg, path).unwrap();
    let r = vm.run().unwrap();
    before.extend_from_slice(&out.lock().unwrap());
    (r, before, vm.memory_digest())
}

#[test]
fn restore_at_an_exit_continues_identically() {
    require_kvm!("restore_at_an_exit_continues_identically");
    let reference = uninterrupted();
    assert_eq!(reference.0, RunOutcome::PoweredOff(0));
    let text = String::from_utf8_lossy(&reference.1).into_owned();
    assert!(text.contains("cpu: checksum="), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let (cfg, out) = config();
    let mut vm = Vm::new(&cfg, guests::by_name("cpu").unwrap()).unwrap();
    // The first console line is printed with two exits; stop right after it.
    assert_eq!(vm.run_until(Some(2)).unwrap(), RunOutcome::ExitLimit);
    vm.save(&path).unwrap();
    let before = out.lock().unwrap().clone();
    assert!(String::from_utf8_lossy(&before).starts_with("cpu: size="));
    drop(vm);
    let restored = restore_and_finish(&path, before);
    assert_eq!(restored, reference);
}

#[test]
fn pause_mid_computation_save_restore() {
    require_kvm!("pause_mid_computation_save_restore");
    let reference = uninterrupted();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let (cfg, out) = config();
    let mut vm = Vm::new(&cfg, guests::by_name("cpu").unwrap()).unwrap();
    // Kick once the guest is provably mid-run: its first line is out, its checksum is not.
    let control = vm.control();
    let console = out.clone();
    let kicker = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        while !console.lock().unwrap().contains(&b'\n') && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_micros(200));
        }
        control.kick();
    });
    let started = std::time::Instant::now();
    let r = vm.run().unwrap();
    kicker.join().unwrap();
    assert_eq!(
        r,
        RunOutcome::Paused,
        "the guest ended {:?} after its start, before the kick landed: give it more rounds",
        started.elapsed()
    );
    vm.save(&path).unwrap();
    // The paused VM itself can also go on.
    let r2 = vm.run().unwrap();
    assert_eq!(r2, reference.0);
    assert_eq!(&*out.lock().unwrap(), &reference.1);
    assert_eq!(vm.memory_digest(), reference.2);
    // And so can its restored copy.
    let before = {
        let all = out.lock().unwrap().clone();
        let s = String::from_utf8_lossy(&all).into_owned();
        s.lines()
            .next()
            .map(|l| format!("{l}\n"))
            .unwrap_or_default()
            .into_bytes()
    };
    let restored = restore_and_finish(&path, before);
    assert_eq!(restored, reference);
}

#[test]
fn corrupt_snapshot_is_rejected() {
    require_kvm!("corrupt_snapshot_is_rejected");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.snap");
    // Format version 2 (the typed sections), then 6 bytes: less than one section header.
    std::fs::write(&path, b"FTVMSNAP\x02\0\0\0\x01\0\0\0\xff\xff").unwrap();
    let (cfg, _) = config();
    let e = Vm::restore(&cfg, &path).unwrap_err();
    assert!(
        matches!(e, VmError::State(StateError::Truncated(_))),
        "{e:?}"
    );
    let e = Vm::restore(&cfg, &dir.path().join("missing.snap")).unwrap_err();
    assert!(
        matches!(&e, VmError::State(StateError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound),
        "{e:?}"
    );
}

/// A VM with every device — virtio-net (no backend), virtio-blk on an image, virtio-console and
/// the system device — running `kv` (it boots, sets up every queue, reads its disk log) is
/// saved and restored: the restored state equals the saved one, section by section (the clock
/// goes on from its saved value), and the restored VM runs on.
#[test]
fn every_device_round_trips_through_a_snapshot() {
    require_kvm!("every_device_round_trips_through_a_snapshot");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("kv.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .unwrap();
    let (console, out) = buffer_console();
    let cfg = VmConfig {
        mem_size: 32 << 20,
        cmdline: "ip=10.0.2.15/24 gw=10.0.2.1 port=6379".into(),
        disk: Some(disk),
        net_without_backend: true,
        console,
        ..Default::default()
    };
    let mut vm = Vm::new(&cfg, guests::by_name("kv").unwrap()).unwrap();
    assert_eq!(vm.run_until(Some(3000)).unwrap(), RunOutcome::ExitLimit);
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    assert!(text.contains("kv: listening"), "{text}");
    let saved = vm.capture().unwrap();
    let (net, blk, console) = (
        saved.devices.net.clone().expect("net"),
        saved.devices.blk.clone().expect("blk"),
        saved.devices.console.clone().expect("console"),
    );
    // kv drives virtio-net and virtio-blk (it prints through the system device: the console
    // slot's state is that of a device never set up, saved all the same).
    for t in [&net.transport, &blk.transport] {
        assert_ne!(t.status & 4, 0, "driver OK: {t:?}");
        assert!(t.queues.iter().all(|q| q.ready), "{t:?}");
    }
    assert!(blk.transport.queues[0].next_avail > 0, "the disk was read");
    assert!(blk.device.sectors == (8 << 20) / 512 && console.device.bytes_out == 0);
    let path = dir.path().join("vm.snap");
    vm.save(&path).unwrap();
    let mut back = Vm::restore(&cfg, &path).unwrap();
    let mut restored = back.capture().unwrap();
    assert!(restored.devices.sys.clock_ns >= saved.devices.sys.clock_ns);
    restored.devices.sys.clock_ns = saved.devices.sys.clock_ns;
    // The time-stamp counter moves with time too (KVM sets it when the MSR is written, and
    // then it runs; a guest must not read it: CPUID hides it).
    let tsc = |s: &mut ftvm_vmm_core::state::MachineState| {
        s.vcpu.msrs.retain(|(index, _)| *index != 0x10);
    };
    let mut saved_cmp = saved.clone();
    tsc(&mut saved_cmp);
    tsc(&mut restored);
    assert_eq!(restored, saved_cmp);
    assert_eq!(back.memory_digest(), vm.memory_digest());
    assert_eq!(back.run_until(Some(3500)).unwrap(), RunOutcome::ExitLimit);
}

/// Any section of a real snapshot file with another version is refused, with the section
/// named; so is the file cut anywhere, and a file of format version 1.
#[test]
fn a_snapshot_with_a_section_of_another_version_or_cut_short_is_refused() {
    use ftvm_vmm_core::state::{
        section_name, SectionHeader, StateError, FILE_HEADER_LEN, SECTION_HEADER_LEN,
    };
    use ftvm_vmm_core::vm::VmError;
    use zerocopy::FromBytes;
    require_kvm!("a_snapshot_with_a_section_of_another_version_or_cut_short_is_refused");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let (cfg, _) = config();
    let mut vm = Vm::new(&cfg, guests::by_name("cpu").unwrap()).unwrap();
    assert_eq!(vm.run_until(Some(2)).unwrap(), RunOutcome::ExitLimit);
    vm.save(&path).unwrap();
    let file = std::fs::read(&path).unwrap();
    let bad = dir.path().join("bad.snap");
    let restore = |bytes: &[u8]| {
        std::fs::write(&bad, bytes).unwrap();
        match Vm::restore(&cfg, &bad) {
            Ok(_) => panic!("restored"),
            Err(VmError::State(e)) => e,
            Err(e) => panic!("{e:?}"),
        }
    };
    let mut at = FILE_HEADER_LEN;
    let mut names = Vec::new();
    while at < file.len() {
        let (h, _) = SectionHeader::read_from_prefix(&file[at..]).unwrap();
        let mut patched = file.clone();
        patched[at + 4..at + 8].copy_from_slice(&(h.version + 1).to_le_bytes());
        match restore(&patched) {
            StateError::SectionVersion { section, found, .. } => {
                assert_eq!((section, found), (section_name(h.tag), h.version + 1));
            }
            e => panic!("section {}: {e:?}", section_name(h.tag)),
        }
        names.push(section_name(h.tag));
        // Cut inside this section's header and inside its payload.
        for cut in [at + 3, at + SECTION_HEADER_LEN + h.len as usize / 2] {
            if cut < file.len() && h.len > 1 {
                let e = restore(&file[..cut]);
                assert!(matches!(e, StateError::Truncated(_)), "{e:?}");
            }
        }
        at += SECTION_HEADER_LEN + h.len as usize;
    }
    assert_eq!(
        names,
        ["CONFIG", "VCPU", "SYS", "CONSOLE", "EXITS", "MEMORY"],
        "the cpu VM has no net and no disk"
    );
    let mut v1 = file.clone();
    v1[8] = 1;
    assert!(matches!(
        restore(&v1),
        StateError::FormatVersion {
            found: 1,
            expected: 2
        }
    ));
}
