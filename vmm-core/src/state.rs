//! Typed, versioned VM state: one plain state struct per component, each saved as its own
//! versioned section, for snapshot files ([`Vm::save`](crate::vm::Vm::save)) and for live
//! state transfer ([`crate::transfer`]).
//!
//! ```text
//! snapshot file (all integers little-endian)
//! 0x00  magic    "FTVMSNAP"
//! 0x08  version  u32 (SNAPSHOT_VERSION = 2)
//! 0x0c  sections, each a 24-byte SectionHeader then `len` payload bytes:
//!         0x00 tag u32 | 0x04 version u32 | 0x08 len u64 | 0x10 crc32c u32 | 0x14 reserved u32 (0)
//!       every section present at most once, in any order:
//!         tag  section   payload (postcard, except MEMORY)          state struct
//!         1    CONFIG    RAM size, command line, devices present      ConfigState
//!         2    VCPU      regs, sregs, xsave, xcrs, events, MSRs,      VcpuState
//!                        CPUID digest
//!         3    SYS       clock, WAIT deadline, console address,       SysState
//!                        WAIT events pending
//!         4    NET       virtio-mmio transport + queues, net device   VirtioState<NetState>
//!         5    BLK       virtio-mmio transport + queues, blk device   VirtioState<BlkState>
//!         6    CONSOLE   virtio-mmio transport + queues, console      VirtioState<ConsoleState>
//!         7    EXITS     exit index and counters by kind              ExitState
//!         8    MEMORY    mem_size raw bytes of guest RAM (files only; a transfer streams pages)
//! ```
//!
//! # Design
//! Every stateful component implements [`Persist`]: `save` returns its state as a plain struct,
//! `restore` puts one back; both are required (no default that saves nothing). Unlike
//! Firecracker's `Persist::restore`, which *constructs* the component from its state and
//! constructor arguments, ours restores **in place** into a component already built from the
//! VM configuration: the backends (the TAP, the disk file, the console) belong to the host the
//! VM runs on, not to the saved state, and the VM is built from them first
//! ([`Vm::restore`](crate::vm::Vm::restore), [`crate::transfer::Sink`]).
//!
//! A state struct is a [`Section`]: a tag, a name and a **version**, bumped whenever the struct's
//! encoding changes. Restoring checks the version of each section against the one this build
//! writes and refuses any other ([`StateError::SectionVersion`]), the file's length framing
//! ([`StateError::Truncated`]) and a CRC32C of each payload ([`StateError::Checksum`]): a wrong,
//! short or damaged file is refused with the section named, and the VM it was to be restored
//! into is dropped untouched.
//!
//! Encoding: [postcard](https://docs.rs/postcard) over `serde`. Why: its wire format is specified
//! and stable since 1.0 (a file written by one build reads in another), it is compact (varints;
//! the whole non-memory state is ~5 KiB, mostly the 4 KiB XSAVE area), and it is well kept and
//! `no_std`-capable. bincode was the other candidate; its 1.x line is in maintenance and its 2.x
//! changed the format. The fixed headers (file and section) are `#[repr(C)]` `zerocopy` structs
//! instead: they are read before anything is known about the payload, and a fixed layout with
//! sizes from `size_of` is what a reader in another language needs. KVM's register structs are
//! carried as their exact bytes ([`Raw`]), checked for length when decoded.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Magic of a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"FTVMSNAP";
/// Format version of the file framing (version 1: untyped hand-written stream).
pub const SNAPSHOT_VERSION: u32 = 2;

/// Section tags.
pub mod tag {
    /// VM configuration ([`super::ConfigState`]).
    pub const CONFIG: u32 = 1;
    /// vCPU ([`super::VcpuState`]).
    pub const VCPU: u32 = 2;
    /// System device ([`super::SysState`]).
    pub const SYS: u32 = 3;
    /// virtio-net slot ([`super::NetSection`]).
    pub const NET: u32 = 4;
    /// virtio-blk slot ([`super::BlkSection`]).
    pub const BLK: u32 = 5;
    /// virtio-console slot ([`super::ConsoleSection`]).
    pub const CONSOLE: u32 = 6;
    /// Exit counters ([`super::ExitState`]).
    pub const EXITS: u32 = 7;
    /// Guest RAM (raw bytes; snapshot files only).
    pub const MEMORY: u32 = 8;
}

