//! [`EtcdArbiter`]: the test-and-set as one etcd transaction, for pairs without shared storage.
//!
//! Keys, under a configurable prefix `P`:
//! ```text
//! P/current          "<generation, 20 digits zero-padded> <winner>"   the newest claim
//! P/gen/<generation> "<winner>"                                       history, one key per claim
//! ```
//! Claiming generation `N` by `who` is one transaction (etcd ≥ 3.3 for the nested part):
//! ```text
//! if create_revision(P/current) == 0                 # no claim yet
//! then put P/current, put P/gen/N                    # won
//! else if value(P/current) < "<N padded>"            # every older claim sorts below N
//!      then put P/current, put P/gen/N               # won
//!      else range P/current                          # lost (or already ours: a retry)
//! ```
//! Zero-padding makes the byte order of values the order of generations, and an existing
//! claim for `N` itself (`"<N padded> <winner>"`) sorts *above* the bare `"<N padded>"`, so it
//! is not overwritten. etcd applies the whole transaction atomically through Raft: a majority
//! of the cluster agrees on exactly one outcome, and with one member of three down the claim
//! still goes through.
//!
//! Claims carry no lease: a lease that expired while its holder was merely partitioned away
//! would let a second node win the same generation — exactly the split brain the arbiter is
//! there to prevent. Failure of the holder is the failure detector's business; the survivor
//! claims the *next* generation, and fencing does the rest.
//!
//! The client is [`etcdv3client`], whose gRPC code is generated ahead of time (no `protoc` at
//! build time). Each endpoint gets its own connection; an operation goes first to the last
//! endpoint that answered, and each 250 ms without an answer (or at once after a failure) it is
//! also sent to the next one (a hedged request), each attempt with its own timeout; the first
//! answer wins, and [`ArbiterError::Unreachable`] is reported when none answers. A transaction
//! whose reply was lost may have been applied: its retry finds the claim naming the caller and
//! reports it won — which also makes two concurrent attempts of one claim safe.
//!
//! A crashed member costs nothing: its connection fails at once and the next endpoint answers
//! (test: `crashed_endpoint_with_a_cached_connection_is_skipped_at_once`, ~2 ms). A crashed
//! *leader* costs more: until the survivors' election timeout (etcd's default 1 s, randomised
//! up to 2 s) a member still following the dead leader forwards the claim to it and does not
//! answer. Before hedging that attempt ran into its 2 s timeout (a failover right after the
//! leader crashed took the arbiter ~2.0 s instead of ~3 ms, ftvm's
//! `etcd_member_down_sigkill_primary_backup_goes_live_…` test); now the next member is asked
//! after 250 ms, and every 250 ms a new request goes to the next member (round-robin): a
//! request forwarded to the dead leader stays unanswered even after the election, a new one
//! goes through, so the claim waits about as long as the election.

use std::future::Future;
use std::io;
use std::sync::Mutex;
use std::time::Duration;

use etcdv3client::pb::{self, compare, request_op, response_op};
use etcdv3client::EtcdClient;

use super::{Acquire, Arbiter, ArbiterError};
use crate::node::NodeId;

/// Digits of a zero-padded generation (`u64::MAX` has 20).
const GEN_DIGITS: usize = 20;

/// Where and how [`EtcdArbiter`] reaches etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the cluster's members, e.g. `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of this pair's claims (one prefix per protected VM).
    pub prefix: String,
    /// Limit for one operation (connections included), over all its hedged attempts.
    pub op_timeout: Duration,
    /// An operation not answered within this is also sent to the next endpoint (a hedged
    /// request), and so on; the first answer wins.
    pub hedge_after: Duration,
}

impl EtcdConfig {
    /// A configuration with the default per-endpoint timeout (2 s).
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        Self {
            endpoints,
            prefix: prefix.into(),
            op_timeout: Duration::from_secs(2),
            hedge_after: Duration::from_millis(250),
        }
    }
}

#[derive(Debug)]
struct Connections {
    /// One lazily connected client per endpoint (`None`: not connected, or dropped after an
    /// error).
    clients: Vec<Option<EtcdClient>>,
    /// The endpoint tried first (the last one that answered).
    preferred: usize,
}

