//! The KVM system handle: opening `/dev/kvm`, checking what the VMM needs, the fixed CPUID.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// Errors of opening and probing KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` cannot be opened (missing, or no permission).
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    /// The KVM API version is not 12.
    #[error("KVM API version {0} is not 12")]
    ApiVersion(i32),
    /// A capability the VMM needs is missing.
    #[error("KVM lacks capability {0}")]
    MissingCap(&'static str),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID")]
    Cpuid(#[source] kvm_ioctls::Error),
}

/// The opened KVM system fd and the CPUID every vCPU gets.
#[derive(Debug)]
pub struct KvmContext {
    /// The `/dev/kvm` handle.
    pub kvm: Kvm,
    /// The fixed CPUID: the host's supported CPUID with [`HIDDEN`] cleared and the TSC
    /// frequency leaves zeroed ([`fix_cpuid`]).
    pub cpuid: CpuId,
}

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuidReg {
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// A CPU feature the VMM hides from the guest because an instruction it enables returns
/// something the VMM cannot log (so a replay would compute something else), and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hidden {
    /// CPUID leaf (EAX).
    pub leaf: u32,
    /// Sub-leaf (ECX) where the leaf has them.
    pub subleaf: Option<u32>,
    /// The register holding the bit.
    pub reg: CpuidReg,
    /// The bit.
    pub bit: u32,
    /// The feature's name.
    pub name: &'static str,
    /// Why it cannot be logged.
    pub why: &'static str,
}

/// Every feature [`fix_cpuid`] hides (the list of `guests/README.md`, "Instructions a guest
/// must not use"). Hiding only tells a guest that looks: where the CPU cannot trap the
/// instruction (RDRAND on AMD hosts and under PVM; RDTSC at CPL3 where CR4.TSD is not
/// enforced) a guest that executes it anyway gets a value nobody logged, which output-verified
/// replay then catches (`ftvm_ft::golive`).
pub const HIDDEN: &[Hidden] = &[
    Hidden {
        leaf: 1,
        subleaf: None,
        reg: CpuidReg::Ecx,
        bit: 30,
        name: "RDRAND",
        why: "a random number from the CPU",
    },
    Hidden {
        leaf: 7,
        subleaf: Some(0),
        reg: CpuidReg::Ebx,
        bit: 18,
        name: "RDSEED",
        why: "a random seed from the CPU",
    },
    Hidden {
        leaf: 1,
        subleaf: None,
        reg: CpuidReg::Edx,
        bit: 4,
        name: "TSC",
        why: "RDTSC reads the host's time-stamp counter (the guest's clock is CLOCK_NS, logged); \
              CR4.TSD makes it fault at CPL3 where the host enforces it",
    },
    Hidden {
        leaf: 0x8000_0001,
        subleaf: None,
        reg: CpuidReg::Edx,
        bit: 27,
        name: "RDTSCP",
        why: "reads the time-stamp counter, like RDTSC (and IA32_TSC_AUX)",
    },
    Hidden {
        leaf: 0x8000_0007,
        subleaf: None,
        reg: CpuidReg::Edx,
        bit: 8,
        name: "invariant TSC",
        why: "advertises the time-stamp counter as a clock",
    },
    Hidden {
        leaf: 7,
        subleaf: Some(0),
        reg: CpuidReg::Ecx,
        bit: 22,
        name: "RDPID",
        why: "reads IA32_TSC_AUX, a value the host sets",
    },
    Hidden {
        leaf: 7,
        subleaf: Some(0),
        reg: CpuidReg::Ecx,
        bit: 5,
        name: "WAITPKG",
        why: "TPAUSE/UMWAIT wait for a time-stamp-counter deadline and report in CF whether it \
              passed: a time input",
    },
    Hidden {
        leaf: 7,
        subleaf: Some(0),
        reg: CpuidReg::Ebx,
        bit: 11,
        name: "RTM",
        why: "a transaction aborts for reasons outside the guest (host interrupts, cache \
              pressure): the abort status in EAX is an input",
    },
    Hidden {
        leaf: 7,
        subleaf: Some(0),
        reg: CpuidReg::Ebx,
        bit: 4,
        name: "HLE",
        why: "hardware lock elision aborts like RTM transactions",
    },
];

/// Leaves zeroed by [`fix_cpuid`]: the time-stamp counter's and the core crystal's frequency
/// (0x15) and the processor's base/max frequency (0x16) describe the host's clocks, which the
/// guest must not use (and which differ between the hosts of a pair).
pub const ZEROED_LEAVES: [u32; 2] = [0x15, 0x16];

/// Applies [`HIDDEN`] and [`ZEROED_LEAVES`] to `cpuid` (the VMM's fixed CPUID), and gives the
/// vCPU APIC ID 0: KVM_GET_SUPPORTED_CPUID reports the APIC ID of the host CPU the calling
/// thread runs on (leaf 1 EBX bits 31:24, the x2APIC ID in EDX of leaves 0xB and 0x1F), so without
/// this a guest would see a value that depends on where its VMM happened to run (measured
/// here: 0 on host CPU 0, 1 on CPU 1) — another input nobody logs, and a CPUID that differs
/// between the two sides of a transfer.
pub fn fix_cpuid(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx &= 0x00ff_ffff,
            0xb | 0x1f => e.edx = 0,
            _ => {}
        }
        if ZEROED_LEAVES.contains(&e.function) {
            (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            continue;
        }
        for h in HIDDEN
            .iter()
            .filter(|h| h.leaf == e.function && h.subleaf.is_none_or(|s| s == e.index))
        {
            let reg = match h.reg {
                CpuidReg::Ebx => &mut e.ebx,
                CpuidReg::Ecx => &mut e.ecx,
                CpuidReg::Edx => &mut e.edx,
            };
            *reg &= !(1 << h.bit);
        }
    }
}