/// Version of the raw MEMORY section.
pub const MEMORY_VERSION: u32 = 1;

/// Errors of saving and restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the file failed.
    #[error("snapshot file {path}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the snapshot magic.
    #[error("not an ftvm snapshot (no FTVMSNAP magic)")]
    BadMagic,
    /// The file's framing version is not the one this build reads.
    #[error("snapshot format version {found}; this build reads version {expected}")]
    FormatVersion {
        /// In the file.
        found: u32,
        /// Read by this build.
        expected: u32,
    },
    /// The bytes end before their framing says.
    #[error("snapshot truncated while reading {0}")]
    Truncated(&'static str),
    /// A section has another version than the one this build writes.
    #[error("section {section} has version {found}; this build reads version {expected}")]
    SectionVersion {
        /// The section's name.
        section: &'static str,
        /// In the file.
        found: u32,
        /// Read by this build.
        expected: u32,
    },
    /// A section's payload does not match its checksum (damaged bytes).
    #[error("section {section} is damaged (CRC32C {found:#010x}, header says {expected:#010x})")]
    Checksum {
        /// The section's name.
        section: &'static str,
        /// Computed.
        found: u32,
        /// In the header.
        expected: u32,
    },
    /// A required section is missing.
    #[error("snapshot has no {0} section")]
    MissingSection(&'static str),
    /// A section appears twice, or has an unknown tag.
    #[error("snapshot has an unexpected section (tag {0}: unknown or repeated)")]
    UnexpectedSection(u32),
    /// A section's payload does not decode as its state struct.
    #[error("section {section} does not decode")]
    Decode {
        /// The section's name.
        section: &'static str,
        /// The cause.
        #[source]
        source: postcard::Error,
    },
    /// A state struct could not be encoded.
    #[error("section {section} does not encode")]
    Encode {
        /// The section's name.
        section: &'static str,
        /// The cause.
        #[source]
        source: postcard::Error,
    },
    /// The state does not fit the VM it is restored into.
    #[error("snapshot does not match this VM: {0}")]
    Mismatch(String),
    /// The state was saved on a host whose vCPU model (CPUID) differs from this one's.
    #[error("the state was saved with CPUID digest {saved:#018x}, this host gives {here:#018x}")]
    Cpuid {
        /// Digest in the state.
        saved: u64,
        /// Digest of this host's fixed CPUID.
        here: u64,
    },
    /// A KVM ioctl failed while getting or setting vCPU state.
    #[error("KVM {what}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A component whose state can be captured and put back. Both methods are required.
pub trait Persist {
    /// The plain, serializable state.
    type State;
    /// Captures the state. The VM must be stopped at an exit boundary (its owner holds it by
    /// `&mut`, so no exit is in progress).
    ///
    /// # Errors
    /// [`StateError`] if the state cannot be read (e.g. a KVM ioctl fails).
    fn save(&self) -> Result<Self::State, StateError>;
    /// Puts `state` back into this component (built from the same configuration).
    ///
    /// # Errors
    /// [`StateError`] if the state does not fit this component or KVM refuses it.
    fn restore(&mut self, state: &Self::State) -> Result<(), StateError>;
}

/// A state struct stored as one section, with its tag, name and version.
pub trait Section: Serialize + DeserializeOwned {
    /// The tag ([`tag`]).
    const TAG: u32;
    /// Its name in messages.
    const NAME: &'static str;
    /// The version of its encoding; bump it whenever the struct changes.
    const VERSION: u32;
}

/// The header of every section (24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SectionHeader {
    /// [`tag`].
    pub tag: u32,
    /// The section's version ([`Section::VERSION`]).
    pub version: u32,
    /// Payload bytes.
    pub len: u64,
    /// CRC32C of the payload.
    pub crc: u32,
    /// Zero.
    pub reserved: u32,
}

/// Size of [`SectionHeader`].
pub const SECTION_HEADER_LEN: usize = size_of::<SectionHeader>();
/// Size of the file header (magic + version).
pub const FILE_HEADER_LEN: usize = SNAPSHOT_MAGIC.len() + size_of::<u32>();

/// A KVM register struct carried as its exact bytes (KVM's own layout); decoding refuses any
/// other length.
pub struct Raw<T>(pub T);

impl<T: FromBytes + IntoBytes + Immutable> Clone for Raw<T> {
    fn clone(&self) -> Self {
        let mut c = T::new_zeroed();
        c.as_mut_bytes().copy_from_slice(self.0.as_bytes());
        Raw(c)
    }
}

impl<T> std::fmt::Debug for Raw<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Raw<{}>", std::any::type_name::<T>())
    }
}