/// The test-and-set as an etcd transaction (see the [module docs](self)).
///
/// The API is blocking: the arbiter drives its gRPC client on a private single-threaded tokio
/// runtime, so it must not be called from inside an async runtime's worker thread (use
/// `spawn_blocking` there). Operations are serialised (one at a time per arbiter).
#[derive(Debug)]
pub struct EtcdArbiter {
    config: EtcdConfig,
    runtime: tokio::runtime::Runtime,
    connections: Mutex<Connections>,
}

impl EtcdArbiter {
    /// An arbiter on the etcd cluster of `config`. Nothing is contacted until the first
    /// operation, so this succeeds while the cluster is down.
    ///
    /// # Errors
    /// [`ArbiterError::Setup`] when the client's I/O runtime cannot be created, or (with an
    /// [`io::ErrorKind::InvalidInput`] source) when `config` names no endpoint.
    pub fn new(config: EtcdConfig) -> Result<Self, ArbiterError> {
        if config.endpoints.is_empty() {
            return Err(ArbiterError::Setup(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no etcd endpoint configured",
            )));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ArbiterError::Setup)?;
        let clients = config.endpoints.iter().map(|_| None).collect();
        Ok(Self {
            config,
            runtime,
            connections: Mutex::new(Connections {
                clients,
                preferred: 0,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    fn current_key(&self) -> Vec<u8> {
        format!("{}/current", self.config.prefix).into_bytes()
    }

    fn generation_key(&self, generation: u64) -> Vec<u8> {
        format!("{}/gen/{generation:0GEN_DIGITS$}", self.config.prefix).into_bytes()
    }

    /// Runs `op` against the endpoints until one answers: first the one that answered last;
    /// each [`EtcdConfig::hedge_after`] without an answer (or at once after a failure) the
    /// next one joins (round-robin, a new request each time), while the earlier attempts keep
    /// running; the first success wins. Gives up when every endpoint failed, or after
    /// [`EtcdConfig::op_timeout`] without an answer.
    ///
    /// Hedging matters after the cluster's *leader* crashed: a member still following it
    /// forwards the request and never answers until the election, while another member may
    /// answer at once. Running a claim on two members at once is safe: it is one transaction
    /// on one replicated store, and a claim that finds the key already naming the caller reports
    /// it won (see [`Arbiter::try_acquire`] below).
    fn with_client<T, F, Fut>(&self, op: F) -> Result<T, ArbiterError>
    where
        F: Fn(EtcdClient) -> Fut,
        Fut: Future<Output = Result<T, etcdv3client::Error>>,
    {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let mut conns = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = conns.clients.len();
        let order: Vec<usize> = (0..n).map(|i| (conns.preferred + i) % n).collect();
        let attempt = |idx: usize| {
            let endpoint = self.config.endpoints[idx].clone();
            let cached = conns.clients[idx].clone();
            let op = &op;
            async move {
                let r = tokio::time::timeout(self.config.op_timeout, async {
                    let client = match cached {
                        Some(c) => c,
                        None => EtcdClient::new(vec![endpoint.clone()], None).await?,
                    };
                    let out = op(client.clone()).await?;
                    Ok::<_, etcdv3client::Error>((client, out))
                })
                .await;
                (idx, endpoint, r)
            }
        };
        let deadline = tokio::time::Instant::now() + self.config.op_timeout;
        let (outcome, failed) = self.runtime.block_on(async {
            let mut running = FuturesUnordered::new();
            let mut next = 0;
            let mut failed: Vec<(usize, String)> = Vec::new();
            loop {
                if running.is_empty() {
                    // Every endpoint failed (the first pass), or none is left to try.
                    let Some(&idx) = order.get(next) else {
                        return (None, failed);
                    };
                    next += 1;
                    running.push(attempt(idx));
                }
                if tokio::time::Instant::now() >= deadline {
                    return (None, failed);
                }
                let hedge = tokio::time::sleep_until(
                    (tokio::time::Instant::now() + self.config.hedge_after).min(deadline),
                );
                tokio::select! {
                    done = running.next() => {
                        let Some((idx, endpoint, r)) = done else { continue };
                        match r {
                            Ok(Ok((client, out))) => return (Some((idx, client, out)), failed),
                            Ok(Err(e)) => {
                                tracing::debug!(endpoint, error = %e, "etcd endpoint failed");
                                failed.push((idx, format!("{endpoint}: {e}")));
                            }
                            Err(_) => {
                                tracing::debug!(endpoint, "etcd endpoint timed out");
                                failed.push((idx, format!(
                                    "{endpoint}: timed out after {:?}",
                                    self.config.op_timeout
                                )));
                            }
                        }
                        // A failure in the first pass: the next endpoint joins at once.
                        if let Some(&idx) = order.get(next) {
                            next += 1;
                            running.push(attempt(idx));
                        }
                    }
                    () = hedge => {
                        // Round-robin, also past the first pass: a request forwarded to a dead
                        // leader stays unanswered even after the election, a new one goes
                        // through.
                        if n > 0 && tokio::time::Instant::now() < deadline {
                            let idx = order[next % n];
                            tracing::debug!(endpoint = %self.config.endpoints[idx], "etcd: hedging");
                            next += 1;
                            running.push(attempt(idx));
                        }
                    }
                }
            }
        });
        for (idx, _) in &failed {
            conns.clients[*idx] = None;
        }
        match outcome {
            Some((idx, client, out)) => {
                conns.clients[idx] = Some(client);
                conns.preferred = idx;
                Ok(out)
            }
            None => {
                let last_error = failed.last().map_or_else(
                    || format!("none answered within {:?}", self.config.op_timeout),
                    |(_, e)| e.clone(),
                );
                Err(ArbiterError::unreachable(
                    self.config.endpoints.join(","),
                    io::Error::other(format!("no endpoint answered (last: {last_error})")),
                ))
            }
        }
    }

    fn parse_current(&self, value: &[u8]) -> Result<(u64, NodeId), ArbiterError> {
        let corrupt = |detail: String| ArbiterError::Corrupt {
            record: String::from_utf8_lossy(&self.current_key()).into_owned(),
            detail,
        };
        let text = std::str::from_utf8(value).map_err(|e| corrupt(format!("not UTF-8: {e}")))?;
        let (generation, winner) = text
            .split_once(' ')
            .ok_or_else(|| corrupt(format!("{text:?} is not `<generation> <winner>`")))?;
        let generation = generation
            .parse::<u64>()
            .ok()
            .filter(|g| *g > 0)
            .ok_or_else(|| corrupt(format!("bad generation in {text:?}")))?;
        let winner = NodeId::new(winner).map_err(|e| corrupt(format!("bad winner: {e}")))?;
        Ok((generation, winner))
    }
}

fn put(key: Vec<u8>, value: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestPut(pb::PutRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}

fn range(key: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestRange(pb::RangeRequest {
            key,
            ..Default::default()
        })),
    }
}

/// The value of the first range response in `responses`, if it found the key.
fn first_range_value(responses: &[pb::ResponseOp]) -> Option<Vec<u8>> {
    responses.iter().find_map(|r| match &r.response {
        Some(response_op::Response::ResponseRange(range)) => {
            range.kvs.first().map(|kv| kv.value.clone())
        }
        _ => None,
    })
}

impl Arbiter for EtcdArbiter {
    fn try_acquire(&self, generation: u64, who: &NodeId) -> Result<Acquire, ArbiterError> {
        if generation == 0 {
            return Err(ArbiterError::InvalidGeneration);
        }
        let current_key = self.current_key();
        let padded = format!("{generation:0GEN_DIGITS$}");
        let claim = format!("{padded} {who}").into_bytes();
        let on_win = vec![
            put(current_key.clone(), claim),
            put(
                self.generation_key(generation),
                who.as_str().as_bytes().to_vec(),
            ),
        ];
        let inner = pb::TxnRequest {
            compare: vec![pb::Compare {
                result: compare::CompareResult::Less as i32,
                target: compare::CompareTarget::Value as i32,
                key: current_key.clone(),
                target_union: Some(compare::TargetUnion::Value(padded.into_bytes())),
                ..Default::default()
            }],
            success: on_win.clone(),
            failure: vec![range(current_key.clone())],
        };
        let txn = pb::TxnRequest {
            compare: vec![pb::Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Create as i32,
                key: current_key,
                target_union: Some(compare::TargetUnion::CreateRevision(0)),
                ..Default::default()
            }],
            success: on_win,
            failure: vec![pb::RequestOp {
                request: Some(request_op::Request::RequestTxn(inner)),
            }],
        };
        let response = self.with_client(|mut client| {
            let txn = txn.clone();
            async move { client.kv.txn(txn).await }
        })?;
        let won = response.succeeded
            || response.responses.iter().any(|r| {
                matches!(&r.response, Some(response_op::Response::ResponseTxn(t)) if t.succeeded)
            });
        if won {
            tracing::info!(generation, %who, "arbiter (etcd): generation won");
            return Ok(Acquire::Won);
        }
        let value = response
            .responses
            .iter()
            .find_map(|r| match &r.response {
                Some(response_op::Response::ResponseTxn(t)) => first_range_value(&t.responses),
                _ => None,
            })
            .ok_or_else(|| ArbiterError::Corrupt {
                record: String::from_utf8_lossy(&self.current_key()).into_owned(),
                detail: "transaction failed but returned no current claim".into(),
            })?;
        let (newest, winner) = self.parse_current(&value)?;
        if newest == generation && &winner == who {
            // A retry of a claim that was applied but whose reply was lost.
            tracing::info!(generation, %who, "arbiter (etcd): generation already ours");
            return Ok(Acquire::Won);
        }
        tracing::info!(generation, newest, %winner, "arbiter (etcd): generation lost");
        Ok(Acquire::Lost {
            generation: newest,
            winner,
        })
    }

    fn current(&self) -> Result<Option<(u64, NodeId)>, ArbiterError> {
        let key = self.current_key();
        let response = self.with_client(|mut client| {
            let request = pb::RangeRequest {
                key: key.clone(),
                ..Default::default()
            };
            async move { client.kv.range(request).await }
        })?;
        match response.kvs.first() {
            None => Ok(None),
            Some(kv) => self.parse_current(&kv.value).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_value_parsing() {
        let arb = EtcdArbiter::new(EtcdConfig::new(vec!["http://127.0.0.1:1".into()], "t"))
            .expect("arbiter");
        let a = NodeId::new("a").expect("id");
        assert_eq!(
            arb.parse_current(b"00000000000000000007 a").expect("parse"),
            (7, a)
        );
        assert!(arb.parse_current(b"7").is_err());
        assert!(arb.parse_current(b"x a").is_err());
        assert!(arb.parse_current(b"0 a").is_err());
        assert!(arb.parse_current(b"7 a b").is_err());
        // Zero-padding orders values as generations.
        assert!(b"00000000000000000009 z".as_slice() < b"00000000000000000010".as_slice());
        assert!(b"00000000000000000010 a".as_slice() > b"00000000000000000010".as_slice());
        assert_eq!(
            arb.generation_key(3),
            b"t/gen/00000000000000000003".to_vec()
        );
    }

    #[test]
    fn no_endpoint_is_a_setup_error() {
        let err = EtcdArbiter::new(EtcdConfig::new(vec![], "t")).expect_err("must fail");
        assert!(matches!(err, ArbiterError::Setup(_)));
    }

    /// A single-member etcd on loopback (free ports, temporary data directory), SIGKILLed on
    /// drop.
    struct LocalEtcd {
        child: std::process::Child,
        client_port: u16,
        _dir: tempfile::TempDir,
    }

    impl LocalEtcd {
        fn start(name: &str) -> Self {
            let [client_port, peer_port] =
                ftvm_testkit::loopback_ports().expect("free loopback ports");
            let dir = tempfile::tempdir().expect("temp dir");
            let client = format!("http://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log file");
            let child = std::process::Command::new("etcd")
                .args(["--name", name, "--data-dir"])
                .arg(dir.path().join("data"))
                .args([
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                ])
                .args(["--initial-cluster", &format!("{name}={peer}")])
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .expect("start etcd");
            LocalEtcd {
                child,
                client_port,
                _dir: dir,
            }
        }

        fn url(&self) -> String {
            format!("http://127.0.0.1:{}", self.client_port)
        }
    }

    impl Drop for LocalEtcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Waits (at most 15 s) until `arb` answers a read.
    /// Prints the SKIP line and returns true when the `etcd` binary is missing.
    fn skip_without_etcd(test: &str) -> bool {
        ftvm_testkit::skip_without(test, "etcd", "etcd-server")
    }

    fn wait_answers(arb: &EtcdArbiter) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while let Err(e) = arb.current() {
            assert!(std::time::Instant::now() < deadline, "etcd not ready: {e}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The endpoint an arbiter uses (connected, cached, preferred) crashes: the next operation
    /// is answered by the next endpoint at once, not after the per-endpoint timeout. (Two
    /// independent single-member etcds stand in for two members of one cluster: what is tested
    /// is the client's move between endpoints.)
    #[test]
    fn crashed_endpoint_with_a_cached_connection_is_skipped_at_once() {
        // Bounds a time or a CPU share: one at a time with the other such tests.
        let _one = ftvm_testkit::one_at_a_time();
        const TEST: &str = "crashed_endpoint_with_a_cached_connection_is_skipped_at_once";
        if skip_without_etcd(TEST) {
            return;
        }
        let (first, second) = (LocalEtcd::start("first"), LocalEtcd::start("second"));
        let mut config = EtcdConfig::new(vec![first.url(), second.url()], "/t");
        config.op_timeout = Duration::from_secs(5);
        // No hedging: a slow first answer (a loaded machine) must not make the second endpoint
        // the preferred one before the crash; what is tested is the move after a failure.
        config.hedge_after = config.op_timeout;
        // Both members answer before the arbiter under test connects: were the first still
        // starting (a loaded machine), its first request would move to the second endpoint.
        for url in [first.url(), second.url()] {
            wait_answers(&EtcdArbiter::new(EtcdConfig::new(vec![url], "/t")).expect("arbiter"));
        }
        let arb = EtcdArbiter::new(config).expect("arbiter");
        wait_answers(&arb);
        let preferred = |arb: &EtcdArbiter| {
            let c = arb.connections.lock().unwrap_or_else(|e| e.into_inner());
            (
                c.preferred,
                c.clients.iter().map(Option::is_some).collect::<Vec<_>>(),
            )
        };
        assert_eq!(preferred(&arb), (0, vec![true, false]));
        drop(first); // SIGKILL
        let t = std::time::Instant::now();
        let a = NodeId::new("a").expect("id");
        assert_eq!(arb.try_acquire(1, &a).expect("claim"), Acquire::Won);
        let took = t.elapsed();
        eprintln!("{TEST}: claim through the second endpoint in {took:?}");
        assert!(took < Duration::from_secs(1), "took {took:?}");
        assert_eq!(preferred(&arb), (1, vec![false, true]));
        assert_eq!(arb.current().expect("current"), Some((1, a)));
    }

    /// The preferred endpoint accepts connections but never answers (as a member following a
    /// crashed leader does until the election): after `hedge_after` the claim also goes to the
    /// next endpoint, which answers; the silent one's timeout (10 s here) is not waited for.
    #[test]
    fn silent_endpoint_is_hedged_after_a_quarter_second() {
        // Bounds a time or a CPU share: one at a time with the other such tests.
        let _one = ftvm_testkit::one_at_a_time();
        const TEST: &str = "silent_endpoint_is_hedged_after_a_quarter_second";
        if skip_without_etcd(TEST) {
            return;
        }
        // The kernel completes the TCP handshake (backlog); nobody ever reads or writes.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let silent_url = format!("http://{}", silent.local_addr().expect("addr"));
        let etcd = LocalEtcd::start("hedge");
        wait_answers(&EtcdArbiter::new(EtcdConfig::new(vec![etcd.url()], "/h")).expect("arbiter"));
        let mut config = EtcdConfig::new(vec![silent_url, etcd.url()], "/h");
        config.op_timeout = Duration::from_secs(10);
        let arb = EtcdArbiter::new(config).expect("arbiter");
        let a = NodeId::new("a").expect("id");
        let t = std::time::Instant::now();
        assert_eq!(arb.try_acquire(1, &a).expect("claim"), Acquire::Won);
        let took = t.elapsed();
        eprintln!("{TEST}: claim answered by the second endpoint in {took:?}");
        assert!(
            took < Duration::from_secs(5),
            "waited {took:?}: the silent endpoint's timeout, not the hedge"
        );
        assert_eq!(arb.current().expect("current"), Some((1, a)));
    }

    #[test]
    fn closed_port_is_unreachable() {
        // Port 1 on loopback: nothing listens there (connection refused).
        let arb = EtcdArbiter::new(EtcdConfig::new(vec!["http://127.0.0.1:1".into()], "t"))
            .expect("arbiter");
        let a = NodeId::new("a").expect("id");
        let err = arb.try_acquire(1, &a).expect_err("must fail");
        assert!(err.is_unreachable(), "{err:?}");
    }
}
