//! `failover`: failover time (kill → backup live → first client reply) over repeated runs.

use crate::Opts;

/// Runs the benchmark.
pub fn run(_opts: &Opts) -> anyhow::Result<()> {
    anyhow::bail!("the failover benchmark is not built yet (issue #7)")
}
