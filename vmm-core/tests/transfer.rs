//! Live state transfer on real KVM: dirty tracking catches the vCPU's and the devices' writes,
//! and a VM transferred while its guest runs continues on a second VM from exactly the exit of
//! the cut, to the same end as a VM that was never transferred.

use ftvm_testkit::kv as common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ftvm_testkit::require_kvm;
use ftvm_testkit::Asm;
use ftvm_vmm_core::dirty::PAGE_SIZE;
use ftvm_vmm_core::guests;
use ftvm_vmm_core::memory::{digest, IMAGE_BASE};
use ftvm_vmm_core::state::MachineState;
use ftvm_vmm_core::transfer::{
    Chunk, Convergence, Sink, Source, SourceConfig, Step, TransferHandle,
};
use ftvm_vmm_core::vm::{buffer_console, RunOutcome, Vm, VmConfig, VmState, VmThread};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

fn config(mem_size: u64, cmdline: &str) -> (VmConfig, Arc<Mutex<Vec<u8>>>) {
    let (console, out) = buffer_console();
    (
        VmConfig {
            mem_size,
            cmdline: cmdline.into(),
            console,
            ..Default::default()
        },
        out,
    )
}

/// What a run ended with: outcome, exits, memory digest, general and special registers.
#[derive(Debug, PartialEq, Eq)]
struct End {
    outcome: RunOutcome,
    exits: u64,
    memory: u64,
    regs: Vec<u8>,
}

fn end_of(vm: &mut Vm, outcome: RunOutcome) -> End {
    let s = vm.capture().expect("capture");
    End {
        outcome,
        exits: vm.stats().total(),
        memory: vm.memory_digest(),
        regs: registers(&s),
    }
}

/// The general and special registers of a state (not the MSRs: the TSC moves with time).
fn registers(s: &MachineState) -> Vec<u8> {
    let mut b = postcard::to_stdvec(&s.vcpu.regs).unwrap();
    b.extend(postcard::to_stdvec(&s.vcpu.sregs).unwrap());
    b
}

/// A transfer of the VM running on `t` into a new VM built with `backends`: chunks are encoded
/// and decoded on the way (as a link would carry them). Returns the receiving VM, the state at
/// the cut, the source's memory digest at the cut and the source's round figures.
struct Transferred {
    vm: Vm,
    cut: MachineState,
    source_memory_at_cut: u64,
    rounds: Vec<ftvm_vmm_core::transfer::RoundStats>,
}

fn transfer(
    t: &VmThread,
    handle: TransferHandle,
    backends: &VmConfig,
    cfg: SourceConfig,
) -> Transferred {
    let mem = handle.memory().clone();
    let mut src = Source::new(handle, cfg);
    let mut sink = Sink::new(backends);
    let mut cut = None;
    let mut at_cut = 0;
    loop {
        match src.next_step().expect("source") {
            Step::Chunk(c) => {
                let bytes = c.encode().expect("encode");
                sink.apply(Chunk::decode(&bytes).expect("decode"))
                    .expect("apply");
            }
            Step::Pause => {
                assert_eq!(t.pause(), VmState::Paused, "the guest ended before the cut");
                let exits = t.exits();
                let state = t.capture().expect("capture");
                assert_eq!(state.exit_index(), exits, "capture is at the paused exit");
                assert_eq!(t.exits(), exits, "a paused VM makes no exit");
                at_cut = digest(&mem);
                cut = Some(state.clone());
                src.stop_and_copy(state).expect("stop and copy");
            }
            Step::Done => break,
        }
    }
    Transferred {
        vm: sink.finish().expect("finish"),
        cut: cut.expect("paused"),
        source_memory_at_cut: at_cut,
        rounds: src.rounds().to_vec(),
    }
}

