//! The key-value store and the commands it serves.
//!
//! Commands: `PING [msg]`, `ECHO msg`, `GET k`, `SET k v [NX|XX]`, `MGET k...`, `MSET k v...`,
//! `DEL k...`, `EXISTS k...`, `INCR k`, `DECR k`, `INCRBY k n`, `DECRBY k n`, `DBSIZE`,
//! `INFO [section]`, `FLUSHALL`/`FLUSHDB`, `SELECT 0`, `QUIT`, `SHUTDOWN`; anything else gets
//! `-ERR unknown command`. Every mutation goes to the [`Journal`] before it is applied, and a
//! mutation the journal refuses (disk full) is not applied.
//!
//! Memory ([`crate::memory`]): a write that would take the heap over `maxmemory` is refused
//! with `-OOM command not allowed when used memory > 'maxmemory'.` (Redis's `noeviction`
//! policy) before it is logged; `DEL` and `FLUSHALL` are never refused by the limit, so they
//! make room again. `INFO memory` reports `used_memory`, `maxmemory` and more.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use crate::log::{AppendError, BlockDevice, Log, Record};
use crate::memory::{try_copy, Memory, NoMemory, ENTRY_OVERHEAD};
use crate::resp;

/// Where mutations are logged.
pub trait Journal {
    /// Logs a mutation before it is applied.
    ///
    /// # Errors
    /// [`AppendError`]: the mutation must not be applied.
    fn append(&mut self, record: Record<'_>) -> Result<(), AppendError>;
}

impl<D: BlockDevice> Journal for Log<D> {
    fn append(&mut self, record: Record<'_>) -> Result<(), AppendError> {
        Log::append(self, record)
    }
}

/// A journal that keeps nothing (a VM without a disk, and recovery).
#[derive(Debug, Default)]
pub struct NoJournal;

impl Journal for NoJournal {
    fn append(&mut self, _record: Record<'_>) -> Result<(), AppendError> {
        Ok(())
    }
}

/// What the connection should do after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Keep serving.
    Continue,
    /// Send the replies, then close the connection (`QUIT`).
    Close,
    /// Persist and power off (`SHUTDOWN`).
    Shutdown,
}

/// The reply to a write refused by `maxmemory` (Redis's wording).
pub const ERR_OOM: &str = "OOM command not allowed when used memory > 'maxmemory'.";
/// The reply to a read whose reply cannot be allocated.
pub const ERR_REPLY_TOO_BIG: &str = "ERR reply does not fit in the free memory";
const ERR_DISK_FULL: &str = "ERR disk full: write not applied";
const ERR_NOT_INT: &str = "ERR value is not an integer or out of range";
const ERR_OVERFLOW: &str = "ERR increment or decrement would overflow";
const ERR_SYNTAX: &str = "ERR syntax error";

/// Bytes a bulk reply adds beyond its data (`$<len>\r\n...\r\n`, or `$-1\r\n`).
const BULK_OVERHEAD: usize = 32;

/// Why a write was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteError {
    /// Over `maxmemory`, or the heap could not hold it.
    Oom,
    /// The journal's disk is full.
    DiskFull,
}

impl From<AppendError> for WriteError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::DiskFull => Self::DiskFull,
            AppendError::NoMemory => Self::Oom,
        }
    }
}

impl From<NoMemory> for WriteError {
    fn from(_: NoMemory) -> Self {
        Self::Oom
    }
}

/// Estimated heap bytes of one key and its value.
fn entry_cost(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

/// The key-value store.
#[derive(Debug)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    commands: u64,
    /// Estimated heap bytes of the keys and values ([`entry_cost`] summed).
    dataset: usize,
    memory: Memory,
    /// Writes refused with `-OOM`.
    oom_rejections: u64,
}

impl Default for Store {
    fn default() -> Self {
        Self::with_memory(Memory::unlimited())
    }
}

