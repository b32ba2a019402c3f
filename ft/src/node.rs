//! Node identities and replication roles shared by the arbiter and the failure detector.

use std::fmt;

/// Longest accepted [`NodeId`], in bytes.
pub const MAX_NODE_ID_LEN: usize = 128;

/// The name of one side of a fault-tolerant pair (a host, or a VMM instance on a host).
///
/// A node id is what the arbiter records as the winner of a generation, so it must be unique
/// among the nodes that share an arbiter: two processes with the same id are one node as far as
/// the arbiter is concerned (re-acquiring a generation already held under the same id returns
/// [`Acquire::Won`](crate::arbiter::Acquire::Won), which is what makes a retried claim
/// idempotent).
///
/// Valid ids are 1 to [`MAX_NODE_ID_LEN`] bytes of ASCII letters, digits, `-`, `_`, `.` and `:`,
/// so that they can be stored verbatim in a file, an etcd value or a log line.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

/// A string that is not a valid [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    /// The id is empty.
    #[error("node id is empty")]
    Empty,
    /// The id is longer than [`MAX_NODE_ID_LEN`] bytes.
    #[error("node id is {0} bytes long (at most {MAX_NODE_ID_LEN})")]
    TooLong(usize),
    /// The id contains a character outside `[A-Za-z0-9._:-]`.
    #[error("node id contains the invalid character {0:?}")]
    InvalidChar(char),
}

impl NodeId {
    /// Validates `id` and wraps it.
    ///
    /// # Errors
    /// [`NodeIdError`] when `id` is empty, too long, or contains a character outside
    /// `[A-Za-z0-9._:-]`.
    pub fn new(id: impl Into<String>) -> Result<Self, NodeIdError> {
        let id = id.into();
        if id.is_empty() {
            return Err(NodeIdError::Empty);
        }
        if id.len() > MAX_NODE_ID_LEN {
            return Err(NodeIdError::TooLong(id.len()));
        }
        if let Some(c) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
        {
            return Err(NodeIdError::InvalidChar(c));
        }
        Ok(Self(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

impl std::str::FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// The role a node plays in a fault-tolerant pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// Runs the VM, logs its nondeterministic inputs and releases its outputs.
    Primary = 1,
    /// Replays the primary's log and drops its outputs.
    Backup = 2,
    /// Runs the VM alone after its peer failed (no logging).
    Alone = 3,
}

impl Role {
    /// The role for a wire byte, if it names one.
    pub fn from_u8(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Primary),
            2 => Some(Self::Backup),
            3 => Some(Self::Alone),
            _ => None,
        }
    }

    /// Whether a node in this role produces outputs for the world (and therefore must hold the
    /// current generation).
    pub fn is_live(self) -> bool {
        matches!(self, Self::Primary | Self::Alone)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Primary => "primary",
            Self::Backup => "backup",
            Self::Alone => "alone",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_validation() {
        assert!(NodeId::new("host-a:4000").is_ok());
        assert_eq!(NodeId::new(""), Err(NodeIdError::Empty));
        assert_eq!(NodeId::new("a b"), Err(NodeIdError::InvalidChar(' ')));
        assert_eq!(NodeId::new("a/b"), Err(NodeIdError::InvalidChar('/')));
        assert_eq!(NodeId::new("a\n"), Err(NodeIdError::InvalidChar('\n')));
        assert_eq!(NodeId::new("x".repeat(129)), Err(NodeIdError::TooLong(129)));
        assert_eq!(
            "b.1".parse::<NodeId>().map(|n| n.to_string()),
            Ok("b.1".into())
        );
    }

    #[test]
    fn role_wire_round_trip() {
        for r in [Role::Primary, Role::Backup, Role::Alone] {
            assert_eq!(Role::from_u8(r as u8), Some(r));
        }
        assert_eq!(Role::from_u8(0), None);
        assert_eq!(Role::from_u8(4), None);
        assert!(Role::Primary.is_live() && Role::Alone.is_live() && !Role::Backup.is_live());
    }
}
