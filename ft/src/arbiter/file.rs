//! [`FileArbiter`]: the test-and-set as an atomic file creation in a shared directory.
//!
//! ```text
//! <dir>/
//!   gen-1                     "ftvm-arbiter 1\ngeneration 1\nwinner host-a\n"
//!   gen-2                     "ftvm-arbiter 1\ngeneration 2\nwinner host-b\n"
//!   .claim-3-host-a-<pid>-<n> a claim being prepared (or left behind by a crash; ignored)
//! ```
//!
//! Claiming generation `N`:
//! 1. list the directory; if some `gen-M` with `M >= N` exists, the claim is stale or taken:
//!    lost (or won, if `gen-N` already names the caller);
//! 2. write the claim record to a private temporary file in the same directory and `fsync` it;
//! 3. `link(2)` it to `gen-N`. `link` fails with `EEXIST` when the name exists, atomically, on
//!    local filesystems and on NFS (it is the classic NFS-safe lock primitive), and unlike
//!    `open(O_CREAT|O_EXCL)` + `write` it publishes a file whose content is already complete, so
//!    a reader never sees an empty claim;
//! 4. read `gen-N` back: the claim is won iff it names the caller (this also settles the NFS
//!    case where a retransmitted `link` reports `EEXIST` although it succeeded);
//! 5. `fsync` the directory, so the claim survives a crash of the storage server; only then is
//!    the claim reported as won.
//!
//! The directory itself is never created: if it is missing (say the NFS mount is absent and the
//! mount point is an empty local directory, or the path is gone), creating it would let a node
//! win a test-and-set that its peer cannot see. Every I/O error on the directory is reported as
//! [`ArbiterError::Unreachable`].
//!
//! Requirements on the filesystem: hard links within one directory (local filesystems, NFS,
//! CephFS, GlusterFS; not FAT or plain SMB without Unix extensions) and close-to-open
//! consistency.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Acquire, Arbiter, ArbiterError};
use crate::node::NodeId;

/// Prefix of a claim file's name (`gen-<N>`, `N` in decimal).
const CLAIM_PREFIX: &str = "gen-";
/// Prefix of a temporary file holding a claim being prepared.
const TEMP_PREFIX: &str = ".claim-";
/// First line of a claim record (format name and version).
const MAGIC_LINE: &str = "ftvm-arbiter 1";
/// Largest claim record read (a valid one is far smaller).
const MAX_RECORD: u64 = 4096;

/// Distinguishes the temporary files of concurrent claims within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The test-and-set on a shared directory (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct FileArbiter {
    dir: PathBuf,
}

impl FileArbiter {
    /// An arbiter on `dir`. Nothing is touched until the first operation, so this succeeds even
    /// while the directory is unreachable; the directory must exist (it is never created).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The shared directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn unreachable(&self, what: &str, e: io::Error) -> ArbiterError {
        ArbiterError::unreachable(
            self.dir.display().to_string(),
            io::Error::new(e.kind(), format!("{what}: {e}")),
        )
    }

    fn claim_path(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("{CLAIM_PREFIX}{generation}"))
    }

    /// The newest generation with a claim file in the directory.
    fn newest_generation(&self) -> Result<Option<u64>, ArbiterError> {
        let entries = fs::read_dir(&self.dir).map_err(|e| self.unreachable("list", e))?;
        let mut newest = None;
        for entry in entries {
            let entry = entry.map_err(|e| self.unreachable("list", e))?;
            let name = entry.file_name();
            let Some(generation) = name
                .to_str()
                .and_then(|n| n.strip_prefix(CLAIM_PREFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if generation > 0 && newest.is_none_or(|n| generation > n) {
                newest = Some(generation);
            }
        }
        Ok(newest)
    }

    /// The winner recorded in `gen-<generation>`, `None` if the file does not exist.
    fn read_claim(&self, generation: u64) -> Result<Option<NodeId>, ArbiterError> {
        let path = self.claim_path(generation);
        let mut text = String::new();
        match File::open(&path) {
            Ok(f) => f
                .take(MAX_RECORD)
                .read_to_string(&mut text)
                .map_err(|e| self.unreachable("read claim", e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Either the claim does not exist or the directory is gone: tell them apart.
                return match fs::metadata(&self.dir) {
                    Ok(m) if m.is_dir() => Ok(None),
                    Ok(_) => Err(self.unreachable(
                        "stat",
                        io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
                    )),
                    Err(e) => Err(self.unreachable("stat", e)),
                };
            }
            Err(e) => return Err(self.unreachable("open claim", e)),
        };
        parse_record(&text, generation)
            .map(Some)
            .map_err(|detail| ArbiterError::Corrupt {
                record: path.display().to_string(),
                detail,
            })
    }

    /// Writes the claim record to a fresh temporary file, synced; returns its path.
    fn write_temp(&self, generation: u64, who: &NodeId) -> Result<PathBuf, ArbiterError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let temp = self.dir.join(format!(
            "{TEMP_PREFIX}{generation}-{who}-{}-{}-{nanos}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed),
        ));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)?;
            f.write_all(format_record(generation, who).as_bytes())?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&temp);
            return Err(self.unreachable("write claim", e));
        }
        Ok(temp)
    }

    fn sync_dir(&self) -> Result<(), ArbiterError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.unreachable("sync directory", e))
    }

    /// Settles the outcome once `gen-<generation>` exists (or should exist).
    fn verdict(&self, generation: u64, who: &NodeId) -> Result<Acquire, ArbiterError> {
        match self.read_claim(generation)? {
            Some(winner) if &winner == who => {
                self.sync_dir()?;
                Ok(Acquire::Won)
            }
            Some(winner) => Ok(Acquire::Lost { generation, winner }),
            None => Err(self.unreachable(
                "read back claim",
                io::Error::new(io::ErrorKind::NotFound, "claim vanished after link"),
            )),
        }
    }
}

