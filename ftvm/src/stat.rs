//! `ftvm stat ADDR...`: a live view of one or both sides of a pair, refreshed every second
//! (like AeronStat or `top`), from the sides' metrics endpoints (`--metrics ADDR`,
//! [`crate::metrics`]); `--once --json` prints one JSON array for scripts:
//!
//! ```text
//! [{"addr": "10.0.0.1:9100", "status": { ...Snapshot... }},
//!  {"addr": "10.0.0.2:9100", "error": "10.0.0.2:9100: request failed: Connection refused"}]
//! ```
//!
//! [`one_line`] is the same state in one line (`ftvm demo` prints it every second).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use ftvm_ft::observe::{SideRole, Snapshot};

use crate::metrics::{http_get, parse_addr};

/// Flags of `ftvm stat`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatArgs {
    /// Metrics endpoints (the `--metrics HOST:PORT` of `ftvm primary`, `backup` or `run`).
    #[arg(required = true, value_name = "HOST:PORT")]
    pub addrs: Vec<String>,
    /// Print once and exit (status 200 if an endpoint did not answer).
    #[arg(long)]
    pub once: bool,
    /// JSON instead of the table: one array of `{addr, status}` or `{addr, error}` per refresh.
    #[arg(long)]
    pub json: bool,
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..))]
    pub interval_ms: u64,
}

/// One endpoint's answer.
type Reading = (String, Result<Snapshot, String>);

fn read_all(addrs: &[String]) -> Vec<Reading> {
    addrs
        .iter()
        .map(|a| {
            let r = http_get(a, "/status.json", Duration::from_secs(1))
                .map_err(|e| ftvm_vmm_core::error_chain(&e))
                .and_then(|body| {
                    serde_json::from_str::<Snapshot>(&body).map_err(|e| e.to_string())
                });
            (a.clone(), r)
        })
        .collect()
}

fn json_of(readings: &[Reading]) -> serde_json::Value {
    serde_json::Value::Array(
        readings
            .iter()
            .map(|(addr, r)| match r {
                Ok(s) => serde_json::json!({"addr": addr, "status": s}),
                Err(e) => serde_json::json!({"addr": addr, "error": e}),
            })
            .collect(),
    )
}

