//! `--metrics ADDR` on `ftvm primary`, `ftvm backup` and `ftvm run`: the side's live counters
//! ([`ftvm_ft::observe`]) over HTTP.
//!
//! | path | body |
//! |---|---|
//! | `GET /metrics` | Prometheus / OpenMetrics text exposition (`prometheus-client`) |
//! | `GET /status.json` | the same [`Snapshot`] as one JSON object (what `--report` embeds as `"metrics"` and `ftvm stat` reads) |
//!
//! Metric names (counters end in `_total`): `ftvm_side_info{role}`, `ftvm_generation`,
//! `ftvm_uptime_seconds`, `ftvm_exits_total{kind}`, `ftvm_log_position{stage=written|sent|
//! acked|executed}`, `ftvm_log_entries_total`, `ftvm_log_bytes_total`, `ftvm_log_stalls_total`,
//! `ftvm_log_stall_seconds_total`, `ftvm_lag_entries`, `ftvm_lag_bytes`, `ftvm_lag_seconds`,
//! `ftvm_throttle_share`, `ftvm_throttle_target_seconds`, `ftvm_throttle_actuator_info
//! {actuator}`, `ftvm_throttled_seconds_total`, `ftvm_throttle_pacer_sleeps_total`,
//! `ftvm_output_delay_seconds` (histogram), `ftvm_outputs_held`, `ftvm_outputs_produced_total`,
//! `ftvm_outputs_released_total`, `ftvm_outputs_early_total`, `ftvm_channel_frames_total
//! {direction}`, `ftvm_channel_bytes_total{direction}`, `ftvm_channel_retransmits_total{kind=
//! timeout|frame|selective}`, `ftvm_channel_drops_total`, `ftvm_channel_rtt_seconds`,
//! `ftvm_detector_heartbeats_total{direction=sent|received|stale}`,
//! `ftvm_detector_peer_failures_total` (the peer's heartbeats and traffic missed for the fail
//! timeout), `ftvm_disk_writes_total`, `ftvm_disk_waits_total`, `ftvm_disk_wait_seconds_total`.
//! A part that is not running (no throttle on a backup, no detector without an arbiter) has no
//! metrics.
//!
//! The server is one thread that answers one connection at a time, off every hot path: each
//! scrape takes one [`Observer::snapshot`]. It is a minimal HTTP/1.1 responder on a std
//! `TcpListener` (read the request head, answer, close) rather than an HTTP framework: two
//! fixed `GET` paths, no keep-alive, no TLS, no routing, and the workspace has no async runtime
//! to host hyper or axum in (tiny_http would bring its own thread pool for this one thread's
//! job). [`http_get`] is the matching client of `ftvm stat` and the tests.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ftvm_ft::observe::{Observer, Snapshot};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// Errors of the metrics endpoint and its client.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address is not `HOST:PORT`.
    #[error("{0:?} is not HOST:PORT")]
    Address(String),
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server thread could not be started.
    #[error("cannot start the metrics thread")]
    Spawn(#[source] std::io::Error),
    /// A request to an endpoint failed (connect, send, receive).
    #[error("{addr}: request failed")]
    Request {
        /// The endpoint.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The endpoint answered with something other than `200 OK`.
    #[error("{addr}: {status}")]
    Status {
        /// The endpoint.
        addr: String,
        /// Its status line.
        status: String,
    },
}

/// Parses `HOST:PORT` (the first address it resolves to).
///
/// # Errors
/// [`MetricsError::Address`].
pub fn parse_addr(s: &str) -> Result<SocketAddr, MetricsError> {
    s.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| MetricsError::Address(s.to_string()))
}

/// The running endpoint; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (port 0: any free port) and serves `observer`'s snapshots from a thread.
    ///
    /// # Errors
    /// [`MetricsError::Bind`], [`MetricsError::Spawn`].
    pub fn start(addr: SocketAddr, observer: Observer) -> Result<Self, MetricsError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("ftvm-metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s.load(Ordering::Acquire) {
                        break;
                    }
                    if let Ok(c) = conn {
                        if let Err(e) = serve(c, &observer) {
                            tracing::debug!(error = %e, "metrics request failed");
                        }
                    }
                }
            })
            .map_err(MetricsError::Spawn)?;
        tracing::info!(%addr, "metrics at http://{addr}/metrics and /status.json");
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the endpoint when `addr` is given (`--metrics`).
///
/// # Errors
/// A bad address or a port that cannot be bound.
pub fn start_if(addr: Option<&str>, observer: &Observer) -> anyhow::Result<Option<MetricsServer>> {
    addr.map(|a| {
        let sa = parse_addr(a).map_err(|e| anyhow::anyhow!("--metrics: {e}"))?;
        MetricsServer::start(sa, observer.clone())
            .map_err(|e| anyhow::anyhow!("--metrics: {}", ftvm_vmm_core::error_chain(&e)))
    })
    .transpose()
}