impl Arbiter for FileArbiter {
    fn try_acquire(&self, generation: u64, who: &NodeId) -> Result<Acquire, ArbiterError> {
        if generation == 0 {
            return Err(ArbiterError::InvalidGeneration);
        }
        if let Some(newest) = self.newest_generation()? {
            if newest > generation {
                let winner = self.read_claim(newest)?.ok_or_else(|| {
                    self.unreachable(
                        "read newest claim",
                        io::Error::new(io::ErrorKind::NotFound, "claim vanished"),
                    )
                })?;
                tracing::debug!(generation, newest, %winner, "stale claim lost");
                return Ok(Acquire::Lost {
                    generation: newest,
                    winner,
                });
            }
            if newest == generation {
                return self.verdict(generation, who);
            }
        }
        let temp = self.write_temp(generation, who)?;
        let linked = fs::hard_link(&temp, self.claim_path(generation));
        if let Err(e) = fs::remove_file(&temp) {
            tracing::debug!(path = %temp.display(), error = %e, "could not remove claim temp file");
        }
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            // NFS may report an error for a link that was applied: the read-back decides.
            Err(e) => {
                tracing::debug!(generation, error = %e, "link failed; reading the claim back");
            }
        }
        let outcome = self.verdict(generation, who)?;
        match &outcome {
            Acquire::Won => {
                tracing::info!(generation, %who, dir = %self.dir.display(), "arbiter: generation won")
            }
            Acquire::Lost { winner, .. } => {
                tracing::info!(generation, %winner, "arbiter: generation lost")
            }
        }
        Ok(outcome)
    }

    fn current(&self) -> Result<Option<(u64, NodeId)>, ArbiterError> {
        let Some(newest) = self.newest_generation()? else {
            return Ok(None);
        };
        match self.read_claim(newest)? {
            Some(winner) => Ok(Some((newest, winner))),
            None => Err(self.unreachable(
                "read newest claim",
                io::Error::new(io::ErrorKind::NotFound, "claim vanished"),
            )),
        }
    }
}

fn format_record(generation: u64, who: &NodeId) -> String {
    format!("{MAGIC_LINE}\ngeneration {generation}\nwinner {who}\n")
}

fn parse_record(text: &str, generation: u64) -> Result<NodeId, String> {
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC_LINE) {
        return Err(format!("first line is not {MAGIC_LINE:?}"));
    }
    let recorded = lines
        .next()
        .and_then(|l| l.strip_prefix("generation "))
        .and_then(|g| g.parse::<u64>().ok())
        .ok_or("missing or bad `generation` line")?;
    if recorded != generation {
        return Err(format!(
            "records generation {recorded}, file name says {generation}"
        ));
    }
    let winner = lines
        .next()
        .and_then(|l| l.strip_prefix("winner "))
        .ok_or("missing `winner` line")?;
    NodeId::new(winner).map_err(|e| format!("bad winner: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).expect("valid id")
    }

    #[test]
    fn record_round_trip_and_rejects() {
        let rec = format_record(7, &id("host-a"));
        assert_eq!(parse_record(&rec, 7), Ok(id("host-a")));
        assert!(parse_record(&rec, 8).is_err());
        assert!(parse_record("", 7).is_err());
        assert!(parse_record("ftvm-arbiter 1\ngeneration 7\n", 7).is_err());
        assert!(parse_record("ftvm-arbiter 1\ngeneration 7\nwinner a b\n", 7).is_err());
    }

    #[test]
    fn claims_in_a_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let arb = FileArbiter::new(dir.path());
        let (a, b) = (id("a"), id("b"));
        assert!(arb.current().expect("current").is_none());
        assert!(matches!(
            arb.try_acquire(0, &a),
            Err(ArbiterError::InvalidGeneration)
        ));
        assert_eq!(arb.try_acquire(1, &a).expect("claim"), Acquire::Won);
        // Idempotent for the holder, lost for anyone else.
        assert_eq!(arb.try_acquire(1, &a).expect("claim"), Acquire::Won);
        assert_eq!(
            arb.try_acquire(1, &b).expect("claim"),
            Acquire::Lost {
                generation: 1,
                winner: a.clone()
            }
        );
        assert_eq!(arb.try_acquire(5, &b).expect("claim"), Acquire::Won);
        // Stale: 3 < 5 loses, naming the newest generation.
        assert_eq!(
            arb.try_acquire(3, &a).expect("claim"),
            Acquire::Lost {
                generation: 5,
                winner: b.clone()
            }
        );
        assert_eq!(arb.current().expect("current"), Some((5, b)));
        // No temporary files left behind.
        let names: Vec<String> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| n.starts_with(CLAIM_PREFIX)),
            "{names:?}"
        );
    }

    #[test]
    fn missing_directory_is_unreachable_and_never_created() {
        let dir = tempfile::tempdir().expect("temp dir");
        let gone = dir.path().join("mnt");
        let arb = FileArbiter::new(&gone);
        let err = arb.try_acquire(1, &id("a")).expect_err("must fail");
        assert!(err.is_unreachable(), "{err:?}");
        assert!(arb.current().expect_err("must fail").is_unreachable());
        assert!(!gone.exists());
    }

    #[test]
    fn corrupt_claim_is_reported() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::write(dir.path().join("gen-2"), "garbage").expect("write");
        let arb = FileArbiter::new(dir.path());
        assert!(matches!(
            arb.try_acquire(2, &id("a")),
            Err(ArbiterError::Corrupt { .. })
        ));
        assert!(matches!(arb.current(), Err(ArbiterError::Corrupt { .. })));
    }
}