/// `ftvm stat`.
///
/// # Errors
/// A malformed address; with `--once`, an endpoint that did not answer (after printing).
pub fn stat(args: &StatArgs) -> anyhow::Result<()> {
    for a in &args.addrs {
        parse_addr(a).map_err(|e| anyhow::anyhow!("ftvm stat: {e}"))?;
    }
    let tty = std::io::stdout().is_terminal() && !args.json;
    let mut prev: HashMap<String, (Instant, Snapshot)> = HashMap::new();
    loop {
        let readings = read_all(&args.addrs);
        let mut out = String::new();
        if args.json {
            out = json_of(&readings).to_string();
            out.push('\n');
        } else {
            if tty && !args.once {
                out.push_str("\x1b[H\x1b[2J");
            }
            out.push_str(&table(&readings, &prev, args.interval_ms));
        }
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(out.as_bytes())?;
        stdout.flush()?;
        drop(stdout);
        let now = Instant::now();
        for (a, r) in &readings {
            if let Ok(s) = r {
                prev.insert(a.clone(), (now, s.clone()));
            }
        }
        if args.once {
            let failed: Vec<&str> = readings
                .iter()
                .filter(|(_, r)| r.is_err())
                .map(|(a, _)| a.as_str())
                .collect();
            if !failed.is_empty() {
                anyhow::bail!("ftvm stat: no answer from {}", failed.join(", "));
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(args.interval_ms));
    }
}

fn per_s(
    now: &Snapshot,
    prev: Option<&(Instant, Snapshot)>,
    f: impl Fn(&Snapshot) -> Option<u64>,
) -> Option<f64> {
    let (t, p) = prev?;
    let dt = t.elapsed().as_secs_f64();
    (dt > 0.0).then_some(())?;
    Some(f(now)?.saturating_sub(f(p)?) as f64 / dt)
}

/// A cell of the table from an endpoint's snapshot and its previous one.
type Cell<'a> = &'a dyn Fn(&Snapshot, Option<&(Instant, Snapshot)>) -> String;

/// The table: one row per quantity, one column per endpoint.
fn table(
    readings: &[Reading],
    prev: &HashMap<String, (Instant, Snapshot)>,
    every_ms: u64,
) -> String {
    let mut rows: Vec<(&str, Vec<String>)> = Vec::new();
    let mut row = |name: &'static str, cells: Vec<String>| rows.push((name, cells));
    let col = |f: Cell<'_>| -> Vec<String> {
        readings
            .iter()
            .map(|(a, r)| match r {
                Ok(s) => f(s, prev.get(a)),
                Err(_) => "-".into(),
            })
            .collect()
    };
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    row(
        "endpoint",
        readings.iter().map(|(a, _)| a.clone()).collect(),
    );
    row(
        "state",
        readings
            .iter()
            .map(|(_, r)| match r {
                Ok(s) => format!("{} (generation {})", s.role.name(), s.generation),
                Err(e) => format!("DOWN: {e}"),
            })
            .collect(),
    );
    row("uptime", col(&|s, _| format!("{:.0} s", s.uptime_s)));
    row(
        "exits",
        col(&|s, p| {
            opt(s.exits.as_ref().map(|e| {
                let rate = per_s(s, p, |x| x.exits.as_ref().map(|e| e.total));
                format!("{} ({:.0}/s)", e.total, rate.unwrap_or(0.0))
            }))
        }),
    );
    row(
        "log written/sent",
        col(&|s, _| {
            opt(s.log.as_ref().map(|l| {
                format!(
                    "{} / {}",
                    l.written,
                    l.sent.map_or("-".into(), |x| x.to_string())
                )
            }))
        }),
    );
    row(
        "log acked/executed",
        col(&|s, _| {
            opt(s
                .log
                .as_ref()
                .map(|l| format!("{} / {}", l.acked, l.executed)))
        }),
    );
    row(
        "lag",
        col(&|s, _| {
            opt(s.lag.as_ref().map(|l| {
                let mut t = format!("{} entries", l.entries);
                if let Some(b) = l.bytes {
                    t.push_str(&format!(", {b} B"));
                }
                if let Some(ms) = l.ms {
                    t.push_str(&format!(", {ms:.1} ms"));
                }
                t
            }))
        }),
    );
    row(
        "throttle",
        col(&|s, _| {
            opt(s.throttle.as_ref().map(|t| {
                format!(
                    "share {:.2} ({}), target {:.0} ms",
                    t.share, t.actuator, t.target_ms
                )
            }))
        }),
    );
    row(
        "outputs held/released",
        col(&|s, _| {
            opt(s
                .outputs
                .as_ref()
                .map(|o| format!("{} / {}", o.held, o.released)))
        }),
    );
    row(
        "output delay p50/p99",
        col(&|s, _| {
            opt(s
                .outputs
                .as_ref()
                .map(|o| format!("{} / {} µs", o.delay.p50_us, o.delay.p99_us)))
        }),
    );
    row(
        "channel tx/rx",
        col(&|s, p| {
            opt(s.channel.as_ref().map(|c| {
                let tx = per_s(s, p, |x| x.channel.as_ref().map(|c| c.counters.bytes_sent));
                let rx = per_s(s, p, |x| {
                    x.channel.as_ref().map(|c| c.counters.bytes_received)
                });
                format!(
                    "{} {:.1} / {:.1} MB/s",
                    c.transport,
                    tx.unwrap_or(0.0) / 1e6,
                    rx.unwrap_or(0.0) / 1e6
                )
            }))
        }),
    );
    row(
        "retransmits, rtt",
        col(&|s, _| {
            opt(s.channel.as_ref().map(|c| {
                let k = &c.counters;
                format!(
                    "{} timeouts, {} frames, rtt {:.0} µs",
                    k.retransmit_timeouts,
                    k.retransmitted_frames,
                    k.srtt_ns as f64 / 1e3
                )
            }))
        }),
    );
    row(
        "heartbeats tx/rx",
        col(&|s, _| {
            opt(s.detector.as_ref().map(|d| {
                format!(
                    "{} / {} ({} missed), {} peer failures",
                    d.heartbeats_sent,
                    d.heartbeats_received,
                    d.heartbeats_missed,
                    d.failures_declared
                )
            }))
        }),
    );
    row(
        "stalls, disk waits",
        col(&|s, _| {
            let stalls = s.log.as_ref().map_or(0, |l| l.stalls);
            let disk = s
                .disk_waits
                .as_ref()
                .map_or("-".into(), |w| w.waited.to_string());
            format!("{stalls}, {disk}")
        }),
    );
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0) + 2;
    let colw: Vec<usize> = (0..readings.len())
        .map(|i| {
            rows.iter()
                .map(|(_, c)| c.get(i).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
                + 3
        })
        .collect();
    let mut out = format!("ftvm stat (every {every_ms} ms; Ctrl-C to quit)\n");
    for (name, cells) in &rows {
        out.push_str(&format!("{name:<width$}"));
        for (i, c) in cells.iter().enumerate() {
            let w = colw[i];
            out.push_str(&format!("{c:<w$}"));
        }
        out.push('\n');
    }
    out
}

