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
echo "== guest library unit tests (guests/ workspace, host target)"
(cd guests && cargo test --target x86_64-unknown-linux-gnu --target-dir ../target/guests --workspace)
echo "== workspace tests"
# The process-level FT tests (vmm-core/tests/ft_process.rs) run the real `ftvm` binary from the
# same target directory; `cargo test` alone does not build a binary that has no tests of its own.
# shellcheck disable=SC2086
cargo build --release -p ftvm $FTVM_FEATURES
# shellcheck disable=SC2086
cargo test --workspace --release $FTVM_FEATURES -- --show-output
