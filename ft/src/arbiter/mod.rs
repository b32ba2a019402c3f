//! Split-brain protection: the atomic test-and-set a node must win before it goes live.
//!
//! # What the paper does
//! In VMware FT, when the primary and the backup lose contact, each side may believe the other
//! has failed. Before either goes live (the backup taking over, or the primary carrying on
//! alone), it executes an atomic *test-and-set* on the shared storage that holds the VM's disk.
//! Exactly one side succeeds and goes live; the other halts itself. If the storage cannot be
//! reached, the side simply waits: a node that cannot reach the storage could not do useful
//! work for clients anyway, and going live without the test-and-set risks two live copies of the
//! VM (*split brain*) — so **never go live blind**.
//!
//! # Generations
//! One test-and-set cannot be reused forever: after a failover the survivor is re-protected with
//! a new backup, and the next failure needs a fresh test-and-set. Each test-and-set is therefore
//! made on a numbered *generation*: the pair starts in generation 1, and a side that wants to go
//! live after a failure in generation `g` tries to acquire `g + 1`. Exactly one node wins each
//! generation, and once a generation `n` is taken no generation `≤ n` can be won any more
//! (a *stale* claim loses, [`Acquire::Lost`] naming the newest generation and its winner).
//!
//! Generations also *fence*: frames, heartbeats and outputs carry the sender's generation, and
//! the receiver only accepts its own current generation ([`Fence`]).
//! A primary that was partitioned away and still believes it is live keeps stamping its old
//! generation, so everything it sends is dropped by the nodes of the newer generation, and the
//! output releaser never releases its outputs once it has seen the newer generation.
//!
//! # Implementations
//! - [`FileArbiter`]: a shared directory (local, NFS, CephFS, …); one file per generation,
//!   created atomically. The embedded default.
//! - [`EtcdArbiter`] (cargo feature `etcd`): an etcd transaction, for pairs without shared
//!   storage.
//!
//! Both report an unreachable store as [`ArbiterError::Unreachable`]; [`acquire_with_retry`]
//! turns that into "wait and retry" and never returns [`Acquire::Won`] without a winning
//! test-and-set.

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod file;

#[cfg(feature = "etcd")]
pub use etcd::{EtcdArbiter, EtcdConfig};
pub use file::FileArbiter;

use std::thread;
use std::time::{Duration, Instant};

use crate::fence::Fence;
use crate::node::NodeId;

/// The outcome of a test-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// The caller holds the requested generation: it may go live in it.
    Won,
    /// Another node holds the requested generation, or a newer one exists: the caller must not
    /// go live.
    Lost {
        /// The newest generation taken (the requested one, or a newer one if the request was
        /// stale).
        generation: u64,
        /// The node that holds `generation`.
        winner: NodeId,
    },
}

impl Acquire {
    /// Whether the caller won.
    pub fn is_won(&self) -> bool {
        matches!(self, Self::Won)
    }
}

