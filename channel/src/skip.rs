//! The one way a test says that it did not run: a line `SKIP <test>: <reason>` on stderr.
//!
//! A test that needs something this host may lack (`/dev/kvm`, root, the cgroup `cpu`
//! controller, a program such as `etcd` or `redis-cli`) checks for it first and, when it is
//! missing, prints exactly one such line and returns. `scripts/test.sh` counts these lines
//! (`cargo test -- --show-output` prints what passing tests wrote), lists them at the end as
//! `SKIP lines: N`, and fails when a host that has what the tests need skipped anything that
//! `FTVM_ALLOWED_SKIPS` does not name (`TESTING.md`, "SKIP accounting"). So every skip goes
//! through [`skip`] (or [`if_missing`], or the `require_*!` macros built on them), which keeps
//! the format the script parses in one place:
//!
//! ```text
//! SKIP <test>: <reason>
//!      │       └ one line: why the test cannot run here (the first thing found missing)
//!      └ the test's name as cargo prints it, no spaces
//! ```
//!
//! ```
//! use ftvm_channel::skip;
//!
//! fn kvm_missing() -> Option<String> {
//!     None // a real check opens /dev/kvm
//! }
//!
//! # fn my_test() {
//! if skip::if_missing("my_test", kvm_missing()) {
//!     return;
//! }
//! // ... the test proper ...
//! # }
//! assert_eq!(
//!     skip::line("my_test", "needs root\n(uid 1000)"),
//!     "SKIP my_test: needs root (uid 1000)"
//! );
//! ```

use std::fmt::Display;

/// How every SKIP line starts (what `scripts/test.sh` counts).
pub const PREFIX: &str = "SKIP ";

/// The SKIP line for `test` and `reason`: `SKIP <test>: <reason>`, on one line (line breaks
/// in either become spaces, spaces in the test name become `_`, an empty reason becomes
/// `no reason given`).
pub fn line(test: &str, reason: impl Display) -> String {
    let test: String = test
        .trim()
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect();
    let test = if test.is_empty() {
        "unnamed_test".to_string()
    } else {
        test
    };
    let reason = reason.to_string();
    let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    let reason = if reason.is_empty() {
        "no reason given".to_string()
    } else {
        reason
    };
    format!("{PREFIX}{test}: {reason}")
}

/// Prints the SKIP line of `test` (see [`line()`]) on stderr. The caller then returns without
/// asserting anything.
pub fn skip(test: &str, reason: impl Display) {
    eprintln!("{}", line(test, reason));
}

/// Prints the SKIP line of `test` and returns `true` when `missing` names what is missing;
/// returns `false` (and prints nothing) when it is `None`.
pub fn if_missing(test: &str, missing: Option<impl Display>) -> bool {
    match missing {
        Some(reason) => {
            skip(test, reason);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_one_reason() {
        assert_eq!(line("a::b", "no kvm"), "SKIP a::b: no kvm");
        assert_eq!(
            line(" my test ", "first\nsecond  line"),
            "SKIP my_test: first second line"
        );
        assert_eq!(line("", ""), "SKIP unnamed_test: no reason given");
        // (The `Some` case prints a real SKIP line, which scripts/test.sh would count.)
        assert!(!if_missing("t", None::<String>));
    }
}