fn wrong_arity(out: &mut Vec<u8>, name: &[u8]) {
    out.extend_from_slice(b"-ERR wrong number of arguments for '");
    out.extend(name.iter().map(u8::to_ascii_lowercase));
    out.extend_from_slice(b"' command\r\n");
}

fn unknown(out: &mut Vec<u8>, name: &[u8]) {
    out.extend_from_slice(b"-ERR unknown command '");
    // Keep the reply one line and printable.
    out.extend(
        name.iter()
            .take(128)
            .map(|&b| if b.is_ascii_graphic() { b } else { b'?' }),
    );
    out.extend_from_slice(b"'\r\n");
}

impl Store {
    /// An empty store without a memory limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store under `memory`'s limit.
    pub fn with_memory(memory: Memory) -> Self {
        Self {
            map: BTreeMap::new(),
            commands: 0,
            dataset: 0,
            memory,
            oom_rejections: 0,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the store has no key.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Commands executed.
    pub fn commands(&self) -> u64 {
        self.commands
    }

    /// Writes refused with `-OOM` so far.
    pub fn oom_rejections(&self) -> u64 {
        self.oom_rejections
    }

    /// Estimated heap bytes of the keys and values.
    pub fn dataset_bytes(&self) -> usize {
        self.dataset
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.map.get(key).map(Vec::as_slice)
    }

    /// Applies a logged mutation (recovery): not subject to `maxmemory`, as Redis loads its
    /// append-only file whatever the limit.
    ///
    /// # Errors
    /// [`NoMemory`] when the heap cannot hold it (the store is then incomplete).
    pub fn apply(&mut self, record: Record<'_>) -> Result<(), NoMemory> {
        self.write(&mut NoJournal, record, false)
            .map_err(|_| NoMemory)
    }

    /// Logs and applies one mutation. `limited`: refused when it would take the heap over
    /// `maxmemory`. Key and value are copied before the record is logged, so a write is
    /// either logged and applied, or neither.
    fn write(
        &mut self,
        journal: &mut dyn Journal,
        record: Record<'_>,
        limited: bool,
    ) -> Result<(), WriteError> {
        match record {
            Record::Set(key, value) => {
                let need = entry_cost(key, value) + record.encoded_len();
                if limited && !self.memory.admits(self.dataset, need) {
                    return Err(WriteError::Oom);
                }
                let v = try_copy(value)?;
                if let Some(slot) = self.map.get_mut(key) {
                    journal.append(record)?;
                    self.dataset = self.dataset - slot.len() + value.len();
                    *slot = v;
                } else {
                    let k = try_copy(key)?;
                    journal.append(record)?;
                    self.dataset += entry_cost(key, value);
                    self.map.insert(k, v);
                }
            }
            Record::Del(key) => {
                journal.append(record)?;
                if let Some(v) = self.map.remove(key) {
                    self.dataset -= entry_cost(key, &v);
                }
            }
            Record::Clear => {
                journal.append(record)?;
                self.map.clear();
                self.dataset = 0;
            }
        }
        Ok(())
    }

    /// The reply to a write that was not applied.
    fn refused(&mut self, out: &mut Vec<u8>, e: WriteError) {
        match e {
            WriteError::Oom => {
                self.oom_rejections += 1;
                resp::error(out, ERR_OOM);
            }
            WriteError::DiskFull => resp::error(out, ERR_DISK_FULL),
        }
    }

    /// Makes room in `out` for a reply of about `bytes` bytes; replies with an error when the
    /// heap cannot hold it.
    fn room_for_reply(&self, out: &mut Vec<u8>, bytes: usize) -> bool {
        if self.memory.try_grow(out, bytes).is_ok() {
            return true;
        }
        resp::error(out, ERR_REPLY_TOO_BIG);
        false
    }

    /// Executes one request, appending its reply to `out`. An empty request does nothing.
    pub fn execute(
        &mut self,
        args: &[&[u8]],
        journal: &mut dyn Journal,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let Some((&name, rest)) = args.split_first() else {
            return Outcome::Continue;
        };
        self.commands += 1;
        let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
        let arity_ok = |min: usize, max: usize| (min..=max).contains(&args.len());
        let checks: &[(&str, usize, usize)] = &[
            ("PING", 1, 2),
            ("ECHO", 2, 2),
            ("GET", 2, 2),
            ("SET", 3, 5),
            ("MGET", 2, usize::MAX),
            ("MSET", 3, usize::MAX),
            ("DEL", 2, usize::MAX),
            ("EXISTS", 2, usize::MAX),
            ("INCR", 2, 2),
            ("DECR", 2, 2),
            ("INCRBY", 3, 3),
            ("DECRBY", 3, 3),
            ("DBSIZE", 1, 1),
            ("INFO", 1, 2),
            ("FLUSHALL", 1, 2),
            ("FLUSHDB", 1, 2),
            ("SELECT", 2, 2),
            ("QUIT", 1, usize::MAX),
            ("SHUTDOWN", 1, 2),
        ];
        match checks.iter().find(|(n, _, _)| is(n)) {
            None => {
                unknown(out, name);
                return Outcome::Continue;
            }
            Some(&(_, min, max)) if !arity_ok(min, max) => {
                wrong_arity(out, name);
                return Outcome::Continue;
            }
            Some(_) => {}
        }
        if is("PING") {
            match rest.first() {
                None => resp::simple(out, "PONG"),
                Some(msg) if self.room_for_reply(out, msg.len() + BULK_OVERHEAD) => {
                    resp::bulk(out, msg)
                }
                Some(_) => {}
            }
        } else if is("ECHO") {
            if self.room_for_reply(out, rest[0].len() + BULK_OVERHEAD) {
                resp::bulk(out, rest[0]);
            }
        } else if is("GET") || is("MGET") {
            self.get_replies(is("MGET"), rest, out);
        } else if is("SET") {
            self.set(rest, journal, out);
        } else if is("MSET") {
            if rest.len() % 2 != 0 {
                wrong_arity(out, name);
                return Outcome::Continue;
            }
            self.mset(rest, journal, out);
        } else if is("DEL") {
            let mut n = 0;
            for k in rest {
                if self.map.contains_key(*k) {
                    if let Err(e) = self.write(journal, Record::Del(k), false) {
                        self.refused(out, e);
                        return Outcome::Continue;
                    }
                    n += 1;
                }
            }
            resp::integer(out, n);
        } else if is("EXISTS") {
            let n = rest.iter().filter(|k| self.map.contains_key(**k)).count();
            resp::integer(out, n as i64);
        } else if is("INCR") || is("DECR") || is("INCRBY") || is("DECRBY") {
            let by = match rest.get(1) {
                None => Some(1),
                Some(text) => resp::parse_int(text),
            };
            let Some(by) = by else {
                resp::error(out, ERR_NOT_INT);
                return Outcome::Continue;
            };
            let by = if is("DECR") || is("DECRBY") {
                by.checked_neg()
            } else {
                Some(by)
            };
            self.incr(rest[0], by, journal, out);
        } else if is("DBSIZE") {
            resp::integer(out, self.map.len() as i64);
        } else if is("INFO") {
            let text = self.info(rest.first().copied());
            resp::bulk(out, text.as_bytes());
        } else if is("FLUSHALL") || is("FLUSHDB") {
            match self.write(journal, Record::Clear, false) {
                Ok(()) => resp::simple(out, "OK"),
                Err(e) => self.refused(out, e),
            }
        } else if is("SELECT") {
            if rest[0] == b"0" {
                resp::simple(out, "OK");
            } else {
                resp::error(out, "ERR DB index is out of range");
            }
        } else if is("QUIT") {
            resp::simple(out, "OK");
            return Outcome::Close;
        } else if is("SHUTDOWN") {
            return Outcome::Shutdown;
        }
        Outcome::Continue
    }

    /// `GET k` (`many`: `MGET k...`), the reply's room reserved first.
    fn get_replies(&self, many: bool, keys: &[&[u8]], out: &mut Vec<u8>) {
        let size: usize = keys
            .iter()
            .map(|k| self.map.get(*k).map_or(0, Vec::len) + BULK_OVERHEAD)
            .sum();
        if !self.room_for_reply(out, size + BULK_OVERHEAD) {
            return;
        }
        if many {
            resp::array(out, keys.len());
        }
        for k in keys {
            match self.map.get(*k) {
                Some(v) => resp::bulk(out, v),
                None => resp::null(out),
            }
        }
    }

    fn set(&mut self, rest: &[&[u8]], journal: &mut dyn Journal, out: &mut Vec<u8>) {
        let (key, value) = (rest[0], rest[1]);
        let (mut nx, mut xx) = (false, false);
        for opt in &rest[2..] {
            if opt.eq_ignore_ascii_case(b"NX") {
                nx = true;
            } else if opt.eq_ignore_ascii_case(b"XX") {
                xx = true;
            } else {
                resp::error(out, ERR_SYNTAX);
                return;
            }
        }
        if nx && xx {
            resp::error(out, ERR_SYNTAX);
            return;
        }
        let exists = self.map.contains_key(key);
        if (nx && exists) || (xx && !exists) {
            resp::null(out);
            return;
        }
        match self.write(journal, Record::Set(key, value), true) {
            Ok(()) => resp::simple(out, "OK"),
            Err(e) => self.refused(out, e),
        }
    }

    /// `MSET`: refused as a whole when all its pairs together do not fit under the limit.
    fn mset(&mut self, rest: &[&[u8]], journal: &mut dyn Journal, out: &mut Vec<u8>) {
        let need: usize = rest
            .chunks_exact(2)
            .map(|kv| entry_cost(kv[0], kv[1]) + Record::Set(kv[0], kv[1]).encoded_len())
            .sum();
        if !self.memory.admits(self.dataset, need) {
            self.refused(out, WriteError::Oom);
            return;
        }
        for kv in rest.chunks_exact(2) {
            if let Err(e) = self.write(journal, Record::Set(kv[0], kv[1]), true) {
                self.refused(out, e);
                return;
            }
        }
        resp::simple(out, "OK");
    }

    fn incr(&mut self, key: &[u8], by: Option<i64>, journal: &mut dyn Journal, out: &mut Vec<u8>) {
        let current = match self.map.get(key) {
            None => Some(0),
            Some(v) => resp::parse_int(v),
        };
        let Some(current) = current else {
            resp::error(out, ERR_NOT_INT);
            return;
        };
        let Some(next) = by.and_then(|by| current.checked_add(by)) else {
            resp::error(out, ERR_OVERFLOW);
            return;
        };
        let text = resp::int_bytes(next);
        match self.write(journal, Record::Set(key, &text), true) {
            Ok(()) => resp::integer(out, next),
            Err(e) => self.refused(out, e),
        }
    }

    /// The text of `INFO [section]` (`memory`, `stats`, `errorstats`, `keyspace`; none,
    /// `default`, `all` or `everything`: all of them), lines ending in CRLF as Redis's.
    pub fn info(&self, section: Option<&[u8]>) -> String {
        let all = section.is_none_or(|s| {
            [&b"default"[..], b"all", b"everything"]
                .iter()
                .any(|a| s.eq_ignore_ascii_case(a))
        });
        let want =
            |name: &str| all || section.is_some_and(|s| s.eq_ignore_ascii_case(name.as_bytes()));
        let mut t = String::new();
        // Writing to a String cannot fail.
        if want("memory") {
            let u = self.memory.usage(self.dataset);
            let max = self.memory.maxmemory();
            let _ = write!(
                t,
                "# Memory\r\nused_memory:{}\r\nused_memory_peak:{}\r\nused_memory_dataset:{}\r\n\
                 maxmemory:{}\r\nmaxmemory_policy:noeviction\r\nheap_size:{}\r\n\
                 mem_allocator:linked_list_allocator\r\n\r\n",
                u.used,
                u.peak,
                self.dataset,
                if max == usize::MAX { 0 } else { max },
                if u.size == usize::MAX { 0 } else { u.size },
            );
        }
        if want("stats") {
            let _ = write!(
                t,
                "# Stats\r\ntotal_commands_processed:{}\r\n\r\n",
                self.commands
            );
        }
        if want("errorstats") {
            let _ = write!(
                t,
                "# Errorstats\r\nerrorstat_OOM:count={}\r\n\r\n",
                self.oom_rejections
            );
        }
        if want("keyspace") {
            let _ = write!(
                t,
                "# Keyspace\r\ndb0:keys={},expires=0,avg_ttl=0\r\n",
                self.map.len()
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::MemDisk;

    fn run(store: &mut Store, j: &mut dyn Journal, cmd: &str) -> String {
        let args: Vec<&[u8]> = cmd.split(' ').map(str::as_bytes).collect();
        let mut out = Vec::new();
        store.execute(&args, j, &mut out);
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn commands_reply_like_redis() {
        let mut s = Store::new();
        let j = &mut NoJournal;
        assert_eq!(run(&mut s, j, "PING"), "+PONG\r\n");
        assert_eq!(run(&mut s, j, "ping hi"), "$2\r\nhi\r\n");
        assert_eq!(run(&mut s, j, "GET k"), "$-1\r\n");
        assert_eq!(run(&mut s, j, "SET k v"), "+OK\r\n");
        assert_eq!(run(&mut s, j, "get k"), "$1\r\nv\r\n");
        assert_eq!(run(&mut s, j, "SET k w NX"), "$-1\r\n");
        assert_eq!(run(&mut s, j, "SET q w XX"), "$-1\r\n");
        assert_eq!(run(&mut s, j, "SET k w EX 10"), "-ERR syntax error\r\n");
        assert_eq!(run(&mut s, j, "EXISTS k q k"), ":2\r\n");
        assert_eq!(run(&mut s, j, "INCR n"), ":1\r\n");
        assert_eq!(run(&mut s, j, "INCRBY n 41"), ":42\r\n");
        assert_eq!(run(&mut s, j, "DECR n"), ":41\r\n");
        assert_eq!(run(&mut s, j, "INCR k"), format!("-{ERR_NOT_INT}\r\n"));
        assert_eq!(run(&mut s, j, "SET big 9223372036854775807"), "+OK\r\n");
        assert_eq!(run(&mut s, j, "INCR big"), format!("-{ERR_OVERFLOW}\r\n"));
        assert_eq!(run(&mut s, j, "DBSIZE"), ":3\r\n");
        assert_eq!(run(&mut s, j, "MSET a 1 b 2"), "+OK\r\n");
        assert_eq!(
            run(&mut s, j, "MGET a x b"),
            "*3\r\n$1\r\n1\r\n$-1\r\n$1\r\n2\r\n"
        );
        assert_eq!(run(&mut s, j, "DEL a b x"), ":2\r\n");
        assert_eq!(
            run(&mut s, j, "GET"),
            "-ERR wrong number of arguments for 'get' command\r\n"
        );
        assert_eq!(
            run(&mut s, j, "CONFIG GET save"),
            "-ERR unknown command 'CONFIG'\r\n"
        );
        assert_eq!(
            run(&mut s, j, "SELECT 1"),
            "-ERR DB index is out of range\r\n"
        );
        assert_eq!(run(&mut s, j, "FLUSHALL"), "+OK\r\n");
        assert_eq!(run(&mut s, j, "DBSIZE"), ":0\r\n");
        let mut out = Vec::new();
        assert_eq!(s.execute(&[b"QUIT"], j, &mut out), Outcome::Close);
        assert_eq!(s.execute(&[b"shutdown"], j, &mut out), Outcome::Shutdown);
        assert_eq!(s.execute(&[], j, &mut out), Outcome::Continue);
    }

    #[test]
    fn writes_are_logged_and_recovered() {
        let mut disk = MemDisk::new(64);
        let mut s = Store::new();
        {
            let (mut log, _) = Log::open(&mut disk, |r| s.apply(r).expect("room")).expect("open");
            for cmd in [
                "SET a 1",
                "INCR a",
                "SET b x",
                "DEL b",
                "MSET c 3 d 4",
                "GET a",
            ] {
                run(&mut s, &mut log, cmd);
            }
            log.flush().expect("flush");
        }
        let mut recovered = Store::new();
        let (_, rec) = Log::open(&mut disk, |r| recovered.apply(r).expect("room")).expect("reopen");
        assert_eq!(rec.records, 6, "SET, INCR (as SET), SET, DEL, 2 x SET");
        assert_eq!(recovered.get(b"a"), Some(&b"2"[..]));
        assert_eq!(recovered.get(b"b"), None);
        assert_eq!(recovered.len(), 3);
    }

    #[test]
    fn a_full_disk_refuses_writes_but_serves_reads() {
        let mut disk = MemDisk::new(2);
        let mut s = Store::new();
        let (mut log, _) = Log::open(&mut disk, |_| {}).expect("open");
        let big = "x".repeat(600);
        assert_eq!(
            run(&mut s, &mut log, &format!("SET k {big}")),
            format!("-{ERR_DISK_FULL}\r\n")
        );
        assert_eq!(run(&mut s, &mut log, "GET k"), "$-1\r\n", "not applied");
        assert_eq!(run(&mut s, &mut log, "SET k v"), "+OK\r\n");
    }

    fn oom() -> String {
        format!("-{ERR_OOM}\r\n")
    }

    #[test]
    fn a_full_store_refuses_writes_with_oom_and_stays_consistent() {
        // Room for a few 100-byte values (each costs about 100 + key + overhead + record).
        let mut s = Store::with_memory(Memory::new(1200, None));
        let mut disk = MemDisk::new(64);
        let (mut log, _) = Log::open(&mut disk, |_| {}).expect("open");
        let v = "x".repeat(100);
        let mut stored = 0;
        while run(&mut s, &mut log, &format!("SET k{stored} {v}")) == "+OK\r\n" {
            stored += 1;
        }
        assert!((3..=6).contains(&stored), "{stored} values fit");
        assert_eq!(s.len(), stored);
        // Then small ones until they do not fit either.
        let mut small = 0;
        while run(&mut s, &mut log, &format!("SET s{small} 1")) == "+OK\r\n" {
            small += 1;
        }
        assert_eq!(s.oom_rejections(), 2);
        // Every write that would add memory is refused; nothing of it is logged or applied.
        assert_eq!(run(&mut s, &mut log, &format!("SET new {v}")), oom());
        assert_eq!(run(&mut s, &mut log, &format!("MSET a 1 b {v}")), oom());
        assert_eq!(run(&mut s, &mut log, "INCR counter"), oom());
        assert_eq!(run(&mut s, &mut log, "GET new"), "$-1\r\n");
        assert_eq!(run(&mut s, &mut log, "EXISTS a"), ":0\r\n");
        // Reads go on.
        assert_eq!(
            run(&mut s, &mut log, "GET k0"),
            format!("${}\r\n{v}\r\n", v.len())
        );
        assert_eq!(s.oom_rejections(), 5);
        // A DEL frees room: the write succeeds again.
        assert_eq!(run(&mut s, &mut log, "DEL k0 k1"), ":2\r\n");
        assert_eq!(run(&mut s, &mut log, &format!("SET new {v}")), "+OK\r\n");
        log.flush().expect("flush");
        drop(log);
        // The log holds exactly what was applied.
        let mut r = Store::new();
        Log::open(&mut disk, |rec| r.apply(rec).expect("room")).expect("reopen");
        assert_eq!(r.len(), s.len());
        assert_eq!(r.get(b"k0"), None);
        assert_eq!(r.get(b"new"), Some(v.as_bytes()));
        assert_eq!(r.dataset_bytes(), s.dataset_bytes());
    }

    #[test]
    fn overwrites_and_deletes_keep_the_dataset_estimate_exact() {
        let mut s = Store::new();
        let j = &mut NoJournal;
        run(&mut s, j, "SET a 12345");
        run(&mut s, j, "SET b 1");
        let one = s.dataset_bytes();
        assert_eq!(one, 2 * ENTRY_OVERHEAD + 2 + 6);
        run(&mut s, j, "SET a 1");
        assert_eq!(s.dataset_bytes(), one - 4);
        run(&mut s, j, "DEL a b");
        assert_eq!(s.dataset_bytes(), 0);
        run(&mut s, j, "MSET a 1 b 2");
        run(&mut s, j, "FLUSHALL");
        assert_eq!(s.dataset_bytes(), 0);
    }

    #[test]
    fn info_reports_memory_limit_and_keys() {
        fn gauge() -> crate::memory::HeapUsage {
            crate::memory::HeapUsage {
                used: 4000,
                peak: 5000,
                size: 8000,
            }
        }
        let mut s = Store::with_memory(Memory::new(6000, Some(gauge)));
        let j = &mut NoJournal;
        run(&mut s, j, "SET a 1");
        assert_eq!(
            run(&mut s, j, &format!("SET b {}", "y".repeat(2000))),
            oom()
        );
        let memory = s.info(Some(b"MEMORY"));
        for line in [
            "# Memory\r\n",
            "used_memory:4000\r\n",
            "used_memory_peak:5000\r\n",
            "maxmemory:6000\r\n",
            "heap_size:8000\r\n",
            "maxmemory_policy:noeviction\r\n",
        ] {
            assert!(memory.contains(line), "{line:?} in {memory:?}");
        }
        assert!(!memory.contains("Keyspace"));
        let all = s.info(None);
        assert!(all.contains("db0:keys=1,expires=0,avg_ttl=0\r\n"), "{all}");
        assert!(all.contains("errorstat_OOM:count=1\r\n"), "{all}");
        assert!(all.contains("total_commands_processed:2\r\n"), "{all}");
        assert_eq!(s.info(Some(b"nosuch")), "");
        let reply = run(&mut s, j, "INFO keyspace");
        assert!(reply.starts_with("$44\r\n# Keyspace"), "{reply:?}");
        assert_eq!(
            Store::new().info(Some(b"memory")).lines().nth(4),
            Some("maxmemory:0"),
            "0: no limit, as Redis"
        );
    }

    #[test]
    fn a_reply_that_does_not_fit_is_an_error_not_a_panic() {
        fn tiny() -> crate::memory::HeapUsage {
            crate::memory::HeapUsage {
                used: 0,
                peak: 0,
                size: crate::memory::MIN_FREE + 1000,
            }
        }
        let mut s = Store::new();
        let j = &mut NoJournal;
        let big = "z".repeat(5000);
        run(&mut s, j, &format!("SET big {big}"));
        s.memory = Memory::new(usize::MAX, Some(tiny));
        let err = format!("-{ERR_REPLY_TOO_BIG}\r\n");
        assert_eq!(run(&mut s, j, "GET big"), err);
        assert_eq!(run(&mut s, j, "MGET big big"), err);
        assert_eq!(run(&mut s, j, &format!("ECHO {big}")), err);
        assert_eq!(run(&mut s, j, "GET nosuch"), "$-1\r\n");
        assert_eq!(run(&mut s, j, "DEL big"), ":1\r\n");
    }

    #[test]
    fn recovery_ignores_the_limit() {
        let mut s = Store::with_memory(Memory::new(10, None));
        s.apply(Record::Set(b"k", &[1; 100])).expect("room");
        assert_eq!(s.get(b"k").map(<[u8]>::len), Some(100));
        assert_eq!(run(&mut s, &mut NoJournal, "SET j 1"), oom());
    }
}