impl<T: IntoBytes + Immutable> PartialEq for Raw<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}

impl<T: IntoBytes + Immutable> Eq for Raw<T> {}

impl<T: IntoBytes + Immutable> Serialize for Raw<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0.as_bytes())
    }
}

impl<'de, T: FromBytes> Deserialize<'de> for Raw<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<T: FromBytes> serde::de::Visitor<'_> for V<T> {
            type Value = Raw<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "{} bytes", size_of::<T>())
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Raw<T>, E> {
                T::read_from_bytes(b)
                    .map(Raw)
                    .map_err(|_| E::invalid_length(b.len(), &self))
            }
        }
        d.deserialize_bytes(V(std::marker::PhantomData))
    }
}

/// The VM configuration a state belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigState {
    /// RAM size in bytes.
    pub mem_size: u64,
    /// The command line the guest booted with.
    pub cmdline: String,
    /// Which virtio slots hold a device: net, blk, console.
    pub devices: [bool; 3],
}

impl Section for ConfigState {
    const TAG: u32 = tag::CONFIG;
    const NAME: &'static str = "CONFIG";
    const VERSION: u32 = 1;
}

/// The vCPU's architectural state at an exit boundary (no MMIO access in flight).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: Raw<kvm_bindings::kvm_regs>,
    /// Segment, control and descriptor-table registers.
    pub sregs: Raw<kvm_bindings::kvm_sregs>,
    /// x87/SSE/AVX state (the legacy 4 KiB XSAVE area).
    pub xsave: Raw<kvm_bindings::kvm_xsave>,
    /// Extended control registers.
    pub xcrs: Raw<kvm_bindings::kvm_xcrs>,
    /// Pending exceptions, interrupt shadow, NMI state.
    pub events: Raw<kvm_bindings::kvm_vcpu_events>,
    /// The MSRs of [`crate::vcpu::SAVED_MSRS`] KVM returned: `(index, value)`.
    pub msrs: Vec<(u32, u64)>,
    /// Digest of the CPUID the vCPU ran with ([`crate::kvm::KvmContext::cpuid_digest`]):
    /// a guest that read CPUID on one host must not continue on a host that answers otherwise.
    pub cpuid_digest: u64,
}

impl Section for VcpuState {
    const TAG: u32 = tag::VCPU;
    const NAME: &'static str = "VCPU";
    const VERSION: u32 = 1;
}

/// The system device's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysState {
    /// `CLOCK_NS` at the save (the clock continues from here, never goes back).
    pub clock_ns: u64,
    /// Pending `WAIT_DEADLINE` (0: none).
    pub wait_deadline: u64,
    /// `CONSOLE_ADDR`.
    pub console_addr: u64,
    /// WAIT event bits already due but not yet returned by a WAIT (a block request completed
    /// since the last WAIT: `EVENT_BLK`).
    pub pending_events: u64,
}

impl Section for SysState {
    const TAG: u32 = tag::SYS;
    const NAME: &'static str = "SYS";
    const VERSION: u32 = 1;
}

/// One virtqueue (the fields of `virtio_queue::QueueState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring index the device reads.
    pub next_avail: u16,
    /// Next used-ring index the device writes.
    pub next_used: u16,
    /// `VIRTIO_F_EVENT_IDX` negotiated.
    pub event_idx_enabled: bool,
    /// Size set by the driver.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

