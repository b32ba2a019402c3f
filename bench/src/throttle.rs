//! `throttle`: lag and primary CPU share while the backup is slowed and then released.

use crate::Opts;

/// Runs the benchmark.
pub fn run(_opts: &Opts) -> anyhow::Result<()> {
    anyhow::bail!("the throttle benchmark is not built yet (issue #8)")
}
