//! io_uring transport over a TCP socket (`io-uring` 0.7), busy-polled.
//!
//! - **Sends** go through two *registered* buffers (double buffering): the reliability layer
//!   writes each frame straight into the buffer being filled
//!   ([`Transport::send_in_place`]; length-prefixed exactly as in [`crate::tcp`]), and `flush`
//!   submits one `WRITE_FIXED` for the whole batch — one `io_uring_enter` per batch, not per
//!   frame — while the other buffer fills. Short writes are resubmitted for the remainder.
//! - **Receives** use one multishot `RECV` armed once over a group of 16 × 256 KiB provided
//!   buffers: the kernel posts a completion per chunk of stream with no system call from us.
//!   Frames are handed out in place, straight from those buffers; only a frame cut by a chunk
//!   boundary is copied (into a carry buffer, to be completed by the next chunk). Each buffer
//!   is handed back (`PROVIDE_BUFFERS`, riding along with the next submission) once its frames
//!   are handed out. Where multishot receive is not supported the transport falls back to
//!   one-shot receives (logged).
//! - **Large sends leave the poller's core** ([`UringConfig::async_send_min`], 32 KiB by
//!   default): a batch that big is flagged `IOSQE_ASYNC`, so a kernel io-wq worker does the
//!   copy into the socket and the TCP processing (on loopback, the receiving side's too) while
//!   the poller builds the next batch in the other buffer. Small sends (acks, a lone record)
//!   still run inline in `io_uring_enter`, where they are cheapest and quickest.
//! - **SQPOLL** is an option ([`UringConfig::sqpoll`]): with it, submissions need no system
//!   call at all, but the kernel thread costs a core; on a 2-core machine with busy pollers on
//!   both sides it starves everything (measured here: four busy loops on two cores), so the default is off. When the kernel
//!   refuses SQPOLL the transport logs it and falls back.
//!
//! Completions are reaped by polling the completion queue in user space; the thread that
//! polls is the only one that touches the ring. After [`UringConfig::spin_before_block`] with
//! nothing to do, an idle poller sleeps in `io_uring_enter` until the next completion (one
//! system call for "wait for anything": data, ack or send completion).

use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::error::TransportError;
use crate::tcp::TCP_MAX_FRAME;
use crate::transport::Transport;

const LEN_PREFIX: usize = 4;
const SEND_BUF: usize = 512 << 10;
const RECV_BUF: usize = 256 << 10;
const RECV_BUFS: u16 = 16;
const GROUP: u16 = 7;

const UD_SEND: u64 = 1;
const UD_RECV: u64 = 2;
const UD_PROVIDE: u64 = 3;
const UD_CANCEL: u64 = 4;
/// How long dropping the transport waits for a cancelled send to complete.
const DROP_WAIT: Duration = Duration::from_millis(200);

/// io_uring options.
#[derive(Debug, Clone, Copy)]
pub struct UringConfig {
    /// Submission-queue polling by a kernel thread (idle timeout in ms); `None` = off.
    pub sqpoll: Option<u32>,
    /// Use multishot receive when the kernel supports it.
    pub multishot: bool,
    /// Ring entries.
    pub entries: u32,
    /// `IORING_SETUP_COOP_TASKRUN | TASKRUN_FLAG` (without SQPOLL): the kernel does not
    /// interrupt the polling thread to post completions (an IPI, costly under a hypervisor);
    /// it raises a flag, and the poller enters the kernel only when that flag is up.
    pub coop_taskrun: bool,
    /// Spin this long with nothing to do, then sleep in `io_uring_enter` until a completion
    /// arrives (`None`: always spin). Keeps round trips on the spinning path while traffic
    /// flows, and gives the core back when the peer is slow (or the machine oversubscribed).
    pub spin_before_block: Option<Duration>,
    /// Sends of at least this many bytes are handed to the kernel's io-wq worker threads
    /// (`IOSQE_ASYNC`): the copy into the socket and the TCP/loopback processing then run on
    /// a worker instead of the polling thread, which goes on building the next batch. `None`:
    /// every send runs inline in `io_uring_enter` (on the poller's core).
    pub async_send_min: Option<usize>,
    /// Cores the io-wq workers may run on (`IORING_REGISTER_IOWQ_AFF`); `None`: the poller's
    /// affinity at ring creation. Only meaningful with [`Self::async_send_min`].
    pub worker_cpu: Option<usize>,
}

