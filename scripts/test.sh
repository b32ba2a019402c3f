#!/usr/bin/env bash
# The test suite (what the README and .ci/run call), and its SKIP accounting (TESTING.md).
#
#   scripts/test.sh                          everything:
#     1. loom model tests of the log buffer's index protocol (own target dir: --cfg loom);
#     2. the guests' library unit tests (their own workspace, host target);
#     3. every workspace test in release mode (stress tests move tens of millions of records).
#   scripts/test.sh -p ftvm-ft --test golive [-- FILTER]   one group: only step 3, with
#                                            these `cargo test` arguments (after `--`: the test
#                                            binaries' own, e.g. a name filter).
#
# Test binaries run with --show-output, so what passing tests print is in the output, and with
# it every `SKIP <test>: <reason>` line (a test that could not run here says so and returns).
# The whole output is kept in $FTVM_TEST_LOG (default target/test-output.log); the run ends with
# `SKIP lines: N` and the list. Exit status: the tests' own when they failed; otherwise 1 when
# a host that has what the tests need (root, /dev/kvm, every package of scripts/deps.sh)
# printed a SKIP line that FTVM_ALLOWED_SKIPS does not allow. FTVM_ALLOWED_SKIPS names the
# allowed ones and why, `;`-separated `<test name or glob>=<why>` entries, e.g.
#   FTVM_ALLOWED_SKIPS='throttle_*=shared build host, the timing checks cannot be judged'
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
log=${FTVM_TEST_LOG:-target/test-output.log}
mkdir -p "$(dirname "$log")"

# The allowed SKIPs, checked before anything runs: each entry needs a reason.
trim() {
  local s=$1
  s="${s#"${s%%[![:space:]]*}"}"
  printf '%s' "${s%"${s##*[![:space:]]}"}"
}
allowed_pat=()
allowed_why=()
IFS=';' read -r -a allowed_entries <<<"${FTVM_ALLOWED_SKIPS:-}"
for entry in "${allowed_entries[@]}"; do
  [ -z "${entry//[[:space:]]/}" ] && continue
  pat=$(trim "${entry%%=*}")
  why=$(trim "${entry#*=}")
  if [[ "$entry" != *=* || -z "$pat" || -z "$why" ]]; then
    echo "FTVM_ALLOWED_SKIPS: entry '$entry' must be '<test name or glob>=<why it may skip>'" >&2
    exit 2
  fi
  allowed_pat+=("$pat")
  allowed_why+=("$why")
done

# Installs what is missing (as root) and sets FTVM_PKGS, FTVM_FEATURES; its output is part of
# the log (it prints a SKIP line when the AF_XDP feature cannot be built).
source scripts/deps.sh >"$log" 2>&1 || {
  cat "$log"
  exit 1
}
cat "$log"

run_tests() {
  local features=$FTVM_FEATURES
  if [ $# -gt 0 ]; then
    # One group: `ftvm/xdp` only exists for a selection that contains the ftvm package.
    features=${features/,ftvm\/xdp/}
  fi
  if [ $# -eq 0 ]; then
    echo "== loom model tests (ringbuf)"
    # With debug assertions: the ring's index invariants (head <= tail) are debug_assert!s on
    # its hot paths, checked here in every interleaving the models explore.
    RUSTFLAGS="--cfg loom -C debug-assertions=on" LOOM_MAX_PREEMPTIONS=3 \
      cargo test -p ftvm-ringbuf --release --target-dir target/loom --test loom -- --test-threads=2
    echo "== guest library unit tests (guests/ workspace, host target)"
    (cd guests && cargo test --target x86_64-unknown-linux-gnu --target-dir ../target/guests --workspace)
    set -- --workspace
  fi
  # Arguments after `--` go to the test binaries (a name filter, --exact, ...).
  local cargo_args=() test_args=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    cargo_args+=("$1")
    shift
  done
  [ $# -gt 0 ] && shift
  test_args=("$@")
  echo "== workspace tests: cargo test --release ${cargo_args[*]} -- --show-output ${test_args[*]}"
  # The tests that run the real `ftvm` binary live in ftvm/tests, for which cargo builds it;
  # building it first as well costs nothing when it is up to date and keeps a group run of
  # another package (which does not build it) from finding none.
  # shellcheck disable=SC2086
  cargo build --release -p ftvm $FTVM_FEATURES
  # shellcheck disable=SC2086
  # --no-fail-fast: every binary runs, so one run shows every failure and every SKIP.
  cargo test --release --no-fail-fast $features "${cargo_args[@]}" -- --show-output "${test_args[@]}"
}

set +e
run_tests "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
set -e

# What this host has of what the tests need.
lacks=()
[ "$(id -u)" = 0 ] || lacks+=("root")
[ -e /dev/kvm ] || lacks+=("/dev/kvm")
for p in "${FTVM_PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || lacks+=("package $p")
done

mapfile -t skips < <(grep -a '^SKIP ' "$log" || true)
unexpected=0
listing=()
for line in "${skips[@]}"; do
  name=${line#SKIP }
  name=${name%%: *}
  note="NOT ALLOWED"
  for i in "${!allowed_pat[@]}"; do
    # shellcheck disable=SC2053
    if [[ "$name" == ${allowed_pat[$i]} ]]; then
      note="allowed: ${allowed_why[$i]}"
      break
    fi
  done
  [ "$note" = "NOT ALLOWED" ] && unexpected=$((unexpected + 1))
  listing+=("  $line   [$note]")
done

echo "== SKIP accounting (full output: $log)"
if [ "$status" -ne 0 ]; then
  echo "TESTS FAILED (exit status $status)"
elif [ "${#lacks[@]}" -gt 0 ] && [ "${FTVM_REQUIRE_ALL:-0}" = 1 ]; then
  echo "FAILED: this host lacks ${lacks[*]}, and FTVM_REQUIRE_ALL=1 (set by .ci/run: CI hosts have"
  echo "root, /dev/kvm and the packages) requires every test to run: ${#skips[@]} SKIP line(s)"
  status=1
elif [ "${#lacks[@]}" -gt 0 ]; then
  echo "this host lacks ${lacks[*]}: SKIPs are expected here and do not fail the run"
  echo "(FTVM_REQUIRE_ALL=1, as .ci/run sets it, makes this a failure)"
elif [ "$unexpected" -gt 0 ]; then
  echo "FAILED: $unexpected SKIP line(s) on a host that has root, /dev/kvm and every package the"
  echo "tests need: a test that should have run did not (allow one with FTVM_ALLOWED_SKIPS='<test>=<why>')"
  status=1
elif [ "${#skips[@]}" -gt 0 ]; then
  echo "every SKIP is allowed by FTVM_ALLOWED_SKIPS"
fi
echo "SKIP lines: ${#skips[@]}"
for l in "${listing[@]}"; do
  echo "$l"
done
exit "$status"