/// The virtio-mmio transport registers of a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `Status`.
    pub status: u32,
    /// `InterruptStatus` (used-buffer notifications not yet acknowledged).
    pub interrupt_status: u32,
    /// A buffer was used since the bus last looked (turns into a pending `EVENT_BLK`).
    pub completed: bool,
    /// The queues.
    pub queues: Vec<QueueState>,
}

/// A virtio slot: transport, queues and device state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState<D> {
    /// Transport and queues.
    pub transport: TransportState,
    /// The device behind it.
    pub device: D,
}

/// virtio-net's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// MAC address.
    pub mac: [u8; 6],
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Frames the guest transmitted.
    pub tx_packets: u64,
}

/// virtio-blk's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkState {
    /// Capacity in 512-byte sectors (the image restored into must have the same).
    pub sectors: u64,
}

/// virtio-console's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Bytes written to the console so far.
    pub bytes_out: u64,
}

/// The NET section.
pub type NetSection = VirtioState<NetState>;
/// The BLK section.
pub type BlkSection = VirtioState<BlkState>;
/// The CONSOLE section.
pub type ConsoleSection = VirtioState<ConsoleState>;

impl Section for NetSection {
    const TAG: u32 = tag::NET;
    const NAME: &'static str = "NET";
    const VERSION: u32 = 1;
}

impl Section for BlkSection {
    const TAG: u32 = tag::BLK;
    const NAME: &'static str = "BLK";
    const VERSION: u32 = 1;
}

impl Section for ConsoleSection {
    const TAG: u32 = tag::CONSOLE;
    const NAME: &'static str = "CONSOLE";
    const VERSION: u32 = 1;
}

/// The state of one virtio device, by kind (what [`VirtioDevice`](crate::devices::virtio::VirtioDevice)
/// saves behind its transport).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// virtio-net.
    Net(NetState),
    /// virtio-blk.
    Blk(BlkState),
    /// virtio-console.
    Console(ConsoleState),
}

/// All device state of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicesState {
    /// The system device (and the WAIT events pending on the bus).
    pub sys: SysState,
    /// virtio-net, if present.
    pub net: Option<NetSection>,
    /// virtio-blk, if present.
    pub blk: Option<BlkSection>,
    /// virtio-console, if present.
    pub console: Option<ConsoleSection>,
}

/// The exit counters: the exit index of record/replay and the counts by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitState {
    /// The exit index (guest exits so far).
    pub total: u64,
    /// Per kind, in [`crate::vcpu::ExitKind::ALL`] order.
    pub by_kind: [u64; 7],
}

impl Section for ExitState {
    const TAG: u32 = tag::EXITS;
    const NAME: &'static str = "EXITS";
    const VERSION: u32 = 1;
}

/// Everything of a VM stopped at an exit boundary except its memory: what a continuation needs
/// besides the pages (the final state of a transfer, and a snapshot file without its MEMORY
/// section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineState {
    /// Configuration.
    pub config: ConfigState,
    /// The vCPU.
    pub vcpu: VcpuState,
    /// The devices.
    pub devices: DevicesState,
    /// Exit counters.
    pub exits: ExitState,
}

impl MachineState {
    /// The exit index this state continues from.
    pub fn exit_index(&self) -> u64 {
        self.exits.total
    }