impl Default for UringConfig {
    fn default() -> Self {
        Self {
            sqpoll: None,
            multishot: true,
            entries: 256,
            coop_taskrun: true,
            spin_before_block: Some(Duration::from_micros(50)),
            async_send_min: Some(32 << 10),
            worker_cpu: None,
        }
    }
}

/// A frame link over one TCP connection driven through io_uring.
pub struct UringTransport {
    // Declared first: dropped (ring torn down) before the buffers it references.
    ring: IoUring,
    stream: TcpStream,
    fd: RawFd,
    sbufs: [Box<[u8]>; 2],
    /// Buffer being filled and its fill level.
    cur: usize,
    fill: usize,
    /// Send in flight: (buffer, offset done, end).
    inflight: Option<(usize, usize, usize)>,
    pool: Box<[u8]>,
    multishot: bool,
    recv_armed: bool,
    /// Received chunks not yet handed out: (buffer id, bytes), in stream order.
    ready: std::collections::VecDeque<(u16, usize)>,
    /// The start of a frame that continues in the next chunk (at most one frame).
    carry: Vec<u8>,
    closed: Option<TransportError>,
    cqes: Vec<cqueue::Entry>,
    to_submit: bool,
    /// Buffers handed back in queued but not yet submitted entries.
    lazy_provides: usize,
    spin_before_block: Option<Duration>,
    async_send_min: usize,
    /// Since when nothing happened (for spin-then-block).
    idle_since: Option<Instant>,
}

impl std::fmt::Debug for UringTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringTransport")
            .field("fd", &self.fd)
            .field("multishot", &self.multishot)
            .finish()
    }
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io { op, source }
}

