//! The append-only log on the block device: every write command is appended as a record before
//! its reply is sent (group commit: one disk write per event-loop round), and replayed at boot.
//!
//! ```text
//! sector 0 (header, 512 B)                    from byte 512: records, packed
//!  0  magic "FTVMKVL1"                         0  u32 payload length (0 = end of log)
//!  8  u64 format version (1)                   4  u32 CRC-32C of bytes [8, 16 + length)
//! 16  u64 generation (+1 at every boot)        8  u64 generation of the boot that wrote it
//! 24  u32 CRC-32C of bytes [0, 24)            16  payload: u8 op, then
//!                                                  SET:  u32 key len, key, u32 value len, value
//!                                                  DEL:  u32 key len, key
//!                                                  CLEAR (FLUSHALL): nothing
//! ```
//! Recovery reads records while the length is sane, the CRC matches and the generation does not
//! decrease nor exceed the header's; the first record that fails ends the log (a torn tail, or
//! stale bytes of an earlier boot). The header's generation is then bumped, so that stale
//! records behind the new tail can never be mistaken for new ones. The unused rest of the last
//! written sector is zero-filled.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Sector size of the block device.
pub const SECTOR: usize = 512;
/// Header magic.
pub const MAGIC: &[u8; 8] = b"FTVMKVL1";
/// Format version.
pub const VERSION: u64 = 1;
/// Size of a record's header.
pub const RECORD_HEADER: usize = 16;
/// Largest record payload accepted at recovery.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Largest single disk request.
const MAX_IO: usize = 64 << 10;

const OP_SET: u8 = 1;
const OP_DEL: u8 = 2;
const OP_CLEAR: u8 = 3;

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32C (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// A block device: 512-byte sectors.
pub trait BlockDevice {
    /// Number of sectors.
    fn sectors(&self) -> u64;
    /// Reads `buf.len()` (a multiple of 512) bytes from `sector`.
    ///
    /// # Errors
    /// The device failed the request.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// Writes `buf.len()` (a multiple of 512) bytes at `sector`.
    ///
    /// # Errors
    /// The device failed the request.
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), DiskError>;
}

/// A failed disk request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskError {
    /// First sector of the request.
    pub sector: u64,
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "disk request at sector {} failed", self.sector)
    }
}

/// A logged mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// SET key value.
    Set(&'a [u8], &'a [u8]),
    /// DEL key.
    Del(&'a [u8]),
    /// FLUSHALL.
    Clear,
}

impl Record<'_> {
    fn payload_len(&self) -> usize {
        match self {
            Self::Set(k, v) => 1 + 4 + k.len() + 4 + v.len(),
            Self::Del(k) => 1 + 4 + k.len(),
            Self::Clear => 1,
        }
    }

    /// Bytes the record takes in the log.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER + self.payload_len()
    }

    fn encode(&self, generation: u64, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&(self.payload_len() as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&generation.to_le_bytes());
        match self {
            Self::Set(k, v) => {
                out.push(OP_SET);
                out.extend_from_slice(&(k.len() as u32).to_le_bytes());
                out.extend_from_slice(k);
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                out.extend_from_slice(v);
            }
            Self::Del(k) => {
                out.push(OP_DEL);
                out.extend_from_slice(&(k.len() as u32).to_le_bytes());
                out.extend_from_slice(k);
            }
            Self::Clear => out.push(OP_CLEAR),
        }
        let crc = crc32c(&out[start + 8..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(payload: &[u8]) -> Option<Record<'_>> {
        fn take_bytes<'b>(p: &mut &'b [u8]) -> Option<&'b [u8]> {
            let len = u32::from_le_bytes(p.get(..4)?.try_into().ok()?) as usize;
            let bytes = p.get(4..4 + len)?;
            *p = &p[4 + len..];
            Some(bytes)
        }
        let (&op, mut rest) = payload.split_first()?;
        let rec = match op {
            OP_SET => {
                let k = take_bytes(&mut rest)?;
                let v = take_bytes(&mut rest)?;
                Record::Set(k, v)
            }
            OP_DEL => Record::Del(take_bytes(&mut rest)?),
            OP_CLEAR => Record::Clear,
            _ => return None,
        };
        rest.is_empty().then_some(rec)
    }
}

