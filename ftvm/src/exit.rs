//! The exit statuses of `ftvm run`, `ftvm primary` and `ftvm backup`: one table, in one place.
//!
//! The guest's power-off code and ftvm's own statuses never share a number: the guest owns
//! `0..=GUEST_MAX`, ftvm owns `200..`. A guest code above [`GUEST_MAX`] is reported as
//! [`GUEST_MAX`] (the exact code is printed in the summary and written to the report).
//!
//! | status | meaning |
//! |---|---|
//! | 0 | the guest powered off with code 0 |
//! | 1–199 | the guest powered off with this code (codes above 199 are reported as 199) |
//! | 200 | [`ERROR`]: ftvm failed (setup, I/O, a bad configuration); one line on stderr |
//! | 201 | [`USAGE`]: bad command-line flags |
//! | 202 | [`DIVERGED`]: the backup's replay diverged from the primary's execution |
//! | 203 | [`FENCED`]: this side lost the arbiter or saw a newer generation; it released nothing after that |
//! | 204 | [`PEER_FAILED`]: the peer failed and this side has no arbiter to take over with, so the pair stopped |
//! | 205 | [`PAIRING_REFUSED`]: the two sides' settings disagree; they never paired |
//! | 206 | [`CANNOT_TAKE_OVER`]: the backup can no longer take over (its own disk copy failed) and stopped |
//! | 207 | [`STOPPED`]: a planned stop before the guest powered off: SIGTERM/SIGINT, or the peer's planned stop (a backup whose primary stopped; a primary with `--on-backup-stop stop`) — no failover happened |
//! | 208 | [`NONDETERMINISTIC`]: `ftvm run --check-determinism` found that two runs with the same inputs ended differently |
//!
//! `ftvm demo` is not a guest runner: it exits 0 when every acknowledged write was read back,
//! 1 when one was lost and [`ERROR`] when it could not run. Every command prints a failure as
//! one line (`ftvm: error: …`, causes joined with `: `, no backtrace whatever `RUST_BACKTRACE`
//! says) and exits with [`ERROR`]; clap's usage errors exit with [`USAGE`].

/// The table above as `ftvm --help` shows it (and the README).
pub const HELP: &str = "\
Exit status (ftvm run, primary, backup):
  0-199  the guest powered off with this code (codes above 199 are reported as 199)
  200    ftvm failed (setup, I/O, bad configuration): one line on stderr
  201    bad command-line flags (usage)
  202    the backup's replay diverged from the primary's execution
  203    fenced: this side lost the arbiter or saw a newer generation
  204    the peer failed and there is no arbiter to take over with
  205    pairing refused: the two sides' settings disagree
  206    the backup can no longer take over (its own disk copy failed)
  207    a planned stop: SIGTERM/SIGINT, or the peer stopped as planned (no failover)
  208    ftvm run --check-determinism: two runs with the same inputs ended differently
ftvm demo exits 0 when every acknowledged write was read back, 1 when one was lost, 200 on an
error; ftvm stat exits 200 when an endpoint does not answer (--once).";

/// The highest guest power-off code passed through as the process's exit status.
pub const GUEST_MAX: u64 = 199;
/// ftvm itself failed (setup, I/O, a bad configuration).
pub const ERROR: i32 = 200;
/// Bad command-line flags.
pub const USAGE: i32 = 201;
/// The backup's replay diverged from the primary's execution.
pub const DIVERGED: i32 = 202;
/// This side lost the arbiter or was fenced by a newer generation (it released no output after
/// that).
pub const FENCED: i32 = 203;
/// The peer failed and this side has no arbiter to take over with: the pair stopped.
pub const PEER_FAILED: i32 = 204;
/// Pairing was refused: the two sides' settings disagree.
pub const PAIRING_REFUSED: i32 = 205;
/// The backup can no longer take over (its own disk copy failed) and stopped.
pub const CANNOT_TAKE_OVER: i32 = 206;
/// A planned stop before the guest powered off: SIGTERM/SIGINT, or the peer's planned stop
/// (`ftvm_ft::stop`); no failover happened.
pub const STOPPED: i32 = 207;
/// `ftvm run --check-determinism`: two runs of the guest with the same inputs ended
/// differently (the guest uses an input this VMM cannot log; it cannot be replicated).
pub const NONDETERMINISTIC: i32 = 208;

/// The exit status for a guest that powered off with `code`.
pub fn guest_status(code: u64) -> i32 {
    // GUEST_MAX < i32::MAX: the conversion cannot fail.
    i32::try_from(code.min(GUEST_MAX)).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_codes_never_reach_ftvm_statuses() {
        assert_eq!(guest_status(0), 0);
        assert_eq!(guest_status(4), 4);
        assert_eq!(guest_status(199), 199);
        assert_eq!(guest_status(200), 199);
        assert_eq!(guest_status(u64::MAX), 199);
        for own in [
            ERROR,
            USAGE,
            DIVERGED,
            FENCED,
            PEER_FAILED,
            PAIRING_REFUSED,
            CANNOT_TAKE_OVER,
            STOPPED,
            NONDETERMINISTIC,
        ] {
            assert!(own > GUEST_MAX as i32 && own < 256, "{own}");
            assert!(
                HELP.contains(&format!("\n  {own} ")),
                "{own} not in the help table"
            );
        }
    }
}
