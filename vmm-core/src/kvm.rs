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
    /// The fixed CPUID (supported CPUID with RDRAND and RDSEED hidden).
    pub cpuid: CpuId,
}

/// CPUID.1:ECX bit of RDRAND.
const CPUID1_ECX_RDRAND: u32 = 1 << 30;
/// CPUID.7.0:EBX bit of RDSEED.
const CPUID7_EBX_RDSEED: u32 = 1 << 18;

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
        for e in cpuid.as_mut_slice() {
            match (e.function, e.index) {
                (1, _) => e.ecx &= !CPUID1_ECX_RDRAND,
                (7, 0) => e.ebx &= !CPUID7_EBX_RDSEED,
                _ => {}
            }
        }
        Ok(KvmContext { kvm, cpuid })
    }
}

/// Whether `/dev/kvm` can be opened by this process (for tests and tools that skip without it).
pub fn available() -> bool {
    Kvm::new().is_ok()
}