/// One line of a pair's state, for `ftvm demo`'s live status.
pub fn one_line(primary: Option<&Snapshot>, backup: Option<&Snapshot>) -> String {
    let mut parts = Vec::new();
    if let Some(p) = primary {
        if let Some(l) = &p.lag {
            parts.push(match l.ms {
                Some(ms) => format!("lag {} entries {ms:.1} ms", l.entries),
                None => format!("lag {} entries", l.entries),
            });
        }
        if let Some(t) = &p.throttle {
            parts.push(format!("share {:.2} ({})", t.share, t.actuator));
        }
        if let Some(o) = &p.outputs {
            parts.push(format!(
                "outputs held {} delay p99 {:.2} ms",
                o.held,
                o.delay.p99_us as f64 / 1e3
            ));
        }
        if let Some(c) = &p.channel {
            parts.push(format!(
                "{} rtt {:.0} µs, {} retransmits",
                c.transport,
                c.counters.srtt_ns as f64 / 1e3,
                c.counters.retransmitted_frames
            ));
        }
    }
    if let Some(b) = backup {
        parts.push(match b.role {
            SideRole::Backup => format!(
                "backup executed {}",
                b.log.as_ref().map_or(0, |l| l.executed)
            ),
            role => format!(
                "{} in generation {}, {} exits",
                role.name(),
                b.generation,
                b.exits.as_ref().map_or(0, |e| e.total)
            ),
        });
    }
    parts.join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_ft::observe::LagSnapshot;

    #[test]
    fn the_table_and_the_line_show_both_sides() {
        let p = Snapshot {
            role: SideRole::Primary,
            lag: Some(LagSnapshot {
                entries: 12,
                bytes: None,
                ms: Some(3.5),
            }),
            ..Default::default()
        };
        let readings = vec![
            ("a:1".to_string(), Ok(p.clone())),
            ("b:2".to_string(), Err("refused".to_string())),
        ];
        let t = table(&readings, &HashMap::new(), 1000);
        assert!(t.contains("primary (generation 0)"), "{t}");
        assert!(t.contains("DOWN: refused"), "{t}");
        assert!(t.contains("12 entries, 3.5 ms"), "{t}");
        let j = json_of(&readings);
        assert_eq!(j[1]["error"], "refused");
        assert_eq!(j[0]["status"]["role"], "primary");
        assert!(one_line(Some(&p), None).contains("lag 12 entries 3.5 ms"));
    }
}