/// What recovery found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovered {
    /// Records replayed.
    pub records: u64,
    /// Bytes of the log (header sector included).
    pub log_bytes: u64,
    /// The generation of this boot.
    pub generation: u64,
    /// Whether the disk had no valid header (a new log was started).
    pub fresh: bool,
}

/// Why a record was not appended (nothing was queued).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendError {
    /// The disk has no room for it.
    DiskFull,
    /// The heap cannot hold it until the next flush.
    NoMemory,
}

/// Buffer capacity kept after a flush; a larger one (after a burst of big records) is freed.
const KEEP_CAPACITY: usize = 64 << 10;

/// The append-only log over a block device.
#[derive(Debug)]
pub struct Log<D> {
    disk: D,
    /// Byte offset of the end of the durable log.
    end: u64,
    /// The bytes of the durable log in the sector that contains `end` (`tail_len` of them),
    /// then the appended records not yet written.
    buf: Vec<u8>,
    /// Length of the durable part at the start of `buf` (`end % SECTOR`).
    tail_len: usize,
    generation: u64,
    capacity: u64,
}

fn header_bytes(generation: u64) -> Vec<u8> {
    let mut h = vec![0u8; SECTOR];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32c(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

fn header_generation(h: &[u8]) -> Option<u64> {
    let crc = u32::from_le_bytes(h.get(24..28)?.try_into().ok()?);
    let ok = &h[..8] == MAGIC
        && u64::from_le_bytes(h[8..16].try_into().ok()?) == VERSION
        && crc == crc32c(&h[..24]);
    ok.then(|| u64::from_le_bytes(h[16..24].try_into().unwrap_or_default()))
}

/// Sequential reads through a window of the disk.
struct Reader<'d, D> {
    disk: &'d mut D,
    window: Vec<u8>,
    window_start: u64,
    capacity: u64,
}

impl<D: BlockDevice> Reader<'_, D> {
    /// The bytes `[pos, pos + len)`, or `None` past the end of the disk.
    fn bytes(&mut self, pos: u64, len: usize) -> Result<Option<&[u8]>, DiskError> {
        if pos + len as u64 > self.capacity {
            return Ok(None);
        }
        let in_window = pos >= self.window_start
            && pos + len as u64 <= self.window_start + self.window.len() as u64;
        if !in_window {
            let first = pos / SECTOR as u64 * SECTOR as u64;
            let want = (pos + len as u64 - first).max(MAX_IO as u64);
            let want = want
                .min(self.capacity - first)
                .next_multiple_of(SECTOR as u64);
            self.window.resize(want as usize, 0);
            self.disk.read(first / SECTOR as u64, &mut self.window)?;
            self.window_start = first;
        }
        let off = (pos - self.window_start) as usize;
        Ok(Some(&self.window[off..off + len]))
    }
}