    /// Appends every section of this state to `out`.
    ///
    /// # Errors
    /// [`StateError::Encode`].
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), StateError> {
        put_section(out, &self.config)?;
        put_section(out, &self.vcpu)?;
        put_section(out, &self.devices.sys)?;
        if let Some(s) = &self.devices.net {
            put_section(out, s)?;
        }
        if let Some(s) = &self.devices.blk {
            put_section(out, s)?;
        }
        if let Some(s) = &self.devices.console {
            put_section(out, s)?;
        }
        put_section(out, &self.exits)
    }

    /// Decodes the sections of `sections` (other tags than this state's are refused, except
    /// MEMORY, which is left to the caller).
    ///
    /// # Errors
    /// [`StateError`]: missing, repeated, unknown, damaged or wrongly versioned sections.
    pub fn decode(sections: &Sections<'_>) -> Result<Self, StateError> {
        for &(h, _) in &sections.list {
            if !matches!(h.tag, tag::CONFIG..=tag::MEMORY) {
                return Err(StateError::UnexpectedSection(h.tag));
            }
        }
        Ok(MachineState {
            config: sections.required()?,
            vcpu: sections.required()?,
            devices: DevicesState {
                sys: sections.required()?,
                net: sections.optional()?,
                blk: sections.optional()?,
                console: sections.optional()?,
            },
            exits: sections.required()?,
        })
    }

    /// Encodes the state alone (the final state of a transfer).
    ///
    /// # Errors
    /// [`StateError::Encode`].
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        let mut out = Vec::with_capacity(8 << 10);
        self.encode(&mut out)?;
        Ok(out)
    }

    /// Decodes what [`MachineState::to_bytes`] wrote.
    ///
    /// # Errors
    /// As [`MachineState::decode`]; a MEMORY section is unexpected here.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let sections = Sections::parse(bytes)?;
        if sections.raw(tag::MEMORY).is_some() {
            return Err(StateError::UnexpectedSection(tag::MEMORY));
        }
        Self::decode(&sections)
    }
}

/// Appends a section header and `payload` to `out`.
pub fn put_raw_section(out: &mut Vec<u8>, tag: u32, version: u32, payload: &[u8]) {
    let h = SectionHeader {
        tag,
        version,
        len: payload.len() as u64,
        crc: crc32c::crc32c(payload),
        reserved: 0,
    };
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(payload);
}

/// Appends the section of `s` to `out`.
///
/// # Errors
/// [`StateError::Encode`].
pub fn put_section<S: Section>(out: &mut Vec<u8>, s: &S) -> Result<(), StateError> {
    let payload = postcard::to_stdvec(s).map_err(|source| StateError::Encode {
        section: S::NAME,
        source,
    })?;
    put_raw_section(out, S::TAG, S::VERSION, &payload);
    Ok(())
}

/// The sections of a byte string, framed and checksummed but not decoded yet.
#[derive(Debug)]
pub struct Sections<'a> {
    list: Vec<(SectionHeader, &'a [u8])>,
}

/// The name of a section tag, for messages.
pub fn section_name(t: u32) -> &'static str {
    match t {
        tag::CONFIG => ConfigState::NAME,
        tag::VCPU => VcpuState::NAME,
        tag::SYS => SysState::NAME,
        tag::NET => NetSection::NAME,
        tag::BLK => BlkSection::NAME,
        tag::CONSOLE => ConsoleSection::NAME,
        tag::EXITS => ExitState::NAME,
        tag::MEMORY => "MEMORY",
        _ => "unknown",
    }
}