const HEAD_LIMIT: usize = 8 << 10;

/// Answers one request on `c`.
fn serve(mut c: TcpStream, observer: &Observer) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    c.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < HEAD_LIMIT {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            prometheus_text(&observer.snapshot()),
        ),
        ("GET", "/status.json") => (
            "200 OK",
            "application/json",
            serde_json::to_string(&observer.snapshot()).unwrap_or_else(|_| "{}".into()),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /status.json\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    write!(
        c,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    c.flush()
}

/// `GET path` from `addr` (`HOST:PORT`); the body of a `200 OK` answer.
///
/// # Errors
/// [`MetricsError`].
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<String, MetricsError> {
    let req = |source| MetricsError::Request {
        addr: addr.to_string(),
        source,
    };
    let sa = parse_addr(addr)?;
    let mut c = TcpStream::connect_timeout(&sa, timeout).map_err(req)?;
    c.set_read_timeout(Some(timeout)).map_err(req)?;
    c.set_write_timeout(Some(timeout)).map_err(req)?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(req)?;
    let mut text = String::new();
    c.read_to_string(&mut text).map_err(req)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    if !status.contains(" 200 ") {
        return Err(MetricsError::Status {
            addr: addr.to_string(),
            status,
        });
    }
    Ok(body.to_string())
}

/// A histogram made from a snapshot's buckets.
#[derive(Debug)]
struct ConstHistogram {
    sum: f64,
    count: u64,
    /// `(upper bound, count in this bucket)`, the last one `f64::MAX` (+Inf).
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A counter family: name, help, unit, label, and a value per label value.
type CounterFamily<'a> = (&'a str, &'a str, Option<Unit>, &'a str, Vec<(&'a str, u64)>);

/// Encodes one snapshot (the registry's only collector).
#[derive(Debug)]
struct SnapshotCollector(Snapshot);

/// One descriptor with unlabelled or labelled values.
struct Out<'a, 'b>(&'b mut DescriptorEncoder<'a>);

impl Out<'_, '_> {
    fn metric(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        m: &impl EncodeMetric,
    ) -> std::fmt::Result {
        let e = self
            .0
            .encode_descriptor(name, help, unit.as_ref(), m.metric_type())?;
        m.encode(e)
    }
    fn gauge(&mut self, name: &str, help: &str, unit: Option<Unit>, v: f64) -> std::fmt::Result {
        self.metric(name, help, unit, &ConstGauge::new(v))
    }
    fn counter(&mut self, name: &str, help: &str, unit: Option<Unit>, v: f64) -> std::fmt::Result {
        self.metric(name, help, unit, &ConstCounter::new(v))
    }
    fn info(&mut self, name: &str, help: &str, labels: &[(&str, &str)]) -> std::fmt::Result {
        let mut e = self
            .0
            .encode_descriptor(name, help, None, MetricType::Info)?;
        e.encode_info(&labels)
    }
    /// A family: one value per label value of `label`.
    fn family(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        ty: MetricType,
        label: &str,
        values: &[(&str, f64)],
    ) -> std::fmt::Result {
        let mut e = self.0.encode_descriptor(name, help, unit.as_ref(), ty)?;
        for (l, v) in values {
            let labels = [(label, *l)];
            let f = e.encode_family(&labels)?;
            match ty {
                MetricType::Counter => ConstCounter::new(*v).encode(f)?,
                _ => ConstGauge::new(*v).encode(f)?,
            }
        }
        Ok(())
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let mut o = Out(&mut enc);
        let secs = Some(Unit::Seconds);
        let bytes = Some(Unit::Bytes);
        o.info(
            "ftvm_side",
            "What this side is doing",
            &[("role", s.role.name())],
        )?;
        o.gauge(
            "ftvm_generation",
            "Replication generation this side acts in",
            None,
            s.generation as f64,
        )?;
        o.gauge(
            "ftvm_uptime",
            "Time since this side started",
            secs.clone(),
            s.uptime_s,
        )?;
        if let Some(x) = &s.exits {
            let v: Vec<(&str, f64)> = x
                .by_kind
                .iter()
                .map(|(k, n)| (k.as_str(), *n as f64))
                .collect();
            o.family(
                "ftvm_exits",
                "VM exits by kind",
                None,
                MetricType::Counter,
                "kind",
                &v,
            )?;
        }
        if let Some(l) = &s.log {
            let mut v = vec![("written", l.written as f64)];
            if let Some(sent) = l.sent {
                v.push(("sent", sent as f64));
            }
            v.extend([("acked", l.acked as f64), ("executed", l.executed as f64)]);
            o.family("ftvm_log_position", "Log sequence number written (backup: received), sent, acknowledged and executed by the backup", None, MetricType::Gauge, "stage", &v)?;
            o.counter(
                "ftvm_log_entries",
                "Log entries written (backup: delivered)",
                None,
                l.entries as f64,
            )?;
            if let Some(b) = l.bytes {
                o.counter("ftvm_log", "Log payload written", bytes.clone(), b as f64)?;
            }
            o.counter(
                "ftvm_log_stalls",
                "Times the vCPU waited for log space",
                None,
                l.stalls as f64,
            )?;
            o.counter(
                "ftvm_log_stall",
                "Time the vCPU waited for log space",
                secs.clone(),
                l.stall_ms / 1e3,
            )?;
        }
        if let Some(l) = &s.lag {
            o.gauge(
                "ftvm_lag_entries",
                "Entries written and not yet executed by the backup",
                None,
                l.entries as f64,
            )?;
            if let Some(b) = l.bytes {
                o.gauge(
                    "ftvm_lag",
                    "Lag of the backup in log bytes",
                    bytes.clone(),
                    b as f64,
                )?;
            }
            if let Some(ms) = l.ms {
                o.gauge(
                    "ftvm_lag",
                    "Age of the oldest entry the backup has not executed",
                    secs.clone(),
                    ms / 1e3,
                )?;
            }
        }
        if let Some(t) = &s.throttle {
            o.gauge(
                "ftvm_throttle_share",
                "The primary vCPU's share of a CPU (1 = no limit)",
                None,
                t.share,
            )?;
            o.gauge(
                "ftvm_throttle_target",
                "The throttle's lag target",
                secs.clone(),
                t.target_ms / 1e3,
            )?;
            o.info(
                "ftvm_throttle_actuator",
                "What applies the share: cgroup-v2, cgroup-v1 or pacer",
                &[("actuator", t.actuator.as_str())],
            )?;
            o.counter(
                "ftvm_throttled",
                "Time spent below full share",
                secs.clone(),
                t.throttled_ms / 1e3,
            )?;
            o.counter(
                "ftvm_throttle_pacer_sleeps",
                "Pauses the pacer made the vCPU take",
                None,
                t.pacer_sleeps as f64,
            )?;
        }
        if let Some(out) = &s.outputs {
            let d = &out.delay;
            let mut buckets = Vec::with_capacity(d.buckets.len() + 1);
            let mut below = 0;
            for b in &d.buckets {
                buckets.push((b.le, b.count.saturating_sub(below)));
                below = b.count;
            }
            buckets.push((f64::MAX, d.count.saturating_sub(below)));
            let h = ConstHistogram {
                sum: d.sum_s,
                count: d.count,
                buckets,
            };
            o.metric(
                "ftvm_output_delay",
                "Time an output waited for the backup's acknowledgement",
                secs.clone(),
                &h,
            )?;
            o.gauge(
                "ftvm_outputs_held",
                "Outputs waiting for an acknowledgement",
                None,
                out.held as f64,
            )?;
            o.counter(
                "ftvm_outputs_produced",
                "Outputs submitted to the output rule",
                None,
                out.produced as f64,
            )?;
            o.counter(
                "ftvm_outputs_released",
                "Outputs released",
                None,
                out.released as f64,
            )?;
            o.counter(
                "ftvm_outputs_early",
                "Outputs released below the acknowledged position (must stay 0)",
                None,
                out.early as f64,
            )?;
        }
        if let Some(c) = &s.channel {
            let k = &c.counters;
            o.info(
                "ftvm_channel_transport",
                "The log channel's transport",
                &[("transport", c.transport.as_str())],
            )?;
            let families: [CounterFamily; 3] = [
                (
                    "ftvm_channel_frames",
                    "Log channel frames",
                    None,
                    "direction",
                    vec![("sent", k.frames_sent), ("received", k.frames_received)],
                ),
                (
                    "ftvm_channel",
                    "Log channel bytes",
                    bytes,
                    "direction",
                    vec![("sent", k.bytes_sent), ("received", k.bytes_received)],
                ),
                (
                    "ftvm_channel_retransmits",
                    "Retransmissions: timeouts (go-back-N), frames sent again, selective resends",
                    None,
                    "kind",
                    vec![
                        ("timeout", k.retransmit_timeouts),
                        ("frame", k.retransmitted_frames),
                        ("selective", k.selective_retransmits),
                    ],
                ),
            ];
            for (name, help, unit, label, values) in families {
                let v: Vec<(&str, f64)> = values.iter().map(|(l, n)| (*l, *n as f64)).collect();
                o.family(name, help, unit, MetricType::Counter, label, &v)?;
            }
            o.counter(
                "ftvm_channel_drops",
                "Frames dropped (bad, duplicate, out of order, no room)",
                None,
                k.drops() as f64,
            )?;
            if k.srtt_ns > 0 {
                o.gauge(
                    "ftvm_channel_rtt",
                    "Smoothed round trip to an acknowledgement",
                    secs.clone(),
                    k.srtt_ns as f64 / 1e9,
                )?;
            }
        }
        if let Some(d) = &s.detector {
            o.family(
                "ftvm_detector_heartbeats",
                "Heartbeats sent, received from the peer, ignored as stale, and missed (gaps in the peer's sequence)",
                None,
                MetricType::Counter,
                "direction",
                &[
                    ("sent", d.heartbeats_sent as f64),
                    ("received", d.heartbeats_received as f64),
                    ("stale", d.stale_heartbeats as f64),
                    ("missed", d.heartbeats_missed as f64),
                ],
            )?;
            o.counter(
                "ftvm_detector_peer_failures",
                "Times the peer's heartbeats and traffic were missed for the fail timeout",
                None,
                d.failures_declared as f64,
            )?;
            o.counter(
                "ftvm_detector_send_errors",
                "Heartbeats that could not be sent",
                None,
                d.send_errors as f64,
            )?;
        }
        if let Some(w) = &s.disk_waits {
            o.counter(
                "ftvm_disk_writes",
                "Shared-disk write requests",
                None,
                w.writes as f64,
            )?;
            o.counter(
                "ftvm_disk_waits",
                "Shared-disk writes that waited for the backup's ack",
                None,
                w.waited as f64,
            )?;
            o.counter(
                "ftvm_disk_wait",
                "Time shared-disk writes waited",
                secs,
                w.time_ms / 1e3,
            )?;
        }
        Ok(())
    }
}

/// The Prometheus (OpenMetrics) text of `s`.
pub fn prometheus_text(s: &Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(s.clone())));
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        let _ = writeln!(text, "# encoding failed");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_ft::observe::{Bucket, DelaySnapshot, LogSnapshot, OutputsSnapshot, SideRole};

    #[test]
    fn the_text_names_every_part() {
        let s = Snapshot {
            role: SideRole::Primary,
            generation: 3,
            log: Some(LogSnapshot {
                written: 9,
                sent: Some(8),
                acked: 7,
                executed: 5,
                ..Default::default()
            }),
            outputs: Some(OutputsSnapshot {
                produced: 4,
                released: 3,
                held: 1,
                delay: DelaySnapshot {
                    count: 3,
                    sum_s: 0.003,
                    buckets: vec![
                        Bucket {
                            le: 0.001,
                            count: 2,
                        },
                        Bucket { le: 0.01, count: 3 },
                    ],
                    ..Default::default()
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = prometheus_text(&s);
        for want in [
            "ftvm_side_info{role=\"primary\"} 1",
            "ftvm_generation 3",
            "ftvm_log_position{stage=\"sent\"} 8",
            "ftvm_log_position{stage=\"executed\"} 5",
            "ftvm_outputs_held 1",
            "ftvm_output_delay_seconds_bucket{le=\"0.001\"} 2",
            "ftvm_output_delay_seconds_bucket{le=\"0.01\"} 3",
            "ftvm_output_delay_seconds_bucket{le=\"+Inf\"} 3",
            "# EOF",
        ] {
            assert!(t.contains(want), "{want} missing in\n{t}");
        }
        assert!(
            !t.contains("ftvm_throttle"),
            "no throttle, no throttle metrics"
        );
    }

    #[test]
    fn the_endpoint_answers_over_http() {
        let o = Observer::new(SideRole::Backup);
        let server = MetricsServer::start("127.0.0.1:0".parse().expect("addr"), o).expect("start");
        let addr = server.local_addr().to_string();
        let text = http_get(&addr, "/metrics", Duration::from_secs(2)).expect("metrics");
        assert!(text.contains("role=\"backup\""), "{text}");
        let json = http_get(&addr, "/status.json", Duration::from_secs(2)).expect("json");
        let s: Snapshot = serde_json::from_str(&json).expect("snapshot");
        assert_eq!(s.role, SideRole::Backup);
        assert!(matches!(
            http_get(&addr, "/nope", Duration::from_secs(2)),
            Err(MetricsError::Status { .. })
        ));
        assert!(matches!(
            parse_addr("nonsense"),
            Err(MetricsError::Address(_))
        ));
    }
}