/// A failed arbiter operation.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    /// The store (directory, etcd cluster) could not be reached or written; the outcome of the
    /// test-and-set is unknown. Wait and retry (see [`acquire_with_retry`]); never go live.
    #[error("arbiter store {store} is unreachable")]
    Unreachable {
        /// The directory or endpoints that failed.
        store: String,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A claim record in the store cannot be understood.
    #[error("claim record {record} is corrupt: {detail}")]
    Corrupt {
        /// The file or key of the record.
        record: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Generation 0 was requested (generations start at 1; 0 means "none").
    #[error("generation 0 cannot be acquired (generations start at 1)")]
    InvalidGeneration,
    /// [`acquire_with_retry`] was told to stop before the test-and-set completed.
    #[error("stopped before the test-and-set completed")]
    Stopped,
    /// The arbiter's client could not be set up (for example its I/O runtime).
    #[error("arbiter client setup failed")]
    Setup(#[source] std::io::Error),
}

impl ArbiterError {
    /// Whether the operation may succeed if retried later (the store was unreachable).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }

    pub(crate) fn unreachable(
        store: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Unreachable {
            store: store.into(),
            source: source.into(),
        }
    }
}

/// The atomic test-and-set on shared storage.
///
/// Implementations guarantee, for every generation `g`: at most one node ever gets
/// [`Acquire::Won`] for `g` (exactly one if claims complete), and no node wins `g` once a
/// generation newer than `g` has been taken. A node that asks again for a generation it already
/// holds gets [`Acquire::Won`] again (so a claim whose reply was lost can be retried).
pub trait Arbiter: Send + Sync {
    /// Tries to take `generation` for `who`.
    ///
    /// # Errors
    /// [`ArbiterError::Unreachable`] when the store cannot be reached (the outcome is unknown:
    /// retry; the retry is idempotent), [`ArbiterError::Corrupt`] for an unreadable claim,
    /// [`ArbiterError::InvalidGeneration`] for generation 0.
    fn try_acquire(&self, generation: u64, who: &NodeId) -> Result<Acquire, ArbiterError>;

    /// The newest generation taken and its winner (`None` before the first claim).
    ///
    /// # Errors
    /// [`ArbiterError::Unreachable`] when the store cannot be reached,
    /// [`ArbiterError::Corrupt`] for an unreadable claim.
    fn current(&self) -> Result<Option<(u64, NodeId)>, ArbiterError>;
}

impl<A: Arbiter + ?Sized> Arbiter for &A {
    fn try_acquire(&self, generation: u64, who: &NodeId) -> Result<Acquire, ArbiterError> {
        (**self).try_acquire(generation, who)
    }

    fn current(&self) -> Result<Option<(u64, NodeId)>, ArbiterError> {
        (**self).current()
    }
}

impl<A: Arbiter + ?Sized> Arbiter for Box<A> {
    fn try_acquire(&self, generation: u64, who: &NodeId) -> Result<Acquire, ArbiterError> {
        (**self).try_acquire(generation, who)
    }

    fn current(&self) -> Result<Option<(u64, NodeId)>, ArbiterError> {
        (**self).current()
    }
}

impl<A: Arbiter + ?Sized> Arbiter for std::sync::Arc<A> {
    fn try_acquire(&self, generation: u64, who: &NodeId) -> Result<Acquire, ArbiterError> {
        (**self).try_acquire(generation, who)
    }

    fn current(&self) -> Result<Option<(u64, NodeId)>, ArbiterError> {
        (**self).current()
    }
}

/// Default etcd key prefix used by [`open`] when the spec names none.
pub const DEFAULT_ETCD_PREFIX: &str = "/ftvm";

/// Opens the arbiter named by a command-line style `spec`:
/// - `file:<directory>` (or a bare path): a [`FileArbiter`] on that shared directory;
/// - `etcd:<url>[,<url>…][#<prefix>]`: an `EtcdArbiter` on those endpoints (feature `etcd`),
///   keys under `<prefix>` (default [`DEFAULT_ETCD_PREFIX`]), e.g.
///   `etcd:http://10.0.0.1:2379,http://10.0.0.2:2379#/ftvm/vm1`.
///
/// Nothing is contacted yet.
///
/// # Errors
/// [`ArbiterError::Setup`] (with an [`std::io::ErrorKind::InvalidInput`] source) for an empty
/// spec, an `etcd:` spec without endpoints, or `etcd:` in a build without the `etcd` feature;
/// as [`EtcdArbiter::new`] otherwise.
pub fn open(spec: &str) -> Result<Box<dyn Arbiter>, ArbiterError> {
    let invalid = |msg: String| {
        ArbiterError::Setup(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg))
    };
    if let Some(rest) = spec.strip_prefix("etcd:") {
        let (urls, prefix) = rest.split_once('#').unwrap_or((rest, DEFAULT_ETCD_PREFIX));
        let endpoints: Vec<String> = urls
            .split(',')
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        if endpoints.is_empty() {
            return Err(invalid(format!(
                "arbiter spec {spec:?} names no etcd endpoint"
            )));
        }
        #[cfg(feature = "etcd")]
        {
            return Ok(Box::new(EtcdArbiter::new(EtcdConfig::new(
                endpoints, prefix,
            ))?));
        }
        #[cfg(not(feature = "etcd"))]
        {
            let _ = prefix;
            return Err(invalid(format!(
                "arbiter spec {spec:?}: built without the `etcd` feature"
            )));
        }
    }
    let dir = spec.strip_prefix("file:").unwrap_or(spec);
    if dir.is_empty() {
        return Err(invalid("empty arbiter spec".into()));
    }
    Ok(Box::new(FileArbiter::new(dir)))
}

/// Back-off between attempts of [`acquire_with_retry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait after the first failed attempt.
    pub initial: Duration,
    /// Longest wait between attempts (the wait doubles up to this).
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(500),
        }
    }
}

