//! TCP transport (std::net): length-delimited frames over a `TCP_NODELAY` stream.
//!
//! ```text
//!  ┌────────────┬──────────────── ─ ─       repeated; len ≤ max_frame, else the stream is
//!  │ len u32 LE │ frame (len bytes)          declared broken (it can no longer be delimited)
//!  └────────────┴──────────────── ─ ─
//! ```
//!
//! Two modes: [`TcpMode::Blocking`] ("tcp") sleeps in `poll(2)` when there is nothing to do,
//! the classic design (each wake-up costs ~60 µs on these machines); [`TcpMode::Spin`]
//! ("tcp-spin") never sleeps: the poller busy-polls a non-blocking socket.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::error::TransportError;
use crate::transport::Transport;

/// Largest frame carried (bytes).
pub const TCP_MAX_FRAME: usize = 64 << 10;
const LEN_PREFIX: usize = 4;
const WBUF_CAP: usize = 512 << 10;

/// How the TCP transport waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpMode {
    /// Sleep in the kernel when idle ("tcp").
    Blocking,
    /// Busy-poll a non-blocking socket ("tcp-spin").
    Spin,
}

/// A frame link over one TCP connection.
#[derive(Debug)]
pub struct TcpTransport {
    stream: TcpStream,
    mode: TcpMode,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    wpos: usize,
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io { op, source }
}

/// `poll(2)` on one fd; true when an event in `events` (or an error) is pending.
pub(crate) fn poll_fd(fd: i32, events: i16, timeout: Duration) -> Result<bool, TransportError> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(TransportError::Io {
            op: "poll",
            source: e,
        });
    }
    Ok(r > 0)
}

impl TcpTransport {
    /// Wraps a connected stream (sets `TCP_NODELAY` and non-blocking I/O).
    ///
    /// # Errors
    /// [`TransportError::Io`] if the socket options cannot be set.
    pub fn from_stream(stream: TcpStream, mode: TcpMode) -> Result<Self, TransportError> {
        stream.set_nodelay(true).map_err(io("set TCP_NODELAY"))?;
        stream.set_nonblocking(true).map_err(io("set O_NONBLOCK"))?;
        Ok(Self {
            stream,
            mode,
            rbuf: vec![0; 2 * (TCP_MAX_FRAME + LEN_PREFIX)],
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(WBUF_CAP),
            wpos: 0,
        })
    }

    /// Connects to `addr`, retrying until `timeout` (the peer may not listen yet).
    ///
    /// # Errors
    /// [`TransportError::Io`] when no connection could be made in time.
    pub fn connect(
        addr: SocketAddr,
        mode: TcpMode,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        let deadline = Instant::now() + timeout;
        loop {
            match TcpStream::connect(addr) {
                Ok(s) => return Self::from_stream(s, mode),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, %addr, "connect failed, retrying");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(TransportError::Io {
                        op: "connect",
                        source: e,
                    })
                }
            }
        }
    }

    /// Accepts one connection on `listener`.
    ///
    /// # Errors
    /// [`TransportError::Io`] if `accept` fails.
    pub fn accept(listener: &TcpListener, mode: TcpMode) -> Result<Self, TransportError> {
        let (s, _) = listener.accept().map_err(io("accept"))?;
        Self::from_stream(s, mode)
    }

    /// The underlying stream (tests use it to cut the connection).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    fn write_out(&mut self) -> Result<(), TransportError> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(TransportError::Closed { mid_frame: false }),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if self.mode == TcpMode::Spin {
                        break;
                    }
                    poll_fd(
                        self.stream.as_raw_fd(),
                        libc::POLLOUT,
                        Duration::from_millis(10),
                    )?;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(closed_or_io(e, false, "send")),
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        Ok(())
    }
}

fn closed_or_io(e: std::io::Error, mid_frame: bool, op: &'static str) -> TransportError {
    match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            TransportError::Closed { mid_frame }
        }
        _ => TransportError::Io { op, source: e },
    }
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        match self.mode {
            TcpMode::Blocking => "tcp",
            TcpMode::Spin => "tcp-spin",
        }
    }

    fn max_frame(&self) -> usize {
        TCP_MAX_FRAME
    }

    fn send(&mut self, frame: &[u8]) -> Result<bool, TransportError> {
        if frame.len() > TCP_MAX_FRAME {
            return Err(TransportError::FrameTooLarge {
                len: frame.len(),
                max: TCP_MAX_FRAME,
            });
        }
        if self.wbuf.len() + LEN_PREFIX + frame.len() > WBUF_CAP {
            self.write_out()?;
            if self.wbuf.len() + LEN_PREFIX + frame.len() > WBUF_CAP {
                return Ok(false);
            }
        }
        self.wbuf
            .extend_from_slice(&(frame.len() as u32).to_le_bytes());
        self.wbuf.extend_from_slice(frame);
        Ok(true)
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        self.write_out()
    }

    fn poll_recv(&mut self, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        let mut n = 0;
        loop {
            // Hand out every complete frame buffered.
            while self.rend - self.rstart >= LEN_PREFIX {
                let b = &self.rbuf[self.rstart..self.rend];
                let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
                if len > TCP_MAX_FRAME {
                    return Err(TransportError::FrameTooLarge {
                        len,
                        max: TCP_MAX_FRAME,
                    });
                }
                if b.len() < LEN_PREFIX + len {
                    break;
                }
                on_frame(&b[LEN_PREFIX..LEN_PREFIX + len]);
                self.rstart += LEN_PREFIX + len;
                n += 1;
            }
            if self.rstart == self.rend {
                self.rstart = 0;
                self.rend = 0;
            } else if self.rstart > self.rbuf.len() / 2 {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            if n > 0 {
                // Hand back what we have; the next call reads on.
                return Ok(n);
            }
            match self.stream.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => {
                    return Err(TransportError::Closed {
                        mid_frame: self.rend > self.rstart,
                    });
                }
                Ok(k) => self.rend += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(closed_or_io(e, self.rend > self.rstart, "recv")),
            }
        }
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        if self.mode == TcpMode::Blocking {
            poll_fd(self.stream.as_raw_fd(), libc::POLLIN, timeout)?;
        }
        Ok(())
    }
}
