#!/usr/bin/env bash
# The whole test suite (what the README and .ci/run call).
#   1. loom model tests of the log buffer's index protocol (own target dir: --cfg loom);
#   2. every workspace test in release mode (stress tests move tens of millions of records);
#      --show-output prints each passing test's SKIP lines and figures.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
source scripts/deps.sh
echo "== loom model tests (ringbuf)"
RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 \
  cargo test -p ftvm-ringbuf --release --target-dir target/loom --test loom -- --test-threads=2
echo "== workspace tests"
# shellcheck disable=SC2086
cargo test --workspace --release $FTVM_FEATURES -- --show-output