impl KvmContext {
    /// Opens `/dev/kvm` and prepares the fixed CPUID.
    ///
    /// # Errors
    /// [`KvmError`] if KVM is not usable.
    pub fn new() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(KvmError::ApiVersion(v));
        }
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::Xsave, "KVM_CAP_XSAVE"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(name));
            }
        }
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::Cpuid)?;
        fix_cpuid(&mut cpuid);
        Ok(KvmContext { kvm, cpuid })
    }
}

/// Why no VM can run here, if none can: `/dev/kvm` does not open, or is not the KVM a VM needs
/// (the checks of [`KvmContext::new`]: API version, capabilities, CPUID). `ftvm demo` and the
/// benchmarks say so instead of failing half-way; tests print it as their SKIP reason.
pub fn missing() -> Option<String> {
    match KvmContext::new() {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm not usable: {}", crate::error_chain(&e))),
    }
}

impl KvmContext {
    /// An XXH3-64 digest of the fixed CPUID (every entry's bytes, in KVM's order): two hosts
    /// with the same digest show a guest the same vCPU model.
    pub fn cpuid_digest(&self) -> u64 {
        use zerocopy::IntoBytes;
        let mut h = 0u64;
        for e in self.cpuid.as_slice() {
            h = xxhash_rust::xxh3::xxh3_64_with_seed(e.as_bytes(), h);
        }
        h
    }
}

/// Whether `/dev/kvm` can be opened by this process (for tests and tools that skip without it).
pub fn available() -> bool {
    Kvm::new().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn every_hidden_bit_is_cleared_and_nothing_else() {
        let leaves = [
            (1, 0),
            (7, 0),
            (7, 1),
            (0x8000_0001, 0),
            (0x8000_0007, 0),
            (0x15, 0),
            (0x16, 0),
            (2, 0),
        ];
        let mut cpuid = CpuId::from_entries(&leaves.map(|(f, i)| entry(f, i))).unwrap();
        fix_cpuid(&mut cpuid);
        let get = |f: u32, i: u32| {
            *cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap()
        };
        for h in HIDDEN {
            let e = get(h.leaf, h.subleaf.unwrap_or(0));
            let reg = match h.reg {
                CpuidReg::Ebx => e.ebx,
                CpuidReg::Ecx => e.ecx,
                CpuidReg::Edx => e.edx,
            };
            assert_eq!(reg & (1 << h.bit), 0, "{} still visible", h.name);
        }
        // Exactly the listed bits: 1 ECX loses RDRAND, 1 EDX the TSC, and so on.
        assert_eq!(get(1, 0).ecx, !(1 << 30));
        assert_eq!(get(1, 0).edx, !(1 << 4));
        assert_eq!(get(7, 0).ebx, !(1 << 18 | 1 << 11 | 1 << 4));
        assert_eq!(get(7, 0).ecx, !(1 << 22 | 1 << 5));
        assert_eq!(
            get(7, 1).ebx,
            u32::MAX,
            "sub-leaf 1 of leaf 7 is not RDSEED's"
        );
        assert_eq!(get(0x8000_0001, 0).edx, !(1 << 27));
        assert_eq!(get(0x8000_0007, 0).edx, !(1 << 8));
        for f in ZEROED_LEAVES {
            let e = get(f, 0);
            assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0));
        }
        assert_eq!(get(2, 0).edx, u32::MAX);
        assert_eq!(get(1, 0).ebx, 0x00ff_ffff, "APIC ID 0, the rest kept");
    }

    /// The fixed CPUID is the same whichever host CPU the VMM asks KVM from (before the APIC ID
    /// was fixed, leaves 1, 0xB and 0x1F differed between host CPUs 0 and 1).
    #[test]
    fn the_fixed_cpuid_does_not_depend_on_the_host_cpu() {
        ftvm_testkit::require_kvm!("the_fixed_cpuid_does_not_depend_on_the_host_cpu");
        let on = |cpu: usize| {
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity
                // read and write only that set, and pin the calling thread.
                let pinned = unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0
                };
                pinned.then(|| KvmContext::new().expect("KVM").cpuid_digest())
            })
            .join()
            .expect("thread")
        };
        match (on(0), on(1)) {
            (Some(a), Some(b)) => assert_eq!(a, b),
            _ => {
                eprintln!("SKIP the_fixed_cpuid_does_not_depend_on_the_host_cpu: fewer than 2 CPUs")
            }
        }
    }
}
