//! virtio-blk on a raw image file: one queue, `VIRTIO_BLK_F_FLUSH`, 512-byte sectors.
//!
//! ```text
//! request chain: [header 16 B, readable: type u32 | reserved u32 | sector u64]
//!                [data buffers: readable (OUT) or writable (IN, GET_ID)]
//!                [status 1 B, writable: 0 OK, 1 IOERR, 2 UNSUPP]
//! ```
//! Requests are executed synchronously while handling the QueueNotify exit.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_queue::Queue;

use super::{add_used, pop_chain, read_config_space, Desc, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::{DeviceError, ExitCtx};
use crate::state::{StateError, StateReader, StateWriter};

/// `VIRTIO_BLK_F_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Sector size.
pub const SECTOR: u64 = 512;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const QUEUE_SIZES: &[u16] = &[128];

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The image cannot be opened.
    #[error("cannot open disk image {0}")]
    Open(PathBuf, #[source] std::io::Error),
    /// The image size is not a multiple of 512 bytes.
    #[error("disk image {0} is {1} bytes, not a multiple of 512")]
    Size(PathBuf, u64),
}

/// The virtio-blk device.
#[derive(Debug)]
pub struct Blk {
    file: File,
    sectors: u64,
}

impl Blk {
    /// Opens the raw image at `path` read-write.
    ///
    /// # Errors
    /// [`BlkError`].
    pub fn open(path: &Path) -> Result<Self, BlkError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| BlkError::Open(path.into(), e))?;
        let len = file
            .metadata()
            .map_err(|e| BlkError::Open(path.into(), e))?
            .len();
        if len % SECTOR != 0 {
            return Err(BlkError::Size(path.into(), len));
        }
        Ok(Blk {
            file,
            sectors: len / SECTOR,
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    fn execute(&mut self, descs: &[Desc], ctx: &mut ExitCtx<'_>) -> Result<u32, DeviceError> {
        let Some((status, body)) = descs.split_last() else {
            return Ok(0);
        };
        if !status.write || status.len < 1 || body.is_empty() || body[0].write || body[0].len < 16 {
            return Err(DeviceError::Queue("malformed virtio-blk request".into()));
        }
        let mut hdr = [0u8; 16];
        ctx.read_guest(body[0].addr, &mut hdr)?;
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sb = [0u8; 8];
        sb.copy_from_slice(&hdr[8..]);
        let sector = u64::from_le_bytes(sb);
        let data = &body[1..];
        let mut written = 0u32;
        let st = match ty {
            T_IN | T_OUT => {
                let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
                if sector
                    .checked_mul(SECTOR)
                    .and_then(|b| b.checked_add(total))
                    .is_none_or(|end| end > self.sectors * SECTOR)
                {
                    S_IOERR
                } else {
                    let mut off = sector * SECTOR;
                    let mut st = S_OK;
                    for d in data {
                        let mut buf = vec![0u8; d.len as usize];
                        if ty == T_IN {
                            if let Err(e) = self.file.read_exact_at(&mut buf, off) {
                                tracing::warn!(error = %e, "disk read failed");
                                st = S_IOERR;
                                break;
                            }
                            ctx.write_guest(d.addr, &buf)?;
                            written += d.len;
                        } else {
                            ctx.read_guest(d.addr, &mut buf)?;
                            if let Err(e) = self.file.write_all_at(&buf, off) {
                                tracing::warn!(error = %e, "disk write failed");
                                st = S_IOERR;
                                break;
                            }
                        }
                        off += u64::from(d.len);
                    }
                    st
                }
            }
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => S_OK,
                Err(e) => {
                    tracing::warn!(error = %e, "disk flush failed");
                    S_IOERR
                }
            },
            T_GET_ID => {
                let mut id = [0u8; 20];
                id[..8].copy_from_slice(b"ftvm-blk");
                if let Some(d) = data.iter().find(|d| d.write) {
                    let n = (d.len as usize).min(20);
                    ctx.write_guest(d.addr, &id[..n])?;
                    written += n as u32;
                }
                S_OK
            }
            _ => S_UNSUPP,
        };
        ctx.write_guest(status.addr, &[st])?;
        Ok(written + 1)
    }
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u32 {
        2
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH
    }
    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64 sectors) at 0; everything else 0.
        let cap = self.sectors.to_le_bytes();
        let mut cfg = [0u8; 16];
        cfg[..8].copy_from_slice(&cap);
        read_config_space(&cfg, offset, data);
    }
    fn notify(
        &mut self,
        _index: usize,
        queues: &mut [Queue],
        ctx: &mut ExitCtx<'_>,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        while let Some((head, descs)) = pop_chain(&mut queues[0], ctx.mem)? {
            let len = self.execute(&descs, ctx)?;
            add_used(&mut queues[0], ctx, head, len)?;
            used = true;
        }
        Ok(used)
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
    fn save_device(&self, w: &mut StateWriter) -> Result<(), StateError> {
        w.u64(self.sectors);
        Ok(())
    }
    fn restore_device(&mut self, r: &mut StateReader<'_>) -> Result<(), StateError> {
        let s = r.u64("blk sectors")?;
        if s != self.sectors {
            return Err(StateError::Mismatch(format!(
                "disk has {} sectors, snapshot was taken with {s}",
                self.sectors
            )));
        }
        Ok(())
    }
}
