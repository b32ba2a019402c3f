//! virtio-console: queue 0 RX (never filled: no console input), queue 1 TX to the console.

use virtio_queue::Queue;

use super::{add_used, pop_chain, read_from_chain, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::{DeviceError, ExitCtx};
use crate::devices::ConsoleOutput;
use crate::record::OutputSource;
use crate::state::{ConsoleState, DeviceState, Persist, StateError};

const QUEUE_SIZES: &[u16] = &[64, 64];

/// The virtio-console device.
#[derive(Debug)]
pub struct Console {
    out: ConsoleOutput,
    bytes_out: u64,
}

impl Console {
    /// A console writing to `out`.
    pub fn new(out: ConsoleOutput) -> Self {
        Console { out, bytes_out: 0 }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        3
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn notify(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        ctx: &mut ExitCtx<'_>,
    ) -> Result<bool, DeviceError> {
        if index != 1 {
            return Ok(false);
        }
        let mut chunks = Vec::new();
        while let Some((head, descs)) = pop_chain(&mut queues[1], ctx.mem)? {
            chunks.push(read_from_chain(&descs, ctx, 1 << 20)?);
            add_used(&mut queues[1], ctx, head, 0)?;
        }
        // The exit's output is digested (logged by a primary, verified by a replay) before
        // any of it is printed.
        ctx.output(OutputSource::Console, |d| {
            for c in chunks.iter().filter(|c| !c.is_empty()) {
                d.add(c);
            }
        })?;
        for bytes in &chunks {
            self.out
                .write(bytes)
                .map_err(|source| DeviceError::Backend {
                    what: "virtio-console write".into(),
                    source,
                })?;
            self.bytes_out += bytes.len() as u64;
        }
        Ok(!chunks.is_empty())
    }
    fn deliver_input(
        &mut self,
        _q: &mut [Queue],
        _ctx: &mut ExitCtx<'_>,
    ) -> Result<u64, DeviceError> {
        Ok(0)
    }
    fn has_input(&self) -> bool {
        false
    }
    fn save_device(&self) -> Result<DeviceState, StateError> {
        self.save().map(DeviceState::Console)
    }
    fn restore_device(&mut self, state: &DeviceState) -> Result<(), StateError> {
        match state {
            DeviceState::Console(s) => self.restore(s),
            other => Err(super::wrong_device("virtio-console", other)),
        }
    }
}

impl Persist for Console {
    type State = ConsoleState;
    fn save(&self) -> Result<ConsoleState, StateError> {
        Ok(ConsoleState {
            bytes_out: self.bytes_out,
        })
    }
    fn restore(&mut self, s: &ConsoleState) -> Result<(), StateError> {
        self.bytes_out = s.bytes_out;
        Ok(())
    }
}
