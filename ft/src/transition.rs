//! Failover transitions as typed events: what a side's failover machinery decided, for the CLI,
//! reports and tests to consume without reading log text.
//!
//! [`FtConfig::on_transition`](super::golive::FtConfig::on_transition) is called with each
//! [`Transition`] on the thread that took the decision (keep it short: print, count, send on a
//! channel). The same decisions are logged through `tracing` as before; the `Display` form of a
//! transition is the one line `ftvm` prints for it on stderr whatever the log level, e.g.
//!
//! ```text
//! backup: LIVE as generation 2 after 412 ms (detect 305, wait 0, arbiter 3, drain 2, attach 1) at exit 81234
//! primary: ALONE as generation 2 after 330 ms (detect 301, arbiter 4, drain 25) at exit 9120
//! primary: the backup LEFT the pair (cannot take over: …): going on alone
//! ft: peer presumed failed (silent for 305.1ms)
//! ft: LOST the take-over: generation 3 is held by backup
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ftvm_channel::Goodbye;

use super::node::Role;

/// How long each step of going live (backup) or alone (primary) took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GoLiveTimings {
    /// The generation won.
    pub generation: u64,
    /// The exit index where the VM went live (backup) or the decision was taken (primary).
    pub at_exit: u64,
    /// Detection: the peer's last sign of life → presumed failed (the detector's measure; zero
    /// when the link went down first).
    pub detection: Duration,
    /// Backup: the log stopped → every received entry replayed. Primary: releasing the outputs
    /// held when it won.
    pub drain: Duration,
    /// Waiting for the detector after the replay ran out (backup; zero on the primary).
    pub wait_detector: Duration,
    /// The test-and-set (including waits while the arbiter was unreachable).
    pub arbiter: Duration,
    /// Attaching the service TAP and enabling outputs.
    pub attach: Duration,
    /// From the first sign of the failure (log stopped, or the last sign of life) to live.
    pub total: Duration,
}

/// One failover decision of a side.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transition {
    /// The failure detector presumes the peer failed (no heartbeat and no log traffic for the
    /// timeout). A decision follows: go live, go alone, or lose the take-over.
    PeerPresumedFailed {
        /// The peer's last sign of life → presumed failed.
        silent_for: Duration,
    },
    /// The backup left the pair (not a planned stop: it can no longer take over); the primary
    /// takes the next generation and goes alone.
    BackupLeft {
        /// The backup's GOODBYE.
        goodbye: Goodbye,
    },
    /// The backup won the next generation and is live: it runs the guest and releases its
    /// outputs.
    Live(GoLiveTimings),
    /// The primary won the next generation and runs alone (no backup): outputs no longer wait.
    Alone(GoLiveTimings),
    /// The other side holds a newer generation: this side releases nothing more and stops.
    LostTakeOver {
        /// The role this side had.
        role: Role,
        /// The generation the winner holds.
        generation: u64,
        /// The winner's node id.
        winner: String,
    },
}

/// Where a side reports its [`Transition`]s (called on the deciding thread).
pub type TransitionSink = Arc<dyn Fn(&Transition) + Send + Sync>;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transition::PeerPresumedFailed { silent_for } => {
                write!(f, "ft: peer presumed failed (silent for {silent_for:?})")
            }
            Transition::BackupLeft { goodbye } => {
                write!(
                    f,
                    "primary: the backup LEFT the pair ({goodbye}): going on alone"
                )
            }
            Transition::Live(t) => write!(
                f,
                "backup: LIVE as generation {} after {:.0} ms (detect {:.0}, wait {:.0}, arbiter {:.0}, drain {:.0}, attach {:.0}) at exit {}",
                t.generation,
                ms(t.total),
                ms(t.detection),
                ms(t.wait_detector),
                ms(t.arbiter),
                ms(t.drain),
                ms(t.attach),
                t.at_exit
            ),
            Transition::Alone(t) => write!(
                f,
                "primary: ALONE as generation {} after {:.0} ms (detect {:.0}, arbiter {:.0}, drain {:.0}) at exit {}",
                t.generation,
                ms(t.total),
                ms(t.detection),
                ms(t.arbiter),
                ms(t.drain),
                t.at_exit
            ),
            Transition::LostTakeOver {
                generation, winner, ..
            } => write!(
                f,
                "ft: LOST the take-over: generation {generation} is held by {winner}"
            ),
        }
    }
}

/// Calls `sink` with `t`, if there is a sink.
pub(crate) fn emit(sink: Option<&TransitionSink>, t: Transition) {
    if let Some(s) = sink {
        s(&t);
    }
}

#[cfg(test)]
mod tests {
    use ftvm_channel::GoodbyeReason;

    use super::*;

    #[test]
    fn a_live_backup_renders_its_timings_in_milliseconds() {
        let t = GoLiveTimings {
            generation: 2,
            at_exit: 81234,
            detection: Duration::from_micros(305_123),
            drain: Duration::from_nanos(800),
            wait_detector: Duration::ZERO,
            arbiter: Duration::from_micros(2600),
            attach: Duration::from_micros(12),
            total: Duration::from_millis(1412),
        };
        assert_eq!(
            Transition::Live(t).to_string(),
            "backup: LIVE as generation 2 after 1412 ms (detect 305, wait 0, arbiter 3, drain 0, attach 0) at exit 81234"
        );
        assert_eq!(
            Transition::Alone(t).to_string(),
            "primary: ALONE as generation 2 after 1412 ms (detect 305, arbiter 3, drain 0) at exit 81234"
        );
    }

    #[test]
    fn a_backup_that_left_renders_one_line_with_its_reason() {
        let goodbye = Goodbye {
            reason: GoodbyeReason::CannotTakeOver,
            text: "the backup's own disk copy failed".into(),
        };
        let line = Transition::BackupLeft {
            goodbye: goodbye.clone(),
        }
        .to_string();
        assert_eq!(
            line,
            format!("primary: the backup LEFT the pair ({goodbye}): going on alone")
        );
        assert!(line.contains("disk copy failed"), "{line}");
    }

    #[test]
    fn the_sink_gets_every_emitted_transition() {
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = Arc::clone(&got);
        let sink: TransitionSink = Arc::new(move |t| g.lock().unwrap().push(t.clone()));
        let lost = Transition::LostTakeOver {
            role: Role::Backup,
            generation: 3,
            winner: "primary".into(),
        };
        emit(Some(&sink), lost.clone());
        emit(None, lost.clone());
        assert_eq!(*got.lock().unwrap(), vec![lost.clone()]);
        assert_eq!(
            lost.to_string(),
            "ft: LOST the take-over: generation 3 is held by primary"
        );
    }
}