/// How often a sleeping [`acquire_with_retry`] looks at `should_stop`.
const STOP_POLL: Duration = Duration::from_millis(10);

/// Runs the test-and-set for `generation` until it has an outcome, waiting while the store is
/// unreachable ("never go live blind").
///
/// Unreachable errors are retried with exponential back-off (`policy`); they are logged (the
/// first one as a warning, then every tenth). `should_stop` is polled at least every 10 ms while
/// waiting; once it returns `true` the call gives up with [`ArbiterError::Stopped`].
///
/// This function returns [`Acquire::Won`] only when [`Arbiter::try_acquire`] returned it.
///
/// # Errors
/// [`ArbiterError::Stopped`] when stopped first; any error other than
/// [`ArbiterError::Unreachable`] from the arbiter, unchanged.
pub fn acquire_with_retry<A: Arbiter + ?Sized>(
    arbiter: &A,
    generation: u64,
    who: &NodeId,
    policy: RetryPolicy,
    should_stop: impl Fn() -> bool,
) -> Result<Acquire, ArbiterError> {
    let started = Instant::now();
    let mut wait = policy.initial;
    let mut failures: u64 = 0;
    loop {
        if should_stop() {
            return Err(ArbiterError::Stopped);
        }
        match arbiter.try_acquire(generation, who) {
            Ok(outcome) => {
                if failures > 0 {
                    tracing::info!(
                        generation,
                        failures,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "arbiter reachable again"
                    );
                }
                return Ok(outcome);
            }
            Err(e) if e.is_unreachable() => {
                if failures % 10 == 0 {
                    tracing::warn!(
                        generation,
                        failures,
                        error = %e,
                        source = e.source_text(),
                        "arbiter unreachable: waiting, not going live"
                    );
                }
                failures += 1;
            }
            Err(e) => return Err(e),
        }
        let deadline = Instant::now() + wait;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if should_stop() {
                return Err(ArbiterError::Stopped);
            }
            thread::sleep((deadline - now).min(STOP_POLL));
        }
        wait = (wait * 2).min(policy.max.max(policy.initial));
    }
}

/// Goes live the only safe way: waits for and wins the generation after `fence`'s current one.
///
/// Call it once the failure detector has presumed the peer failed. It runs
/// [`acquire_with_retry`] for `fence.current() + 1`; on [`Acquire::Won`] it advances `fence` to
/// the new generation (from then on everything stamped with the old generation is refused) and
/// the caller may go live. On [`Acquire::Lost`] the fence is left alone: the other side (or a
/// newer claim) won, and this node must not go live — in VMware FT's terms, it halts.
///
/// # Errors
/// As [`acquire_with_retry`]: [`ArbiterError::Stopped`] when `should_stop` fired first, or an
/// error other than [`ArbiterError::Unreachable`].
pub fn take_over<A: Arbiter + ?Sized>(
    arbiter: &A,
    fence: &Fence,
    who: &NodeId,
    policy: RetryPolicy,
    should_stop: impl Fn() -> bool,
) -> Result<(u64, Acquire), ArbiterError> {
    let generation = fence.current().saturating_add(1);
    let outcome = acquire_with_retry(arbiter, generation, who, policy, should_stop)?;
    if outcome.is_won() {
        fence.advance(generation);
        tracing::info!(generation, %who, "took over: this node is live in the new generation");
    } else {
        tracing::warn!(
            generation,
            ?outcome,
            "take-over lost: this node must not go live"
        );
    }
    Ok((generation, outcome))
}

