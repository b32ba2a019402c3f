//! The key-value store and the commands it serves.
//!
//! Commands: `PING [msg]`, `ECHO msg`, `GET k`, `SET k v [NX|XX]`, `MGET k...`, `MSET k v...`,
//! `DEL k...`, `EXISTS k...`, `INCR k`, `DECR k`, `INCRBY k n`, `DECRBY k n`, `DBSIZE`,
//! `FLUSHALL`/`FLUSHDB`, `SELECT 0`, `QUIT`, `SHUTDOWN`; anything else gets
//! `-ERR unknown command`. Every mutation goes to the [`Journal`] before it is applied, and a
//! mutation the journal refuses (disk full) is not applied.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::log::{BlockDevice, Log, LogFull, Record};
use crate::resp;

/// Where mutations are logged.
pub trait Journal {
    /// Logs a mutation before it is applied.
    ///
    /// # Errors
    /// [`LogFull`]: the mutation must not be applied.
    fn append(&mut self, record: Record<'_>) -> Result<(), LogFull>;
}

impl<D: BlockDevice> Journal for Log<D> {
    fn append(&mut self, record: Record<'_>) -> Result<(), LogFull> {
        Log::append(self, record)
    }
}

/// A journal that keeps nothing (a VM without a disk).
#[derive(Debug, Default)]
pub struct NoJournal;

impl Journal for NoJournal {
    fn append(&mut self, _record: Record<'_>) -> Result<(), LogFull> {
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

const ERR_DISK_FULL: &str = "ERR disk full: write not applied";
const ERR_NOT_INT: &str = "ERR value is not an integer or out of range";
const ERR_OVERFLOW: &str = "ERR increment or decrement would overflow";
const ERR_SYNTAX: &str = "ERR syntax error";

/// The key-value store.
#[derive(Debug, Default)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    commands: u64,
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
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
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

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.map.get(key).map(Vec::as_slice)
    }

    /// Applies a logged mutation (recovery).
    pub fn apply(&mut self, record: Record<'_>) {
        match record {
            Record::Set(k, v) => {
                self.map.insert(k.to_vec(), v.to_vec());
            }
            Record::Del(k) => {
                self.map.remove(k);
            }
            Record::Clear => self.map.clear(),
        }
    }

    fn logged(&mut self, journal: &mut dyn Journal, record: Record<'_>) -> Result<(), LogFull> {
        journal.append(record)?;
        self.apply(record);
        Ok(())
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
                Some(msg) => resp::bulk(out, msg),
            }
        } else if is("ECHO") {
            resp::bulk(out, rest[0]);
        } else if is("GET") {
            match self.map.get(rest[0]) {
                Some(v) => resp::bulk(out, v),
                None => resp::null(out),
            }
        } else if is("SET") {
            self.set(rest, journal, out);
        } else if is("MGET") {
            resp::array(out, rest.len());
            for k in rest {
                match self.map.get(*k) {
                    Some(v) => resp::bulk(out, v),
                    None => resp::null(out),
                }
            }
        } else if is("MSET") {
            if rest.len() % 2 != 0 {
                wrong_arity(out, name);
                return Outcome::Continue;
            }
            for kv in rest.chunks_exact(2) {
                if self.logged(journal, Record::Set(kv[0], kv[1])).is_err() {
                    resp::error(out, ERR_DISK_FULL);
                    return Outcome::Continue;
                }
            }
            resp::simple(out, "OK");
        } else if is("DEL") {
            let mut n = 0;
            for k in rest {
                if self.map.contains_key(*k) {
                    if self.logged(journal, Record::Del(k)).is_err() {
                        resp::error(out, ERR_DISK_FULL);
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
        } else if is("FLUSHALL") || is("FLUSHDB") {
            match self.logged(journal, Record::Clear) {
                Ok(()) => resp::simple(out, "OK"),
                Err(LogFull) => resp::error(out, ERR_DISK_FULL),
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
        match self.logged(journal, Record::Set(key, value)) {
            Ok(()) => resp::simple(out, "OK"),
            Err(LogFull) => resp::error(out, ERR_DISK_FULL),
        }
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
        match self.logged(journal, Record::Set(key, &text)) {
            Ok(()) => resp::integer(out, next),
            Err(LogFull) => resp::error(out, ERR_DISK_FULL),
        }
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
            let (mut log, _) = Log::open(&mut disk, |r| s.apply(r)).expect("open");
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
        let (_, rec) = Log::open(&mut disk, |r| recovered.apply(r)).expect("reopen");
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
}
