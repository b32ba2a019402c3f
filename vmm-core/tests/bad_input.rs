//! Bad guests and bad configurations each give a clear error.

use ftvm_testkit::require_kvm;
use ftvm_testkit::Asm;
use ftvm_vmm_core::guests;
use ftvm_vmm_core::loader::LoaderError;
use ftvm_vmm_core::vcpu::VcpuError;
use ftvm_vmm_core::vm::{Vm, VmConfig, VmError};

fn config() -> VmConfig {
    VmConfig {
        mem_size: 16 << 20,
        ..Default::default()
    }
}

fn err(r: Result<Vm, VmError>) -> VmError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

/// The full error chain, as `ftvm` prints it.
use ftvm_vmm_core::error_chain as chain;

#[test]
fn not_an_elf_is_rejected() {
    require_kvm!("not_an_elf_is_rejected");
    let e = err(Vm::new(&config(), b"#!/bin/sh\necho hi\n"));
    assert!(matches!(e, VmError::Loader(LoaderError::NotElf)), "{e:?}");
    assert!(chain(&e).contains("not an ELF file"), "{}", chain(&e));
}

#[test]
fn pie_is_rejected() {
    require_kvm!("pie_is_rejected");
    let mut elf = Asm::new().power_off(0).elf();
    elf[0x10] = 3; // ET_DYN
    let e = err(Vm::new(&config(), &elf));
    assert!(matches!(e, VmError::Loader(LoaderError::Pie)), "{e:?}");
    assert!(chain(&e).contains("PIE"), "{}", chain(&e));
}

#[test]
fn truncated_elf_is_rejected() {
    require_kvm!("truncated_elf_is_rejected");
    let elf = guests::by_name("cpu").expect("cpu guest is embedded");
    let e = err(Vm::new(&config(), &elf[..elf.len() / 2]));
    assert!(
        matches!(e, VmError::Loader(LoaderError::Truncated { .. })),
        "{e:?}"
    );
    assert!(chain(&e).contains("truncated ELF"), "{}", chain(&e));
}

#[test]
fn missing_disk_is_reported() {
    require_kvm!("missing_disk_is_reported");
    let cfg = VmConfig {
        disk: Some("/nonexistent/ftvm-disk.img".into()),
        ..config()
    };
    let e = err(Vm::new(&cfg, &Asm::new().power_off(0).elf()));
    let msg = chain(&e);
    assert!(
        msg.contains("cannot open disk image /nonexistent/ftvm-disk.img"),
        "{msg}"
    );
    assert!(msg.contains("No such file"), "{msg}");
}

#[test]
fn too_little_memory_is_reported() {
    require_kvm!("too_little_memory_is_reported");
    let cfg = VmConfig {
        mem_size: 1 << 20,
        ..config()
    };
    let e = err(Vm::new(&cfg, &Asm::new().power_off(0).elf()));
    assert!(
        chain(&e).contains("smaller than the fixed layout"),
        "{}",
        chain(&e)
    );
    // The cpu guest's image does not fit below the stack of a 2 MiB VM... unless it is tiny;
    // a 1.5 MiB bss certainly does not.
    let mut big = Asm::new().power_off(0).elf();
    big[64 + 0x28..64 + 0x30].copy_from_slice(&(3u64 << 20).to_le_bytes());
    let cfg = VmConfig {
        mem_size: 4 << 20,
        ..config()
    };
    let e = err(Vm::new(&cfg, &big));
    assert!(
        matches!(e, VmError::Loader(LoaderError::OutOfRange { .. })),
        "{e:?}"
    );
    assert!(
        chain(&e).contains("give the VM more memory"),
        "{}",
        chain(&e)
    );
}

fn expect_fault(code: &[u8], want: &str) {
    let prog = Asm::new().raw(code);
    let mut vm = Vm::new(&config(), &prog.elf()).expect("vm");
    let e = vm.run().expect_err("the guest must fault");
    match &e {
        VmError::Vcpu(VcpuError::GuestFault { reason, regs, .. }) => {
            assert!(reason.contains(want), "reason {reason:?}");
            assert!(regs.contains("rip 0x"), "no register dump: {regs}");
            assert!(
                regs.contains("cr3 0x1000"),
                "register dump lacks cr3: {regs}"
            );
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(chain(&e).contains("rip"), "{}", chain(&e));
}

#[test]
fn triple_fault_stops_the_vm_with_a_register_dump() {
    require_kvm!("triple_fault_stops_the_vm_with_a_register_dump");
    expect_fault(&[0x0F, 0x0B], "triple fault"); // ud2 with no IDT
}

#[test]
fn hlt_at_cpl3_stops_the_vm() {
    require_kvm!("hlt_at_cpl3_stops_the_vm");
    // HLT at CPL3 raises #GP; without an IDT that is a triple fault (or a HLT exit).
    let prog = Asm::new().raw(&[0xF4]);
    let mut vm = Vm::new(&config(), &prog.elf()).expect("vm");
    let e = vm.run().expect_err("HLT must stop the VM");
    assert!(
        matches!(&e, VmError::Vcpu(VcpuError::GuestFault { reason, .. })
            if reason.contains("triple fault") || reason.contains("HLT")),
        "{e:?}"
    );
}

#[test]
fn wild_memory_access_faults() {
    require_kvm!("wild_memory_access_faults");
    // mov rax, [0x1_0000_0000_0000] (non-canonical / unmapped) -> #GP/#PF -> triple fault.
    let mut code = vec![0x48, 0xB8];
    code.extend_from_slice(&0x0000_1000_0000_0000u64.to_le_bytes());
    code.extend_from_slice(&[0x48, 0x8B, 0x00]);
    expect_fault(&code, "triple fault");
}