/// The dirty log reports exactly the pages the guest writes (its known pattern), between two
/// harvests, plus at most the few page-table pages whose accessed/dirty bits the CPU sets; and
/// nothing when the guest does not run. A write the VMM makes (as a device does, through
/// vm-memory) is reported too, though KVM never sees it.
#[test]
fn the_dirty_log_reports_the_pages_written_by_the_guest_and_by_the_vmm() {
    require_kvm!("the_dirty_log_reports_the_pages_written_by_the_guest_and_by_the_vmm");
    const BASE: u64 = 16 * MIB;
    const PAGES: u64 = 1000;
    let (cfg, _) = config(64 * MIB, "");
    let elf = Asm::new().dirty_pages(BASE as u32, PAGES as u32, 3).elf();
    let mut vm = Vm::new(&cfg, &elf).unwrap();
    let log = vm.dirty_log();
    assert!(log.take().is_err(), "take before start");
    log.start().unwrap();
    for round in 1..=2u64 {
        // One exit per round of writes: stop right after round `round`.
        assert_eq!(vm.run_until(Some(round)).unwrap(), RunOutcome::ExitLimit);
        let h = log.take().unwrap();
        let first = BASE / PAGE_SIZE;
        for p in first..first + PAGES {
            assert!(
                h.pages.contains(p),
                "round {round}: page {p} written but not reported"
            );
        }
        let others: Vec<u64> = (0..log.pages())
            .filter(|p| h.pages.contains(*p) && !(first..first + PAGES).contains(p))
            .collect();
        // The page tables below the image (A/D bits) at most.
        assert!(
            others.len() <= 8 && others.iter().all(|p| p * PAGE_SIZE < IMAGE_BASE),
            "round {round}: unexpected pages {others:?}"
        );
        assert_eq!(h.vmm, 0, "the VMM wrote nothing");
        assert!(h.kvm >= PAGES);
        let mut check = [0u8; 8];
        vm.memory()
            .read_slice(&mut check, GuestAddress(BASE + 5 * PAGE_SIZE))
            .unwrap();
        assert_eq!(u64::from_le_bytes(check), round - 1, "the known pattern");
    }
    // Nothing runs: nothing is dirty.
    assert!(log.take().unwrap().pages.is_empty());
    // A VMM-side write (the write path every device uses): reported by the VMM's bitmap.
    vm.memory()
        .write_slice(&[0xEE; 16], GuestAddress(40 * MIB + 0xff8))
        .unwrap();
    let h = log.take().unwrap();
    let pages: Vec<u64> = h
        .pages
        .runs()
        .flat_map(|r| r.first..r.first + r.count)
        .collect();
    let at = 40 * MIB / PAGE_SIZE;
    assert_eq!(pages, vec![at, at + 1], "a write across a page boundary");
    assert_eq!((h.kvm, h.vmm), (0, 2));
    log.stop().unwrap();
    assert!(log.take().is_err(), "take after stop");
    assert_eq!(
        vm.run().unwrap(),
        RunOutcome::PoweredOff(3),
        "the guest runs on"
    );
}

