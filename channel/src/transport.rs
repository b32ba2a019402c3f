//! The one small trait every transport implements.
//!
//! A transport moves opaque **frames** (whole protocol frames, built and checked by the
//! reliability layer) between two endpoints. It may lose, duplicate or reorder frames — the
//! reliability layer above copes — but it never delivers a partial frame as a whole one: stream
//! transports (TCP, io_uring over TCP) delimit frames themselves, datagram transports (AF_XDP,
//! shared-memory rings) carry one frame per datagram. Every method is non-blocking: pollers call
//! them in a busy loop.

use crate::error::TransportError;

/// A non-blocking, frame-oriented link to the peer.
pub trait Transport: Send {
    /// Short name for logs and benchmark tables (`"tcp"`, `"uring"`, `"shm"`, `"xdp"`).
    fn name(&self) -> &'static str;

    /// Largest frame this transport carries in one piece (bytes).
    fn max_frame(&self) -> usize;

    /// Queues one frame for sending. Returns `Ok(false)` when the transport has no room now
    /// (the caller retries later, nothing was queued).
    ///
    /// # Errors
    /// [`TransportError`] when the link is broken (peer gone, socket error).
    fn send(&mut self, frame: &[u8]) -> Result<bool, TransportError>;

    /// Pushes queued frames out (a kick / `sendto` / `io_uring_enter`), without blocking.
    ///
    /// # Errors
    /// [`TransportError`] when the link is broken.
    fn flush(&mut self) -> Result<(), TransportError>;

    /// Hands every frame that has arrived to `on_frame`, without blocking; returns how many.
    ///
    /// # Errors
    /// [`TransportError`] when the link is broken (a peer that disappeared mid-frame is an error,
    /// and the partial frame is never handed out).
    fn poll_recv(&mut self, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError>;

    /// Lets a transport that sleeps in the kernel (the blocking TCP mode) wait up to `timeout`
    /// for the peer; busy-polled transports return at once (the default).
    ///
    /// # Errors
    /// [`TransportError`] when the link is broken.
    fn wait(&mut self, timeout: std::time::Duration) -> Result<(), TransportError> {
        let _ = timeout;
        Ok(())
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn max_frame(&self) -> usize {
        (**self).max_frame()
    }
    fn send(&mut self, frame: &[u8]) -> Result<bool, TransportError> {
        (**self).send(frame)
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        (**self).flush()
    }
    fn poll_recv(&mut self, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        (**self).poll_recv(on_frame)
    }
    fn wait(&mut self, timeout: std::time::Duration) -> Result<(), TransportError> {
        (**self).wait(timeout)
    }
}
