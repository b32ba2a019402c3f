//! How a side saw its logging link end ([`LinkDown`]): carried by the roles ([`crate::role`])
//! and the errors ([`crate::error`]), below both.

use std::sync::Arc;

use ftvm_channel::TransportError;

/// How a side saw its logging link (and so its peer's log) end. Shown inside the sentence of
/// [`PairError::LogEnded`](crate::error::PairError::LogEnded), [`PairError::PeerFailed`](crate::error::PairError::PeerFailed) and [`LogWriteError::FullAndLinkDown`](crate::error::LogWriteError::FullAndLinkDown),
/// so the link's own error is part of its message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkDown {
    /// The link's poller stopped, and no error is left to say why.
    #[error("the logging link is down")]
    Down,
    /// The link failed.
    #[error("logging link: {0}")]
    Failed(Arc<TransportError>),
    /// The backup's log stopped before its End entry (the receiver ended or was severed).
    #[error("the primary's log stopped")]
    LogStopped,
}

impl LinkDown {
    /// The error a stopped link left (`None`: it left none, or another reader took it).
    pub fn from_error(e: Option<TransportError>) -> Self {
        e.map_or(LinkDown::Down, |e| LinkDown::Failed(Arc::new(e)))
    }
}