/// A guest that dirties 8 MiB per round runs on its own thread while it is transferred over
/// several pre-copy rounds, then stopped and copied: right after the cut the receiver's memory
/// and state equal the source's, and both — the source resumed, the receiver started — run to
/// the power-off of a VM that was never transferred (same exits, memory, registers).
#[test]
fn a_guest_that_dirties_memory_fast_continues_exactly_after_a_live_transfer() {
    require_kvm!("a_guest_that_dirties_memory_fast_continues_exactly_after_a_live_transfer");
    const ROUNDS: u32 = 20_000;
    let elf = Asm::new().dirty_pages(16 << 20, 2048, ROUNDS).elf();
    let (cfg, _) = config(64 * MIB, "");
    let reference = {
        let mut vm = Vm::new(&cfg, &elf).unwrap();
        let r = vm.run().unwrap();
        end_of(&mut vm, r)
    };
    assert_eq!(reference.outcome, RunOutcome::PoweredOff(u64::from(ROUNDS)));
    assert_eq!(reference.exits, u64::from(ROUNDS) + 1);

    let vm = Vm::new(&cfg, &elf).unwrap();
    let handle = TransferHandle::of(&vm);
    let t = VmThread::spawn(vm).unwrap();
    while t.exits() < 10 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let cfg_src = SourceConfig {
        // Pre-copy until nothing is left dirty at the end of a round, or 4 rounds.
        convergence: Convergence {
            max_rounds: 4,
            max_final_bytes: 0,
        },
        ..Default::default()
    };
    let tr = transfer(&t, handle, &cfg, cfg_src);
    let rounds = &tr.rounds;
    let n = rounds.len();
    assert!(
        (3..=5).contains(&n),
        "2 to 4 pre-copy rounds and the stop-and-copy: {rounds:?}"
    );
    assert_eq!(
        rounds[0].pages,
        64 * MIB / PAGE_SIZE,
        "round 0 copies everything"
    );
    assert!(
        rounds[0].dirty_after > 0 && rounds[1].pages == rounds[0].dirty_after,
        "the guest dirtied pages during round 0, sent in round 1: {rounds:?}"
    );
    assert!(rounds[n - 1].final_round && rounds[..n - 1].iter().all(|r| !r.final_round));
    let cut = tr.cut.exit_index();
    assert!(cut > 0 && cut < reference.exits, "cut at exit {cut}");
    // Right after the cut: same memory, same state.
    let mut dest = tr.vm;
    assert_eq!(dest.memory_digest(), tr.source_memory_at_cut);
    assert_eq!(dest.stats().total(), cut);
    let at_dest = dest.capture().unwrap();
    assert_eq!(registers(&at_dest), registers(&tr.cut));
    assert_eq!(at_dest.exits, tr.cut.exits);
    assert_eq!(at_dest.devices.console, tr.cut.devices.console);
    // Both go on to the reference's end.
    t.resume();
    let (mut src, outcome) = t.join().unwrap();
    assert_eq!(
        end_of(&mut src, outcome),
        reference,
        "the source after the cut"
    );
    let outcome = dest.run().unwrap();
    assert_eq!(end_of(&mut dest, outcome), reference, "the receiver");
}