impl<'a> Sections<'a> {
    /// Splits `bytes` into sections: each header complete, each payload as long as its header
    /// says and matching its CRC32C, each tag at most once.
    ///
    /// # Errors
    /// [`StateError::Truncated`], [`StateError::Checksum`], [`StateError::UnexpectedSection`].
    pub fn parse(mut bytes: &'a [u8]) -> Result<Self, StateError> {
        let mut list: Vec<(SectionHeader, &'a [u8])> = Vec::new();
        while !bytes.is_empty() {
            let (h, rest) = SectionHeader::read_from_prefix(bytes)
                .map_err(|_| StateError::Truncated("section header"))?;
            let len = usize::try_from(h.len).map_err(|_| StateError::Truncated("section"))?;
            if rest.len() < len {
                return Err(StateError::Truncated(section_name(h.tag)));
            }
            let (payload, rest) = rest.split_at(len);
            let crc = crc32c::crc32c(payload);
            if crc != h.crc {
                return Err(StateError::Checksum {
                    section: section_name(h.tag),
                    found: crc,
                    expected: h.crc,
                });
            }
            if list.iter().any(|(o, _)| o.tag == h.tag) {
                return Err(StateError::UnexpectedSection(h.tag));
            }
            list.push((h, payload));
            bytes = rest;
        }
        Ok(Sections { list })
    }

    /// The header and payload of section `tag`, if present.
    pub fn raw(&self, tag: u32) -> Option<(SectionHeader, &'a [u8])> {
        self.list.iter().find(|(h, _)| h.tag == tag).copied()
    }

    /// Decodes section `S` if present.
    ///
    /// # Errors
    /// [`StateError::SectionVersion`], [`StateError::Decode`] (trailing bytes included).
    pub fn optional<S: Section>(&self) -> Result<Option<S>, StateError> {
        let Some((h, payload)) = self.raw(S::TAG) else {
            return Ok(None);
        };
        if h.version != S::VERSION {
            return Err(StateError::SectionVersion {
                section: S::NAME,
                found: h.version,
                expected: S::VERSION,
            });
        }
        let decode = |source| StateError::Decode {
            section: S::NAME,
            source,
        };
        let (s, rest) = postcard::take_from_bytes::<S>(payload).map_err(decode)?;
        if !rest.is_empty() {
            return Err(decode(postcard::Error::DeserializeBadEncoding));
        }
        Ok(Some(s))
    }

    /// Decodes section `S`, which must be present.
    ///
    /// # Errors
    /// [`StateError::MissingSection`] and those of [`Sections::optional`].
    pub fn required<S: Section>(&self) -> Result<S, StateError> {
        self.optional()?.ok_or(StateError::MissingSection(S::NAME))
    }
}

/// A snapshot file: the machine state plus guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Everything but memory.
    pub machine: MachineState,
    /// Guest RAM, `machine.config.mem_size` bytes.
    pub memory: Vec<u8>,
}

impl Snapshot {
    /// The file's bytes.
    ///
    /// # Errors
    /// [`StateError::Encode`].
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        let mut out = Vec::with_capacity(self.memory.len() + (16 << 10));
        out.extend_from_slice(&SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        self.machine.encode(&mut out)?;
        put_raw_section(&mut out, tag::MEMORY, MEMORY_VERSION, &self.memory);
        Ok(out)
    }

    /// Parses a file's bytes.
    ///
    /// # Errors
    /// [`StateError::BadMagic`], [`StateError::FormatVersion`], and the section errors of
    /// [`MachineState::decode`]; [`StateError::Mismatch`] if the memory is not `mem_size`
    /// bytes.
    pub fn from_bytes(all: &[u8]) -> Result<Self, StateError> {
        if all.len() < SNAPSHOT_MAGIC.len() || all[..SNAPSHOT_MAGIC.len()] != SNAPSHOT_MAGIC {
            return Err(StateError::BadMagic);
        }
        let v = all
            .get(SNAPSHOT_MAGIC.len()..FILE_HEADER_LEN)
            .ok_or(StateError::Truncated("file header"))?;
        let found = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
        if found != SNAPSHOT_VERSION {
            return Err(StateError::FormatVersion {
                found,
                expected: SNAPSHOT_VERSION,
            });
        }
        let sections = Sections::parse(&all[FILE_HEADER_LEN..])?;
        let machine = MachineState::decode(&sections)?;
        let (h, memory) = sections
            .raw(tag::MEMORY)
            .ok_or(StateError::MissingSection("MEMORY"))?;
        if h.version != MEMORY_VERSION {
            return Err(StateError::SectionVersion {
                section: "MEMORY",
                found: h.version,
                expected: MEMORY_VERSION,
            });
        }
        if memory.len() as u64 != machine.config.mem_size {
            return Err(StateError::Mismatch(format!(
                "MEMORY section holds {} bytes, CONFIG says {}",
                memory.len(),
                machine.config.mem_size
            )));
        }
        Ok(Snapshot {
            machine,
            memory: memory.to_vec(),
        })
    }

