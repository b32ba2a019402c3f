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

    /// Zero-copy send, for transports with a send buffer of their own: calls `fill` with
    /// exactly `len` bytes of that buffer, into which the caller writes one whole frame, and
    /// queues it (`Ok(Some(true))`). `Ok(Some(false))`: no room now (`fill` was not called,
    /// nothing queued; retry later). `Ok(None)` (the default): not offered — build the frame
    /// elsewhere and call [`Self::send`].
    ///
    /// # Errors
    /// [`TransportError`] when the link is broken or `len` exceeds [`Self::max_frame`].
    fn send_in_place(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Option<bool>, TransportError> {
        let _ = (len, fill);
        Ok(None)
    }

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
    fn send_in_place(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Option<bool>, TransportError> {
        (**self).send_in_place(len, fill)
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

/// A link that is closed: every operation fails with [`TransportError::Closed`]. Handing it to
/// a reconnect closes the previous link (dropped) and leaves the poller stopped; a sender
/// created without a link ([`crate::LogSender::detached`]) starts on it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Closed;

impl Transport for Closed {
    fn name(&self) -> &'static str {
        "closed"
    }
    fn max_frame(&self) -> usize {
        1 << 16
    }
    fn send(&mut self, _frame: &[u8]) -> Result<bool, TransportError> {
        Err(TransportError::Closed { mid_frame: false })
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
    fn poll_recv(&mut self, _on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        Err(TransportError::Closed { mid_frame: false })
    }
}
