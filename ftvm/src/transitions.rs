//! One clear stderr line per failover transition, whatever the log level: a `tracing` layer
//! that watches the go-live events of `ftvm_vmm_core::ft::golive` and prints, e.g.
//!
//! ```text
//! backup: LIVE as generation 2 after 412 ms (detect 305, wait 0, arbiter 3, drain 2, attach 1) at exit 81234
//! primary: ALONE as generation 2 after 330 ms (detect 301, arbiter 4, drain 25) at exit 9120
//! primary: the backup LEFT the pair (cannot take over: …): going on alone
//! ```
//! (the same timings go into the `--report` JSON from the run's report).

use std::fmt::Write as _;
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, Layer};

/// Target of the go-live events.
const GOLIVE_TARGET: &str = "ftvm_vmm_core::ft::golive";

/// The layer (add it to the subscriber next to the formatting layer).
#[derive(Debug, Default)]
pub struct Transitions;

/// The layer with its own filter: the go-live events at info and above, at any `--log` level.
pub fn layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    Transitions.with_filter(Targets::new().with_target(GOLIVE_TARGET, Level::INFO))
}

#[derive(Default)]
struct Fields {
    message: String,
    timings: Option<String>,
    detection_time: Option<String>,
    generation: Option<String>,
    winner: Option<String>,
    goodbye: Option<String>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        match field.name() {
            "message" => self.message = text,
            "timings" => self.timings = Some(text),
            "detection_time" => self.detection_time = Some(text),
            "generation" => self.generation = Some(text),
            "winner" => self.winner = Some(text),
            "goodbye" => self.goodbye = Some(text),
            _ => {}
        }
    }
}

impl<S: Subscriber> Layer<S> for Transitions {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if !event.metadata().target().starts_with(GOLIVE_TARGET) {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        if let Some(line) = render(&f) {
            eprintln!("{line}");
        }
    }
}

fn render(f: &Fields) -> Option<String> {
    let m = f.message.as_str();
    if m == "the backup is live" || m == "primary goes on alone" {
        let t = parse_timings(f.timings.as_deref()?);
        let ms = |k: &str| t.get(k).map_or(0.0, |d| d.as_secs_f64() * 1e3);
        let generation = t.generation.unwrap_or(0);
        let mut line = if m == "the backup is live" {
            format!(
                "backup: LIVE as generation {generation} after {:.0} ms (detect {:.0}, wait {:.0}, arbiter {:.0}, drain {:.0}, attach {:.0})",
                ms("total"),
                ms("detection"),
                ms("wait_detector"),
                ms("arbiter"),
                ms("drain"),
                ms("attach")
            )
        } else {
            format!(
                "primary: ALONE as generation {generation} after {:.0} ms (detect {:.0}, arbiter {:.0}, drain {:.0})",
                ms("total"),
                ms("detection"),
                ms("arbiter"),
                ms("drain")
            )
        };
        if let Some(x) = t.at_exit {
            let _ = write!(line, " at exit {x}");
        }
        return Some(line);
    }
    if m.starts_with("the backup left the pair") {
        return Some(format!(
            "primary: the backup LEFT the pair ({}): going on alone",
            f.goodbye.as_deref().unwrap_or("?")
        ));
    }
    if m == "peer presumed failed" {
        return Some(format!(
            "ft: peer presumed failed (silent for {})",
            f.detection_time.as_deref().unwrap_or("?")
        ));
    }
    if m.contains("lost the take-over") {
        return Some(format!(
            "ft: LOST the take-over: generation {} is held by {}",
            f.generation.as_deref().unwrap_or("?"),
            f.winner.as_deref().unwrap_or("?")
        ));
    }
    None
}

/// The fields of a `GoLiveTimings` as printed by `{:?}`.
#[derive(Debug, Default)]
struct Timings {
    generation: Option<u64>,
    at_exit: Option<u64>,
    durations: Vec<(String, Duration)>,
}

impl Timings {
    fn get(&self, k: &str) -> Option<Duration> {
        self.durations.iter().find(|(n, _)| n == k).map(|(_, d)| *d)
    }
}

/// Parses `GoLiveTimings { generation: 2, at_exit: 5, detection: 305.1ms, drain: 0ns, ... }`.
fn parse_timings(s: &str) -> Timings {
    let inner = s
        .split_once('{')
        .map_or(s, |(_, r)| r)
        .trim_end()
        .trim_end_matches('}');
    let mut t = Timings::default();
    for part in inner.split(',') {
        let Some((k, v)) = part.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "generation" => t.generation = v.parse().ok(),
            "at_exit" => t.at_exit = v.parse().ok(),
            _ => {
                if let Some(d) = parse_duration(v) {
                    t.durations.push((k.to_string(), d));
                }
            }
        }
    }
    t
}

/// Parses a `Duration`'s `{:?}` text (`305.123ms`, `1.5s`, `12µs`, `800ns`).
fn parse_duration(v: &str) -> Option<Duration> {
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1e3,
        "µs" | "us" => n / 1e6,
        "ns" => n / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_debug_text_parses() {
        let d = Duration::from_micros(305_123);
        let text = format!(
            "GoLiveTimings {{ generation: 2, at_exit: 81234, detection: {d:?}, drain: {:?}, wait_detector: {:?}, arbiter: {:?}, attach: {:?}, total: {:?} }}",
            Duration::from_nanos(800),
            Duration::ZERO,
            Duration::from_micros(2600),
            Duration::from_micros(12),
            Duration::from_millis(1412)
        );
        let f = Fields {
            message: "the backup is live".into(),
            timings: Some(text),
            ..Fields::default()
        };
        assert_eq!(
            render(&f).unwrap(),
            "backup: LIVE as generation 2 after 1412 ms (detect 305, wait 0, arbiter 3, drain 0, attach 0) at exit 81234"
        );
    }

    #[test]
    fn a_backup_that_left_renders_one_line_with_its_reason() {
        let f = Fields {
            message: "the backup left the pair: taking over the next generation".into(),
            goodbye: Some("cannot take over: the backup's own disk copy failed".into()),
            ..Fields::default()
        };
        assert_eq!(
            render(&f).unwrap(),
            "primary: the backup LEFT the pair (cannot take over: the backup's own disk copy \
             failed): going on alone"
        );
    }

    #[test]
    fn durations_parse() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(7),
            Duration::from_micros(3),
            Duration::from_millis(250),
            Duration::from_secs(3),
        ] {
            let back = parse_duration(&format!("{d:?}")).unwrap();
            assert!((back.as_secs_f64() - d.as_secs_f64()).abs() < 1e-9, "{d:?}");
        }
        assert_eq!(parse_duration("fast"), None);
    }
}
