//! Fault tolerance: failure detection, split-brain protection and generation fencing.
//!
//! - [`node`]: who a node is ([`NodeId`]) and which role it plays ([`Role`]).
//! - [`arbiter`]: the atomic test-and-set a node must win before it goes live, on a shared
//!   directory ([`FileArbiter`]) or etcd (`EtcdArbiter`, feature `etcd`).
//! - [`detector`]: presumes the peer failed after a timeout without heartbeats or traffic
//!   ([`Detector`]).
//! - [`fence`]: generation fencing of frames, heartbeats and outputs ([`Fence`]).
//!
//! The rule these pieces implement together: **never go live blind**. A node goes live (the
//! backup taking over, or the primary continuing alone) only after (1) the failure detector has
//! declared its peer failed and (2) it has won the next generation on the arbiter. While the
//! arbiter is unreachable it waits; it does not guess.

pub mod arbiter;
pub mod detector;
pub mod fence;
pub mod node;

pub use arbiter::{acquire_with_retry, Acquire, Arbiter, ArbiterError, FileArbiter, RetryPolicy};
pub use detector::{
    Detector, DetectorConfig, DetectorError, DetectorEvent, DetectorStats, PeerState, TrafficNote,
};
pub use fence::{Fence, FenceError};
pub use node::{NodeId, NodeIdError, Role};