impl<D: BlockDevice> Log<D> {
    /// Opens the log: replays every valid record through `apply`, then writes a header with the
    /// next generation. A disk without a valid header gets a new, empty log.
    ///
    /// # Errors
    /// A disk request failed.
    pub fn open(
        mut disk: D,
        mut apply: impl FnMut(Record<'_>),
    ) -> Result<(Self, Recovered), DiskError> {
        let capacity = disk.sectors() * SECTOR as u64;
        let mut found = Recovered::default();
        let mut end = SECTOR as u64;
        let mut header = vec![0u8; SECTOR];
        disk.read(0, &mut header)?;
        let last_generation = header_generation(&header);
        if let Some(header_gen) = last_generation {
            let mut reader = Reader {
                disk: &mut disk,
                window: Vec::new(),
                window_start: 0,
                capacity,
            };
            let mut prev_gen = 0;
            while let Some(h) = reader.bytes(end, RECORD_HEADER)? {
                let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
                let mut g = [0u8; 8];
                g.copy_from_slice(&h[8..16]);
                let generation = u64::from_le_bytes(g);
                if len == 0 || len > MAX_PAYLOAD || generation < prev_gen || generation > header_gen
                {
                    break;
                }
                let Some(rec) = reader.bytes(end + 8, 8 + len)? else {
                    break;
                };
                if crc32c(rec) != crc {
                    break;
                }
                let Some(record) = Record::decode(&rec[8..]) else {
                    break;
                };
                apply(record);
                found.records += 1;
                prev_gen = generation;
                end += (RECORD_HEADER + len) as u64;
            }
        }
        found.fresh = last_generation.is_none();
        found.generation = last_generation.map_or(1, |g| g + 1);
        found.log_bytes = end;
        disk.write(0, &header_bytes(found.generation))?;
        let mut buf = vec![0u8; SECTOR];
        let tail_start = end / SECTOR as u64 * SECTOR as u64;
        disk.read(tail_start / SECTOR as u64, &mut buf)?;
        let tail_len = (end - tail_start) as usize;
        buf.truncate(tail_len);
        let log = Self {
            disk,
            end,
            buf,
            tail_len,
            generation: found.generation,
            capacity,
        };
        Ok((log, found))
    }

    /// Queues a record for the next [`Log::flush`].
    ///
    /// # Errors
    /// [`AppendError::DiskFull`] when the disk has no room for it, [`AppendError::NoMemory`]
    /// when the heap cannot hold it until the flush (nothing is queued either way).
    pub fn append(&mut self, record: Record<'_>) -> Result<(), AppendError> {
        let len = record.encoded_len();
        let need = self.end + (self.pending_len() + len) as u64;
        if need > self.capacity {
            return Err(AppendError::DiskFull);
        }
        // The record, and the zero padding of the last sector that `flush` adds in place.
        self.buf
            .try_reserve(len + SECTOR)
            .map_err(|_| AppendError::NoMemory)?;
        record.encode(self.generation, &mut self.buf);
        Ok(())
    }

    fn pending_len(&self) -> usize {
        self.buf.len() - self.tail_len
    }

    /// Whether records wait for [`Log::flush`].
    pub fn has_pending(&self) -> bool {
        self.pending_len() > 0
    }

    /// Writes the queued records (from the start of the sector holding the current end).
    ///
    /// # Errors
    /// A disk request failed; the records stay queued.
    pub fn flush(&mut self) -> Result<(), DiskError> {
        let pending = self.pending_len();
        if pending == 0 {
            return Ok(());
        }
        let first_sector = self.end / SECTOR as u64;
        let data_len = self.buf.len();
        // Within the capacity `append` reserved: no allocation.
        self.buf.resize(data_len.next_multiple_of(SECTOR), 0);
        for (i, chunk) in self.buf.chunks(MAX_IO).enumerate() {
            let sector = first_sector + (i * MAX_IO / SECTOR) as u64;
            if let Err(e) = self.disk.write(sector, chunk) {
                self.buf.truncate(data_len);
                return Err(e);
            }
        }
        self.end += pending as u64;
        self.tail_len = data_len % SECTOR;
        self.buf.truncate(data_len);
        self.buf.drain(..data_len - self.tail_len);
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf.shrink_to(SECTOR);
        }
        Ok(())
    }

    /// Bytes of the durable log.
    pub fn len(&self) -> u64 {
        self.end
    }

    /// Whether the log holds no record.
    pub fn is_empty(&self) -> bool {
        self.end == SECTOR as u64
    }

    /// Capacity of the disk in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The disk.
    pub fn disk_mut(&mut self) -> &mut D {
        &mut self.disk
    }
}

/// A block device in memory (tests, and a VM without a disk).
#[derive(Debug, Clone)]
pub struct MemDisk {
    /// The bytes.
    pub data: Vec<u8>,
}

impl MemDisk {
    /// A zeroed disk of `sectors` sectors.
    pub fn new(sectors: usize) -> Self {
        Self {
            data: vec![0; sectors * SECTOR],
        }
    }
}

impl BlockDevice for MemDisk {
    fn sectors(&self) -> u64 {
        (self.data.len() / SECTOR) as u64
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let start = sector as usize * SECTOR;
        let src = self
            .data
            .get(start..start + buf.len())
            .ok_or(DiskError { sector })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), DiskError> {
        let start = sector as usize * SECTOR;
        let dst = self
            .data
            .get_mut(start..start + buf.len())
            .ok_or(DiskError { sector })?;
        dst.copy_from_slice(buf);
        Ok(())
    }
}