impl UringTransport {
    /// Takes over a connected TCP stream (sets `TCP_NODELAY`, blocking mode for io_uring).
    ///
    /// # Errors
    /// [`TransportError::Io`] when the ring cannot be created or the buffers registered.
    pub fn from_stream(stream: TcpStream, cfg: UringConfig) -> Result<Self, TransportError> {
        stream.set_nodelay(true).map_err(io("set TCP_NODELAY"))?;
        stream
            .set_nonblocking(false)
            .map_err(io("clear O_NONBLOCK"))?;
        let ring = match cfg.sqpoll {
            Some(idle) => match IoUring::builder().setup_sqpoll(idle).build(cfg.entries) {
                Ok(r) => {
                    tracing::info!(idle_ms = idle, "io_uring with SQPOLL");
                    r
                }
                Err(e) => {
                    tracing::info!(error = %e, "io_uring SQPOLL not permitted; falling back to plain submissions");
                    IoUring::new(cfg.entries).map_err(io("io_uring_setup"))?
                }
            },
            None if cfg.coop_taskrun => {
                match IoUring::builder()
                    .setup_coop_taskrun()
                    .setup_taskrun_flag()
                    .build(cfg.entries)
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::info!(error = %e, "io_uring COOP_TASKRUN unsupported; plain ring");
                        IoUring::new(cfg.entries).map_err(io("io_uring_setup"))?
                    }
                }
            }
            None => IoUring::new(cfg.entries).map_err(io("io_uring_setup"))?,
        };
        let sbufs = [
            vec![0u8; SEND_BUF].into_boxed_slice(),
            vec![0u8; SEND_BUF].into_boxed_slice(),
        ];
        let iov: Vec<libc::iovec> = sbufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: the two buffers are owned by the transport, never moved (boxed slices) and
        // outlive the ring, which is dropped first (field order).
        unsafe { ring.submitter().register_buffers(&iov) }
            .map_err(io("io_uring register buffers"))?;
        if let Some(cpu) = cfg.worker_cpu {
            // SAFETY: an all-zero cpu_set_t is the valid empty set; CPU_SET writes inside it.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: `set` is a valid cpu_set_t; CPU_SET ignores out-of-range indices.
            unsafe { libc::CPU_SET(cpu, &mut set) };
            if let Err(e) = ring.submitter().register_iowq_aff(&set) {
                tracing::info!(error = %e, cpu, "io_uring worker affinity refused; workers float");
            }
        }
        let fd = stream.as_raw_fd();
        let mut t = Self {
            ring,
            stream,
            fd,
            sbufs,
            cur: 0,
            fill: 0,
            inflight: None,
            pool: vec![0u8; RECV_BUF * usize::from(RECV_BUFS)].into_boxed_slice(),
            multishot: cfg.multishot,
            recv_armed: false,
            ready: std::collections::VecDeque::with_capacity(usize::from(RECV_BUFS)),
            carry: Vec::with_capacity(LEN_PREFIX + TCP_MAX_FRAME),
            closed: None,
            cqes: Vec::with_capacity(64),
            to_submit: false,
            lazy_provides: 0,
            spin_before_block: cfg.spin_before_block,
            async_send_min: cfg.async_send_min.unwrap_or(usize::MAX),
            idle_since: None,
        };
        if t.multishot {
            let e = opcode::ProvideBuffers::new(
                t.pool.as_mut_ptr(),
                RECV_BUF as i32,
                RECV_BUFS,
                GROUP,
                0,
            )
            .build()
            .user_data(UD_PROVIDE);
            t.push(&e)?;
        }
        t.submit()?;
        Ok(t)
    }

    /// Queues an entry without asking for a system call: it rides along with the next submit.
    fn push_lazy(&mut self, e: &squeue::Entry) -> Result<(), TransportError> {
        let urgent = self.to_submit;
        self.push(e)?;
        self.to_submit = urgent;
        Ok(())
    }

    fn push(&mut self, e: &squeue::Entry) -> Result<(), TransportError> {
        // SAFETY: every buffer an entry references (send buffers, receive pool) is owned by
        // `self` and outlives the ring.
        if unsafe { self.ring.submission().push(e) }.is_err() {
            self.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(e) }.map_err(|_| TransportError::Setup {
                what: "io_uring submission queue full".into(),
            })?;
        }
        self.to_submit = true;
        Ok(())
    }

    fn submit(&mut self) -> Result<(), TransportError> {
        self.to_submit = false;
        self.lazy_provides = 0;
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    || e.raw_os_error() == Some(libc::EINTR) =>
            {
                Ok(())
            }
            Err(e) => Err(TransportError::Io {
                op: "io_uring_enter",
                source: e,
            }),
        }
    }

    /// True when part of a frame was received but not handed out.
    fn mid_frame(&self) -> bool {
        !self.carry.is_empty() || !self.ready.is_empty()
    }

    /// Gives buffer `bid` back to the kernel's group, lazily (with the next submit) unless the
    /// kernel is running short of buffers.
    fn provide(&mut self, bid: u16) -> Result<(), TransportError> {
        let off = usize::from(bid) * RECV_BUF;
        let e = opcode::ProvideBuffers::new(
            self.pool[off..].as_mut_ptr(),
            RECV_BUF as i32,
            1,
            GROUP,
            bid,
        )
        .build()
        .user_data(UD_PROVIDE);
        self.push_lazy(&e)?;
        self.lazy_provides += 1;
        if self.lazy_provides >= usize::from(RECV_BUFS) / 2 {
            self.to_submit = true;
        }
        Ok(())
    }

    fn arm_recv(&mut self) -> Result<(), TransportError> {
        let e = if self.multishot {
            opcode::RecvMulti::new(types::Fd(self.fd), GROUP).build()
        } else {
            opcode::Recv::new(types::Fd(self.fd), self.pool.as_mut_ptr(), RECV_BUF as u32).build()
        };
        self.push(&e.user_data(UD_RECV))?;
        self.recv_armed = true;
        Ok(())
    }

    fn start_send(&mut self, buf: usize, from: usize, to: usize) -> Result<(), TransportError> {
        let len = u32::try_from(to - from).unwrap_or(u32::MAX);
        let e = opcode::WriteFixed::new(
            types::Fd(self.fd),
            self.sbufs[buf][from..].as_ptr(),
            len,
            buf as u16,
        )
        .build()
        .user_data(UD_SEND);
        let e = if to - from >= self.async_send_min {
            e.flags(squeue::Flags::ASYNC)
        } else {
            e
        };
        self.push(&e)?;
        self.inflight = Some((buf, from, to));
        Ok(())
    }

    /// Submits the filled buffer when no send is in flight.
    fn kick_send(&mut self) -> Result<(), TransportError> {
        if self.inflight.is_none() && self.fill > 0 {
            let (b, n) = (self.cur, self.fill);
            self.cur ^= 1;
            self.fill = 0;
            self.start_send(b, 0, n)?;
        }
        Ok(())
    }

    /// Processes every completion.
    fn reap(&mut self) -> Result<(), TransportError> {
        self.cqes.clear();
        self.cqes.extend(self.ring.completion());
        for i in 0..self.cqes.len() {
            let c = self.cqes[i].clone();
            let res = c.result();
            match c.user_data() {
                UD_SEND => {
                    let Some((b, from, to)) = self.inflight.take() else {
                        continue;
                    };
                    if res < 0 {
                        let err = std::io::Error::from_raw_os_error(-res);
                        return Err(match -res {
                            libc::EPIPE | libc::ECONNRESET => {
                                TransportError::Closed { mid_frame: false }
                            }
                            _ => TransportError::Io {
                                op: "io_uring send",
                                source: err,
                            },
                        });
                    }
                    let done = from + res as usize;
                    if done < to {
                        self.start_send(b, done, to)?;
                    }
                }
                UD_RECV => {
                    if res == 0 {
                        self.closed = Some(TransportError::Closed {
                            mid_frame: self.mid_frame(),
                        });
                        self.recv_armed = false;
                        continue;
                    }
                    if res < 0 {
                        self.recv_armed = false;
                        match -res {
                            libc::ENOBUFS => {
                                // Out of buffers: hand back the queued ones now; re-armed on the
                                // next poll.
                                self.to_submit = true;
                                continue;
                            }
                            libc::EINVAL if self.multishot => {
                                tracing::info!(
                                    "multishot receive not supported; using one-shot receives"
                                );
                                self.multishot = false;
                                continue;
                            }
                            libc::ECONNRESET | libc::EPIPE => {
                                self.closed = Some(TransportError::Closed {
                                    mid_frame: self.mid_frame(),
                                });
                                continue;
                            }
                            e => {
                                return Err(TransportError::Io {
                                    op: "io_uring recv",
                                    source: std::io::Error::from_raw_os_error(e),
                                })
                            }
                        }
                    }
                    let n = res as usize;
                    if self.multishot {
                        let Some(bid) = cqueue::buffer_select(c.flags()) else {
                            return Err(TransportError::Setup {
                                what: "multishot recv without a buffer id".into(),
                            });
                        };
                        // Handed out (in place) by the next poll_recv, then given back.
                        self.ready.push_back((bid, n));
                        if !cqueue::more(c.flags()) {
                            self.recv_armed = false;
                        }
                    } else {
                        // One-shot receives land at the start of the pool; the next one is
                        // armed once this chunk is handed out.
                        self.ready.push_back((0, n));
                        self.recv_armed = false;
                    }
                }
                _ => {
                    if res < 0 {
                        return Err(TransportError::Io {
                            op: "io_uring provide buffers",
                            source: std::io::Error::from_raw_os_error(-res),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Hands every whole frame in `chunk` (the next piece of the stream) to `on_frame`, in place;
/// a frame begun in an earlier chunk is completed in `carry` first, and the start of a frame
/// that continues in the next chunk is kept there. Only frames cut by a chunk boundary are
/// copied. Returns how many frames were handed out.
fn split_frames(
    chunk: &[u8],
    carry: &mut Vec<u8>,
    on_frame: &mut dyn FnMut(&[u8]),
) -> Result<usize, TransportError> {
    let frame_len = |b: &[u8]| -> Result<usize, TransportError> {
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len > TCP_MAX_FRAME {
            return Err(TransportError::FrameTooLarge {
                len,
                max: TCP_MAX_FRAME,
            });
        }
        Ok(len)
    };
    let mut n = 0;
    let mut at = 0;
    while !carry.is_empty() && at < chunk.len() {
        let need = if carry.len() < LEN_PREFIX {
            LEN_PREFIX - carry.len()
        } else {
            LEN_PREFIX + frame_len(carry)? - carry.len()
        };
        let take = need.min(chunk.len() - at);
        carry.extend_from_slice(&chunk[at..at + take]);
        at += take;
        if carry.len() >= LEN_PREFIX && carry.len() == LEN_PREFIX + frame_len(carry)? {
            on_frame(&carry[LEN_PREFIX..]);
            carry.clear();
            n += 1;
        }
    }
    while chunk.len() - at >= LEN_PREFIX {
        let len = frame_len(&chunk[at..])?;
        if chunk.len() - at < LEN_PREFIX + len {
            break;
        }
        on_frame(&chunk[at + LEN_PREFIX..at + LEN_PREFIX + len]);
        at += LEN_PREFIX + len;
        n += 1;
    }
    carry.extend_from_slice(&chunk[at..]);
    Ok(n)
}

impl Drop for UringTransport {
    /// A send still in flight (blocked on a full socket, or on an io-wq worker) reads a send
    /// buffer that is about to be freed: cancel it and wait (bounded) for its completion, so
    /// that the kernel is done with the buffers before they go.
    fn drop(&mut self) {
        if self.inflight.is_none() {
            return;
        }
        let cancel = opcode::AsyncCancel::new(UD_SEND)
            .build()
            .user_data(UD_CANCEL);
        // SAFETY: the entry references no memory.
        if unsafe { self.ring.submission().push(&cancel) }.is_err() {
            let _ = self.ring.submit();
            // SAFETY: as above.
            let _ = unsafe { self.ring.submission().push(&cancel) };
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let deadline = Instant::now() + DROP_WAIT;
        while self.inflight.is_some() && Instant::now() < deadline {
            let ts = types::Timespec::from(Duration::from_millis(10));
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            for c in self.ring.completion() {
                if c.user_data() == UD_SEND {
                    self.inflight = None;
                }
            }
        }
        if self.inflight.is_some() {
            tracing::warn!("io_uring send still in flight when the transport was dropped");
        }
    }
}

impl Transport for UringTransport {
    fn name(&self) -> &'static str {
        "uring"
    }

    fn max_frame(&self) -> usize {
        TCP_MAX_FRAME
    }

    fn send(&mut self, frame: &[u8]) -> Result<bool, TransportError> {
        Ok(self
            .send_in_place(frame.len(), &mut |out| out.copy_from_slice(frame))?
            .unwrap_or(false))
    }

    fn send_in_place(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Option<bool>, TransportError> {
        if len > TCP_MAX_FRAME {
            return Err(TransportError::FrameTooLarge {
                len,
                max: TCP_MAX_FRAME,
            });
        }
        let need = LEN_PREFIX + len;
        if self.fill + need > SEND_BUF {
            self.reap()?;
            self.kick_send()?;
            if self.fill + need > SEND_BUF {
                if self.to_submit {
                    self.submit()?;
                }
                return Ok(Some(false));
            }
        }
        // The frame is written straight into the registered buffer the kernel sends from.
        let b = &mut self.sbufs[self.cur][self.fill..self.fill + need];
        b[..LEN_PREFIX].copy_from_slice(&(len as u32).to_le_bytes());
        fill(&mut b[LEN_PREFIX..]);
        self.fill += need;
        self.idle_since = None;
        Ok(Some(true))
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        self.kick_send()?;
        if self.to_submit {
            self.submit()?;
        }
        Ok(())
    }

    fn poll_recv(&mut self, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        // (A one-shot receive reuses the pool: armed only once its last chunk is handed out.)
        if !self.recv_armed && self.closed.is_none() && (self.multishot || self.ready.is_empty()) {
            self.arm_recv()?;
        }
        if self.to_submit {
            self.submit()?;
        }
        self.reap()?;
        if self.cqes.is_empty() && self.ring.submission().taskrun() {
            // Completions are waiting for us to run the kernel's task work.
            self.submit()?;
            self.reap()?;
        }
        self.kick_send()?;
        if self.to_submit {
            self.submit()?;
        }
        let mut n = 0;
        while let Some((bid, len)) = self.ready.pop_front() {
            let off = usize::from(bid) * RECV_BUF;
            let res = split_frames(&self.pool[off..off + len], &mut self.carry, on_frame);
            if self.multishot {
                self.provide(bid)?;
            }
            n += res?;
        }
        if n > 0 {
            self.idle_since = None;
        } else {
            if let Some(e) = self.closed.take() {
                let e = match e {
                    TransportError::Closed { .. } => TransportError::Closed {
                        mid_frame: self.mid_frame(),
                    },
                    e => e,
                };
                return Err(e);
            }
        }
        Ok(n)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        let Some(spin) = self.spin_before_block else {
            return Ok(());
        };
        let now = Instant::now();
        let since = *self.idle_since.get_or_insert(now);
        if now.duration_since(since) < spin || !self.ring.completion().is_empty() {
            return Ok(());
        }
        if !self.recv_armed && self.closed.is_none() {
            self.arm_recv()?;
        }
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        self.to_submit = false;
        self.lazy_provides = 0;
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(TransportError::Io {
                op: "io_uring_enter (wait)",
                source: e,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// However the stream is cut into chunks, every frame comes out once, whole, in order.
        #[test]
        fn frames_survive_any_chunking(
            lens in proptest::collection::vec(0usize..3000, 1..40),
            cuts in proptest::collection::vec(1usize..5000, 1..80),
        ) {
            let mut stream = Vec::new();
            let mut frames = Vec::new();
            for (i, len) in lens.iter().enumerate() {
                let f: Vec<u8> = (0..*len).map(|j| (i * 7 + j) as u8).collect();
                stream.extend_from_slice(&(f.len() as u32).to_le_bytes());
                stream.extend_from_slice(&f);
                frames.push(f);
            }
            let mut carry = Vec::new();
            let mut out: Vec<Vec<u8>> = Vec::new();
            let mut at = 0;
            let mut cut = cuts.iter().cycle();
            while at < stream.len() {
                let end = (at + cut.next().copied().unwrap_or(1)).min(stream.len());
                let n = split_frames(&stream[at..end], &mut carry, &mut |f| out.push(f.to_vec()))
                    .expect("valid stream");
                prop_assert!(n <= out.len());
                at = end;
            }
            prop_assert!(carry.is_empty());
            prop_assert_eq!(out, frames);
        }
    }

    #[test]
    fn oversized_length_prefix_is_an_error() {
        let mut carry = Vec::new();
        let bad = ((TCP_MAX_FRAME + 1) as u32).to_le_bytes();
        // Whole in one chunk, and cut inside the prefix.
        assert!(split_frames(&bad, &mut carry, &mut |_| {}).is_err());
        carry.clear();
        assert!(matches!(
            split_frames(&bad[..2], &mut carry, &mut |_| {}),
            Ok(0)
        ));
        assert!(split_frames(&bad[2..], &mut carry, &mut |_| {}).is_err());
    }
}
