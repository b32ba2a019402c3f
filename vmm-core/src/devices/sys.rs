//! The paravirtual system device at `0xD000_0000` (DEVICES.md "The system device").
//!
//! ```text
//! offset  access  register
//! 0x00    R       MAGIC          "FTVMSYS1"
//! 0x08    R       CLOCK_NS       ns since the VM started        (nondeterministic, recorded)
//! 0x10    R       ENTROPY        64 random bits                 (nondeterministic, recorded)
//! 0x18    W       POWER_OFF      stop the VM with this exit code
//! 0x20    W       WAIT_DEADLINE  absolute CLOCK_NS deadline of the next WAIT (0 = none)
//! 0x28    R       WAIT           handled by the bus (devices::Devices::wait), recorded
//! 0x30    W       CONSOLE_ADDR   guest address of bytes to print
//! 0x38    W       CONSOLE_LEN    print CONSOLE_LEN bytes at CONSOLE_ADDR
//! 0x40    W       DEBUG          a u64 for the VMM's debug log
//! ```

use std::time::Instant;

use crate::bus::{le_value, put_le, BusDevice, DeviceError, ExitAction, ExitCtx};
use crate::devices::ConsoleOutput;
use crate::memory::MMIO_BASE;
use crate::record::OutputSource;
use crate::state::SysState;

// Register offsets, magic and event bits: the guest ABI, defined once for the VMM and guests/.
pub use ftvm_abi::sys::{
    EVENT_BLK, EVENT_CONSOLE_RX, EVENT_NET_RX, EVENT_TIMER, REG_CLOCK_NS, REG_CONSOLE_ADDR,
    REG_CONSOLE_LEN, REG_DEBUG, REG_ENTROPY, REG_MAGIC, REG_POWER_OFF, REG_WAIT, REG_WAIT_DEADLINE,
    SYS_MAGIC,
};
/// Largest single console write (longer writes are truncated).
pub const MAX_CONSOLE_WRITE: u64 = 1 << 20;

/// The system device.
#[derive(Debug)]
pub struct SysDevice {
    start: Instant,
    /// CLOCK_NS at `start` (non-zero after a restore: the clock never goes back).
    clock_base: u64,
    /// Pending WAIT deadline (0 = none).
    pub(crate) wait_deadline: u64,
    console_addr: u64,
    console: ConsoleOutput,
}

impl SysDevice {
    /// A system device printing to `console`.
    pub fn new(console: ConsoleOutput) -> Self {
        SysDevice {
            start: Instant::now(),
            clock_base: 0,
            wait_deadline: 0,
            console_addr: 0,
            console,
        }
    }

    /// The live clock: nanoseconds since the VM started.
    pub fn clock_now(&self) -> u64 {
        self.clock_base
            .saturating_add(self.start.elapsed().as_nanos() as u64)
    }

    /// The host instant at which CLOCK_NS reaches `ns`.
    pub fn instant_of(&self, ns: u64) -> Instant {
        let rel = ns.saturating_sub(self.clock_base);
        self.start + std::time::Duration::from_nanos(rel)
    }
}

fn entropy() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into the 8-byte buffer it is given.
    let n = unsafe { libc::getrandom(v.as_mut_ptr().cast(), v.len(), 0) };
    if n != 8 {
        // getrandom(2) with 8 bytes does not fail short once the pool is initialised; fall
        // back to the clock rather than panicking.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    u64::from_le_bytes(v)
}

impl BusDevice for SysDevice {
    fn read(
        &mut self,
        ctx: &mut ExitCtx<'_>,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError> {
        let v = match offset {
            REG_MAGIC => SYS_MAGIC,
            REG_CLOCK_NS => {
                let now = self.clock_now();
                ctx.external_read(MMIO_BASE + offset, || now)?
            }
            REG_ENTROPY => ctx.external_read(MMIO_BASE + offset, entropy)?,
            REG_WAIT_DEADLINE => self.wait_deadline,
            REG_CONSOLE_ADDR => self.console_addr,
            _ => 0,
        };
        put_le(data, v);
        Ok(())
    }

    fn write(
        &mut self,
        ctx: &mut ExitCtx<'_>,
        offset: u64,
        data: &[u8],
    ) -> Result<ExitAction, DeviceError> {
        let v = le_value(data);
        match offset {
            REG_POWER_OFF => return Ok(ExitAction::PowerOff(v)),
            REG_WAIT_DEADLINE => self.wait_deadline = v,
            REG_CONSOLE_ADDR => self.console_addr = v,
            REG_CONSOLE_LEN => {
                let len = v.min(MAX_CONSOLE_WRITE) as usize;
                let mut buf = vec![0u8; len];
                ctx.read_guest(self.console_addr, &mut buf)?;
                // Digested (logged by a primary, verified by a replay) before it is printed.
                ctx.output(OutputSource::Console, |d| d.add(&buf))?;
                self.console
                    .write(&buf)
                    .map_err(|source| DeviceError::Backend {
                        what: "console write".into(),
                        source,
                    })?;
            }
            REG_DEBUG => tracing::debug!(exit = ctx.exit, value = v, "guest debug {v:#x}"),
            _ => tracing::trace!(offset, "write to unknown system device register"),
        }
        Ok(ExitAction::Continue)
    }
}

impl SysDevice {
    /// The device's state; `pending_events` are the WAIT events due on the bus
    /// ([`crate::devices::Devices`] owns them).
    pub fn save_state(&self, pending_events: u64) -> SysState {
        SysState {
            clock_ns: self.clock_now(),
            wait_deadline: self.wait_deadline,
            console_addr: self.console_addr,
            pending_events,
        }
    }

    /// Restores what [`SysDevice::save_state`] captured (the clock continues from the saved
    /// value); returns the pending WAIT events for the bus.
    pub fn restore_state(&mut self, s: &SysState) -> u64 {
        self.clock_base = s.clock_ns;
        self.start = Instant::now();
        self.wait_deadline = s.wait_deadline;
        self.console_addr = s.console_addr;
        s.pending_events
    }
}