impl<D: BlockDevice> BlockDevice for &mut D {
    fn sectors(&self) -> u64 {
        (**self).sectors()
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        (**self).read(sector, buf)
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), DiskError> {
        (**self).write(sector, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Owned = (u8, Vec<u8>, Vec<u8>);

    fn owned(r: Record<'_>) -> Owned {
        match r {
            Record::Set(k, v) => (OP_SET, k.to_vec(), v.to_vec()),
            Record::Del(k) => (OP_DEL, k.to_vec(), vec![]),
            Record::Clear => (OP_CLEAR, vec![], vec![]),
        }
    }

    fn recover(disk: &mut MemDisk) -> (Vec<Owned>, Recovered, u64) {
        let mut seen = Vec::new();
        let (log, rec) = Log::open(disk, |r| seen.push(owned(r))).expect("open");
        (seen, rec, log.len())
    }

    #[test]
    fn crc32c_known_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn fresh_disk_then_records_survive_reopen() {
        let mut disk = MemDisk::new(64);
        let big = vec![7u8; 3000];
        {
            let (mut log, rec) = Log::open(&mut disk, |_| panic!("empty")).expect("open");
            assert!(rec.fresh);
            assert_eq!(rec.generation, 1);
            log.append(Record::Set(b"a", b"1")).expect("room");
            log.flush().expect("flush");
            log.append(Record::Set(b"big", &big)).expect("room");
            log.append(Record::Del(b"a")).expect("room");
            log.flush().expect("flush");
            log.flush().expect("nothing pending");
            log.append(Record::Clear).expect("room");
            log.append(Record::Set(b"b", b"")).expect("room");
            log.flush().expect("flush");
        }
        let (seen, rec, len) = recover(&mut disk);
        assert!(!rec.fresh);
        assert_eq!(rec.generation, 2);
        assert_eq!(rec.records, 5);
        assert_eq!(seen[1], (OP_SET, b"big".to_vec(), big.clone()));
        assert_eq!(seen[2], (OP_DEL, b"a".to_vec(), vec![]));
        assert_eq!(seen[3].0, OP_CLEAR);
        assert_eq!(seen[4], (OP_SET, b"b".to_vec(), vec![]));
        assert_eq!(len, rec.log_bytes);
        // Appending in the new generation continues the log.
        {
            let (mut log, _) = Log::open(&mut disk, |_| {}).expect("open");
            log.append(Record::Set(b"c", b"3")).expect("room");
            log.flush().expect("flush");
        }
        let (seen, rec, _) = recover(&mut disk);
        assert_eq!(rec.records, 6);
        assert_eq!(seen[5], (OP_SET, b"c".to_vec(), b"3".to_vec()));
    }

    #[test]
    fn torn_tail_is_ignored_and_overwritten() {
        let mut disk = MemDisk::new(64);
        let end_after_two;
        {
            let (mut log, _) = Log::open(&mut disk, |_| {}).expect("open");
            log.append(Record::Set(b"k1", b"v1")).expect("room");
            log.append(Record::Set(b"k2", b"v2")).expect("room");
            log.flush().expect("flush");
            end_after_two = log.len() as usize;
            log.append(Record::Set(b"k3", &[9u8; 700])).expect("room");
            log.flush().expect("flush");
        }
        // Tear the third record: corrupt a byte of its value.
        disk.data[end_after_two + 100] ^= 0xff;
        let (seen, rec, len) = recover(&mut disk);
        assert_eq!(rec.records, 2);
        assert_eq!(len as usize, end_after_two);
        assert_eq!(seen[1].1, b"k2");
        // A shorter record now overwrites the torn one; a later boot must not resurrect the
        // stale (earlier-generation) bytes behind it even if they happen to parse.
        {
            let (mut log, _) = Log::open(&mut disk, |_| {}).expect("open");
            log.append(Record::Set(b"k4", b"v4")).expect("room");
            log.flush().expect("flush");
        }
        let (seen, rec, _) = recover(&mut disk);
        assert_eq!(rec.records, 3);
        assert_eq!(seen[2], (OP_SET, b"k4".to_vec(), b"v4".to_vec()));
    }

    #[test]
    fn stale_records_of_an_older_generation_end_the_log() {
        let mut disk = MemDisk::new(64);
        // x ends at 539; y (and later w, as long) then end exactly at byte 1024, a sector
        // boundary, so the zero-fill of w's last sector does not reach z.
        let y_val = [2u8; 459];
        let w_val = [4u8; 459];
        {
            let (mut log, _) = Log::open(&mut disk, |_| {}).expect("open");
            log.append(Record::Set(b"x", b"1")).expect("room");
            log.flush().expect("flush");
            assert_eq!(log.len(), 539);
            log.append(Record::Set(b"y", &y_val)).expect("room");
            log.append(Record::Set(b"z", b"3")).expect("room");
            log.flush().expect("flush");
        }
        let good = disk.data.clone();
        // Generation 1 wrote x, y, z; pretend the boot crashed with y torn.
        disk.data[600] ^= 1;
        {
            // Generation 2 recovers x only and writes w in y's place.
            let (mut log, rec) = Log::open(&mut disk, |_| {}).expect("open");
            assert_eq!(rec.records, 1);
            log.append(Record::Set(b"w", &w_val)).expect("room");
            log.flush().expect("flush");
            assert_eq!(log.len(), 1024);
        }
        // z (generation 1) still follows w (generation 2) and parses, but is not replayed.
        assert_eq!(disk.data[1024..1024 + 27], good[1024..1024 + 27]);
        let (seen, rec, _) = recover(&mut disk);
        assert_eq!(rec.records, 2);
        assert_eq!(seen[1].1, b"w");
    }

    #[test]
    fn full_disk_refuses_appends() {
        let mut disk = MemDisk::new(2);
        let (mut log, _) = Log::open(&mut disk, |_| {}).expect("open");
        let full = Err(AppendError::DiskFull);
        assert_eq!(log.append(Record::Set(b"k", &[0u8; 600])), full);
        log.append(Record::Set(b"k", &[0u8; 400])).expect("fits");
        assert_eq!(log.append(Record::Set(b"k", &[0u8; 100])), full);
        log.flush().expect("flush");
    }

    #[test]
    fn corrupt_header_starts_a_fresh_log() {
        let mut disk = MemDisk::new(8);
        {
            let (mut log, _) = Log::open(&mut disk, |_| {}).expect("open");
            log.append(Record::Set(b"k", b"v")).expect("room");
            log.flush().expect("flush");
        }
        disk.data[3] ^= 1;
        let (seen, rec, _) = recover(&mut disk);
        assert!(rec.fresh);
        assert!(seen.is_empty());
    }

    /// A disk whose writes fail while `broken`.
    struct Flaky {
        disk: MemDisk,
        broken: bool,
    }

    impl BlockDevice for Flaky {
        fn sectors(&self) -> u64 {
            self.disk.sectors()
        }
        fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
            self.disk.read(sector, buf)
        }
        fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), DiskError> {
            if self.broken {
                return Err(DiskError { sector });
            }
            self.disk.write(sector, buf)
        }
    }

    #[test]
    fn a_failed_flush_keeps_the_records_queued() {
        let mut disk = Flaky {
            disk: MemDisk::new(64),
            broken: false,
        };
        {
            let (mut log, _) = Log::open(&mut disk, |_| {}).expect("open");
            log.append(Record::Set(b"a", b"1")).expect("room");
            log.flush().expect("flush");
            log.append(Record::Set(b"b", &[2u8; 700])).expect("room");
            log.disk_mut().broken = true;
            assert!(log.flush().is_err());
            assert!(log.has_pending());
            log.disk_mut().broken = false;
            log.flush().expect("flush again");
            assert!(!log.has_pending());
        }
        let (seen, rec, _) = recover(&mut disk.disk);
        assert_eq!(rec.records, 2);
        assert_eq!(seen[1], (OP_SET, b"b".to_vec(), vec![2u8; 700]));
    }
}
