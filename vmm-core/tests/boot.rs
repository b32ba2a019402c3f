//! Booting guests: hand-assembled programs and the real guests of guests/.

use ftvm_testkit::require_kvm;
use ftvm_testkit::{Asm, Reg};
use ftvm_vmm_core::devices::sys::{REG_CLOCK_NS, REG_ENTROPY, REG_MAGIC};
use ftvm_vmm_core::vm::{buffer_console, RunOutcome, Vm, VmConfig};

#[test]
fn tiny_guest_reads_magic_prints_and_powers_off() {
    require_kvm!("tiny_guest_reads_magic_prints_and_powers_off");
    // Store MAGIC at 0x40000, print those 8 bytes, exit with code 42.
    let prog = Asm::new()
        .load(Reg::Rbx, REG_MAGIC as u8)
        .mov_imm(Reg::Rdx, 0x40000)
        .store_rbx_at_rdx()
        .print(0x40000, 8)
        .power_off(42);
    let (console, out) = buffer_console();
    let config = VmConfig {
        mem_size: 4 << 20,
        console,
        ..Default::default()
    };
    let mut vm = Vm::new(&config, &prog.elf()).expect("vm");
    assert_eq!(vm.run().expect("run"), RunOutcome::PoweredOff(42));
    assert_eq!(&*out.lock().unwrap(), b"FTVMSYS1");
    assert_eq!(vm.stats().total(), 4);
}

#[test]
fn clock_and_entropy_vary() {
    require_kvm!("clock_and_entropy_vary");
    let prog = Asm::new()
        .load(Reg::Rbx, REG_CLOCK_NS as u8)
        .load(Reg::Rcx, REG_ENTROPY as u8)
        .xor_rbx_rcx()
        .power_off_rbx();
    let config = VmConfig {
        mem_size: 4 << 20,
        ..Default::default()
    };
    let a = Vm::new(&config, &prog.elf()).unwrap().run().unwrap();
    let b = Vm::new(&config, &prog.elf()).unwrap().run().unwrap();
    assert_ne!(a, b, "two runs gave the same clock^entropy");
}