impl ArbiterError {
    /// The error's source chain as one line (for logs).
    fn source_text(&self) -> String {
        let mut text = String::new();
        let mut cur = std::error::Error::source(self);
        while let Some(e) = cur {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&e.to_string());
            cur = e.source();
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Unreachable for the first `fail` calls, then wins.
    struct Flaky {
        fail: u32,
        calls: AtomicU32,
    }

    impl Arbiter for Flaky {
        fn try_acquire(&self, _: u64, _: &NodeId) -> Result<Acquire, ArbiterError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail {
                Err(ArbiterError::unreachable("flaky", "down"))
            } else {
                Ok(Acquire::Won)
            }
        }

        fn current(&self) -> Result<Option<(u64, NodeId)>, ArbiterError> {
            Ok(None)
        }
    }

    fn quick() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(4),
        }
    }

    #[test]
    fn retry_waits_through_unreachable() {
        let a = Flaky {
            fail: 5,
            calls: AtomicU32::new(0),
        };
        let who = NodeId::new("a").expect("valid id");
        let r = acquire_with_retry(&a, 1, &who, quick(), || false);
        assert_eq!(r.ok(), Some(Acquire::Won));
        assert_eq!(a.calls.load(Ordering::SeqCst), 6);
    }

    #[test]
    fn take_over_advances_the_fence_only_when_won() {
        let dir = tempfile::tempdir().expect("temp dir");
        let arb = FileArbiter::new(dir.path());
        let (a, b) = (NodeId::new("a").expect("id"), NodeId::new("b").expect("id"));
        let (fa, fb) = (Fence::new(1), Fence::new(1));
        assert_eq!(arb.try_acquire(1, &a).ok(), Some(Acquire::Won));
        let (g, won) = take_over(&arb, &fa, &a, quick(), || false).expect("take over");
        assert_eq!((g, won), (2, Acquire::Won));
        assert_eq!(fa.current(), 2);
        let (g, lost) = take_over(&arb, &fb, &b, quick(), || false).expect("take over");
        assert_eq!(
            (g, lost),
            (
                2,
                Acquire::Lost {
                    generation: 2,
                    winner: a
                }
            )
        );
        assert_eq!(fb.current(), 1, "a loser's fence must not move");
    }

    #[test]
    fn open_parses_specs() {
        let dir = tempfile::tempdir().expect("temp dir");
        let who = NodeId::new("a").expect("id");
        let spec = format!("file:{}", dir.path().display());
        assert_eq!(
            open(&spec).expect("file spec").try_acquire(1, &who).ok(),
            Some(Acquire::Won)
        );
        let bare = dir.path().display().to_string();
        assert_eq!(
            open(&bare).expect("bare path").current().ok(),
            Some(Some((1, who)))
        );
        assert!(matches!(open(""), Err(ArbiterError::Setup(_))));
        assert!(matches!(open("etcd:"), Err(ArbiterError::Setup(_))));
        assert!(matches!(open("etcd:#/p"), Err(ArbiterError::Setup(_))));
        #[cfg(feature = "etcd")]
        {
            // Port 1: nothing listens; the spec still parses, the store is unreachable.
            let arb = open("etcd:http://127.0.0.1:1#/x").expect("etcd spec");
            assert!(arb.current().expect_err("nothing there").is_unreachable());
        }
    }

    #[test]
    fn retry_stops_without_winning() {
        let a = Flaky {
            fail: u32::MAX,
            calls: AtomicU32::new(0),
        };
        let who = NodeId::new("a").expect("valid id");
        let stop_after = Instant::now() + Duration::from_millis(50);
        let r = acquire_with_retry(&a, 1, &who, quick(), || Instant::now() > stop_after);
        assert!(matches!(r, Err(ArbiterError::Stopped)), "{r:?}");
        assert!(a.calls.load(Ordering::SeqCst) > 3);
    }
}