/// The `cpu` guest is cut in the middle of its computation (between two exits, far from any
/// exit: a kick out of guest code) and the receiver prints the reference checksum.
#[test]
fn a_computing_guest_finishes_its_computation_on_the_receiver() {
    require_kvm!("a_computing_guest_finishes_its_computation_on_the_receiver");
    let cmdline = "size=16M rounds=300 seed=11";
    let elf = guests::by_name("cpu").unwrap();
    let (cfg, ref_out) = config(64 * MIB, cmdline);
    let reference = {
        let mut vm = Vm::new(&cfg, elf).unwrap();
        let r = vm.run().unwrap();
        end_of(&mut vm, r)
    };
    let ref_text = String::from_utf8_lossy(&ref_out.lock().unwrap()).into_owned();
    assert!(ref_text.contains("cpu: checksum="), "{ref_text}");

    let (src_cfg, src_out) = config(64 * MIB, cmdline);
    let vm = Vm::new(&src_cfg, elf).unwrap();
    let handle = TransferHandle::of(&vm);
    let t = VmThread::spawn(vm).unwrap();
    // Let it start computing (its first line printed), then transfer.
    while !String::from_utf8_lossy(&src_out.lock().unwrap()).contains('\n') {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let (dest_cfg, dest_out) = config(0, "");
    let tr = transfer(&t, handle, &dest_cfg, SourceConfig::default());
    drop(t.stop());
    let before = String::from_utf8_lossy(&src_out.lock().unwrap()).into_owned();
    assert!(
        !before.contains("checksum"),
        "the source finished before the cut: {before}"
    );
    let mut dest = tr.vm;
    assert_eq!(dest.memory_digest(), tr.source_memory_at_cut);
    let outcome = dest.run().unwrap();
    assert_eq!(end_of(&mut dest, outcome), reference);
    let after = String::from_utf8_lossy(&dest_out.lock().unwrap()).into_owned();
    assert_eq!(format!("{before}{after}"), ref_text);
}

/// The `kv` guest on a TAP in a network namespace, with its own disk, is migrated while a
/// client keeps writing: memory **and the disk image** are copied live (the disk's dirty blocks
/// tracked in virtio-blk), the source stops at the cut, the receiver takes over the TAP and
/// serves every write a client was told succeeded — before, during and after the transfer —
/// from its copy of the disk and memory. Right after the cut the receiver's memory and image
/// equal the source's.
#[test]
fn kv_with_its_disk_is_migrated_live_under_writes() {
    if let Some(r) = common::net_missing() {
        eprintln!("SKIP kv_with_its_disk_is_migrated_live_under_writes: {r}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src_disk = common::blank_disk(dir.path(), "src.img");
    let dest_disk = dir.path().join("dest.img");
    let ns = Arc::new(common::namespace("xfer"));
    let (console, src_out) = buffer_console();
    let cfg = VmConfig {
        mem_size: 64 * MIB,
        cmdline: format!("ip={}/24 gw=10.0.2.1 port=6379", common::GUEST_IP),
        disk: Some(src_disk.clone()),
        tap: Some(common::TAP.into()),
        console,
        ..Default::default()
    };
    let vm = ns
        .run(move || Vm::new(&cfg, guests::by_name("kv").unwrap()))
        .unwrap()
        .unwrap();
    let handle = TransferHandle::of(&vm);
    let t = VmThread::spawn(vm).unwrap();
    common::wait_ready_with(&ns, &src_out);
    for i in 0..20 {
        assert_eq!(
            common::redis_reply(&ns, &["SET", &format!("before{i}"), &format!("v{i}")]),
            "OK"
        );
    }
    // A client writing all along; it keeps the keys it was told OK. (`stop` is set when the
    // test ends, even by a panic, so that the namespace is deleted.)
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_exit = StopOnDrop(stop.clone());
    let writer = {
        let (ns, stop) = (ns.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                let key = format!("during{i}");
                let out = common::redis(&ns, &["SET", &key, &format!("w{i}")]);
                if String::from_utf8_lossy(&out.stdout).trim() == "OK" {
                    acked.push((key, format!("w{i}")));
                }
                i += 1;
            }
            acked
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let (dest_console, dest_out) = buffer_console();
    let backends = VmConfig {
        disk: Some(dest_disk.clone()),
        net_without_backend: true,
        console: dest_console,
        ..Default::default()
    };
    let tr = transfer(&t, handle, &backends, SourceConfig::default());
    assert!(tr.rounds.len() >= 2, "{:?}", tr.rounds);
    assert!(
        tr.rounds[0].disk_blocks > 0,
        "the image is copied: {:?}",
        tr.rounds
    );
    // The source stops for good at the cut (a migration): its TAP is released.
    let (src_vm, outcome) = t.stop().unwrap();
    assert_eq!(outcome, RunOutcome::Paused);
    assert_eq!(src_vm.stats().total(), tr.cut.exit_index());
    drop(src_vm);
    let dest = tr.vm;
    assert_eq!(dest.memory_digest(), tr.source_memory_at_cut);
    assert_eq!(
        std::fs::read(&dest_disk).unwrap(),
        std::fs::read(&src_disk).unwrap(),
        "the receiver's image equals the source's at the cut"
    );
    let net = dest.net().unwrap().clone();
    ns.run(move || net.attach_tap(common::TAP))
        .unwrap()
        .unwrap();
    let dt = VmThread::spawn(dest).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Release);
    let acked = writer.join().unwrap();
    assert!(
        !acked.is_empty(),
        "no write was acknowledged during the transfer"
    );
    for i in 0..20 {
        assert_eq!(
            common::redis_reply(&ns, &["GET", &format!("before{i}")]),
            format!("v{i}")
        );
    }
    for (k, v) in &acked {
        assert_eq!(
            &common::redis_reply(&ns, &["GET", k]),
            v,
            "acknowledged write lost"
        );
    }
    assert_eq!(common::redis_reply(&ns, &["SET", "after", "x"]), "OK");
    common::redis_shutdown(&ns);
    let (dest, outcome) = dt.join().unwrap();
    assert_eq!(outcome, RunOutcome::PoweredOff(0));
    assert!(dest.stats().total() > tr.cut.exit_index());
    let text = String::from_utf8_lossy(&dest_out.lock().unwrap()).into_owned();
    assert!(text.contains("kv: shutdown"), "{text}");
}

/// Sets its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}