    /// Writes the snapshot to `path` (and fsyncs it).
    ///
    /// # Errors
    /// [`StateError::Io`], [`StateError::Encode`].
    pub fn write_to(&self, path: &Path) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: path.display().to_string(),
            source,
        };
        let bytes = self.to_bytes()?;
        let mut w = BufWriter::new(File::create(path).map_err(io)?);
        w.write_all(&bytes).map_err(io)?;
        w.flush().map_err(io)?;
        w.get_ref().sync_all().map_err(io)
    }

    /// Reads a snapshot from `path`.
    ///
    /// # Errors
    /// [`StateError::Io`] and those of [`Snapshot::from_bytes`].
    pub fn read_from(path: &Path) -> Result<Self, StateError> {
        let io = |source| StateError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut all = Vec::new();
        File::open(path)
            .map_err(io)?
            .read_to_end(&mut all)
            .map_err(io)?;
        Self::from_bytes(&all)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A machine state with every section, for format tests (no KVM needed).
    pub(crate) fn sample() -> MachineState {
        let transport = TransportState {
            device_features_sel: 1,
            driver_features_sel: 1,
            driver_features: 1 << 32,
            queue_sel: 1,
            status: 15,
            interrupt_status: 1,
            completed: true,
            queues: vec![QueueState {
                max_size: 256,
                next_avail: 7,
                next_used: 7,
                event_idx_enabled: false,
                size: 256,
                ready: true,
                desc_table: 0x10_0000,
                avail_ring: 0x10_1000,
                used_ring: 0x10_2000,
            }],
        };
        let regs = kvm_bindings::kvm_regs {
            rip: 0x10_0042,
            ..Default::default()
        };
        MachineState {
            config: ConfigState {
                mem_size: 4 << 20,
                cmdline: "size=4M".into(),
                devices: [true, true, true],
            },
            vcpu: VcpuState {
                regs: Raw(regs),
                sregs: Raw(Default::default()),
                xsave: Raw(Default::default()),
                xcrs: Raw(Default::default()),
                events: Raw(Default::default()),
                msrs: vec![(0x10, 12345), (0x277, 0x0007_0406_0007_0406)],
                cpuid_digest: 99,
            },
            devices: DevicesState {
                sys: SysState {
                    clock_ns: 1_000_000,
                    wait_deadline: 2_000_000,
                    console_addr: 0x4_0000,
                    pending_events: 2,
                },
                net: Some(VirtioState {
                    transport: transport.clone(),
                    device: NetState {
                        mac: [2, 0, 0, 0, 0, 1],
                        rx_packets: 3,
                        tx_packets: 4,
                    },
                }),
                blk: Some(VirtioState {
                    transport: transport.clone(),
                    device: BlkState { sectors: 16384 },
                }),
                console: Some(VirtioState {
                    transport,
                    device: ConsoleState { bytes_out: 77 },
                }),
            },
            exits: ExitState {
                total: 1234,
                by_kind: [1, 2, 3, 4, 5, 6, 7],
            },
        }
    }

    fn sample_file() -> Vec<u8> {
        Snapshot {
            machine: sample(),
            memory: vec![0xA5; 4 << 20],
        }
        .to_bytes()
        .unwrap()
    }

    /// Offsets of each section header in a snapshot file: `(tag, offset)`.
    pub(crate) fn header_offsets(file: &[u8]) -> Vec<(u32, usize)> {
        let mut at = FILE_HEADER_LEN;
        let mut out = Vec::new();
        while at < file.len() {
            let (h, _) = SectionHeader::read_from_prefix(&file[at..]).unwrap();
            out.push((h.tag, at));
            at += SECTION_HEADER_LEN + h.len as usize;
        }
        out
    }

    #[test]
    fn every_section_round_trips() {
        let file = sample_file();
        let back = Snapshot::from_bytes(&file).unwrap();
        assert_eq!(back.machine, sample());
        assert_eq!(back.memory, vec![0xA5; 4 << 20]);
        let tags: Vec<u32> = header_offsets(&file).iter().map(|(t, _)| *t).collect();
        assert_eq!(tags, (tag::CONFIG..=tag::MEMORY).collect::<Vec<_>>());
        // The state alone (a transfer's final state) round-trips too, and is small.
        let bytes = sample().to_bytes().unwrap();
        assert!(bytes.len() < 8 << 10, "{} bytes", bytes.len());
        assert_eq!(MachineState::from_bytes(&bytes).unwrap(), sample());
        // Absent devices are absent sections.
        let mut none = sample();
        (none.devices.net, none.devices.blk) = (None, None);
        let back = MachineState::from_bytes(&none.to_bytes().unwrap()).unwrap();
        assert_eq!(back, none);
    }

    #[test]
    fn a_wrong_version_of_any_section_is_refused_by_name() {
        let file = sample_file();
        for (t, at) in header_offsets(&file) {
            let mut bad = file.clone();
            bad[at + 4..at + 8].copy_from_slice(&7u32.to_le_bytes());
            match Snapshot::from_bytes(&bad) {
                Err(StateError::SectionVersion {
                    section,
                    found: 7,
                    expected,
                }) => {
                    assert_eq!(section, section_name(t));
                    assert_ne!(expected, 7);
                }
                other => panic!("section {}: {other:?}", section_name(t)),
            }
        }
        let mut bad = file.clone();
        bad[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            Snapshot::from_bytes(&bad),
            Err(StateError::FormatVersion {
                found: 1,
                expected: SNAPSHOT_VERSION
            })
        ));
    }

    #[test]
    fn truncated_damaged_and_garbage_files_are_refused() {
        let file = sample_file();
        for cut in [0, 5, 10, 13, 30, 200, file.len() / 2, file.len() - 1] {
            let e = Snapshot::from_bytes(&file[..cut]).unwrap_err();
            assert!(
                matches!(e, StateError::Truncated(_) | StateError::BadMagic),
                "cut at {cut}: {e:?}"
            );
        }
        // One flipped byte in each payload: its checksum names the section.
        for (t, at) in header_offsets(&file) {
            let mut bad = file.clone();
            bad[at + SECTION_HEADER_LEN] ^= 0x40;
            match Snapshot::from_bytes(&bad) {
                Err(StateError::Checksum { section, .. }) => assert_eq!(section, section_name(t)),
                other => panic!("{}: {other:?}", section_name(t)),
            }
        }
        assert!(matches!(
            Snapshot::from_bytes(b"garbage!garbage"),
            Err(StateError::BadMagic)
        ));
        // A section whose bytes are well framed but are not its struct.
        let mut junk = SNAPSHOT_MAGIC.to_vec();
        junk.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        put_raw_section(&mut junk, tag::CONFIG, ConfigState::VERSION, &[0xff; 3]);
        assert!(matches!(
            Snapshot::from_bytes(&junk),
            Err(StateError::Decode {
                section: "CONFIG",
                ..
            })
        ));
        // A register struct of the wrong length does not decode (no silent zero padding).
        let mut short = sample().to_bytes().unwrap();
        let sections = Sections::parse(&short).unwrap();
        let (_, vcpu) = sections.raw(tag::VCPU).unwrap();
        let mut payload = vcpu.to_vec();
        // kvm_regs' length prefix is the varint 144 = [0x90, 0x01]: make it 136 bytes.
        assert_eq!(&payload[..2], &[0x90, 0x01]);
        payload[0] -= 8;
        payload.drain(2..10);
        short.clear();
        put_raw_section(&mut short, tag::VCPU, VcpuState::VERSION, &payload);
        assert!(matches!(
            Sections::parse(&short).unwrap().required::<VcpuState>(),
            Err(StateError::Decode {
                section: "VCPU",
                ..
            })
        ));
        // A repeated or unknown section.
        let mut twice = sample().to_bytes().unwrap();
        put_section(&mut twice, &sample().exits).unwrap();
        assert!(matches!(
            MachineState::from_bytes(&twice),
            Err(StateError::UnexpectedSection(tag::EXITS))
        ));
        let mut unknown = sample().to_bytes().unwrap();
        put_raw_section(&mut unknown, 99, 1, b"x");
        assert!(matches!(
            MachineState::from_bytes(&unknown),
            Err(StateError::UnexpectedSection(99))
        ));
    }

    #[test]
    fn snapshot_file_round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.snap");
        let snap = Snapshot {
            machine: sample(),
            memory: vec![7; 4 << 20],
        };
        snap.write_to(&path).unwrap();
        assert_eq!(Snapshot::read_from(&path).unwrap(), snap);
        assert!(matches!(
            Snapshot::read_from(&dir.path().join("missing")),
            Err(StateError::Io { .. })
        ));
    }
}
