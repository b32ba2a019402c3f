//! `kv`: a Redis-protocol key-value server (see the library docs for the commands), over TCP
//! (smoltcp on virtio-net), persisting every write to an append-only log on virtio-blk.
//!
//! Command line: `ip=10.0.2.15/24 gw=10.0.2.1 port=6379 conns=256 backlog=64 rxbuf=8192
//! txbuf=16384 maxmemory=<size> sync trace` (`conns`: most sockets, connected or listening;
//! `backlog`: sockets kept listening, the largest burst of new connections accepted at once;
//! `maxmemory`: heap bytes in use above which writes are refused with `-OOM`, default from the
//! heap size, see `ftvm_guest_kv::memory`; `sync`: also send a FLUSH to the disk after each
//! group commit; `trace`: print every connection state change). Prints `kv: listening on
//! <ip>:<port>, <n> keys recovered` when ready. `SHUTDOWN` powers off with 0.
//!
//! No allocation whose size a client chooses can fail fatally here: requests are buffered
//! with [`Memory::try_grow`] up to [`resp::MAX_QUERY`] per connection (a request that does not
//! fit closes its connection with an error), a connection reads no more requests while its
//! unsent replies exceed [`MAX_PENDING_OUT`], sockets are created only while the heap has room,
//! and big idle buffers are freed.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use ftvm_guest_kv::log::{BlockDevice, DiskError, Log, MemDisk, SECTOR};
use ftvm_guest_kv::memory::{self, HeapUsage, Memory};
use ftvm_guest_kv::resp::{self, Parsed};
use ftvm_guest_kv::store::{Outcome, Store};
use ftvm_guest_net::{NetConfig, Stack};
use ftvm_guest_rt::cmdline::{parse_size, BadValue};
use ftvm_guest_rt::hal::{mmio_transport, IdentityHal, VIRTIO_BLK_BASE};
use ftvm_guest_rt::{entry, heap, println, BootInfo};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::{DeviceType, Transport};

entry!(main);

/// Exit code for a bad command line.
const EXIT_USAGE: u64 = 2;
/// Exit code when the network cannot be brought up.
const EXIT_NET: u64 = 3;
/// Exit code when the disk fails.
const EXIT_DISK: u64 = 4;
/// Exit code when the log holds more than the heap can (the store could not be recovered).
const EXIT_MEMORY: u64 = 5;
/// Stop reading (and executing) a connection's requests while this many reply bytes wait to be
/// sent.
const MAX_PENDING_OUT: usize = 256 << 10;
/// A connection's buffer capacity kept once it is empty; a larger one is freed.
const KEEP_CAPACITY: usize = 64 << 10;
/// The reply before closing a connection whose request cannot be buffered.
const ERR_REQUEST_MEMORY: &str = "ERR request does not fit in the free memory";
/// The reply before closing a connection whose request exceeds [`resp::MAX_QUERY`].
const ERR_REQUEST_TOO_BIG: &str = "ERR Protocol error: request exceeds the query buffer limit";
/// A memory-only log when there is no disk: big enough for a test run, then `disk full`. At most
/// 16 MiB and a quarter of the free heap.
const MEM_DISK_MAX: usize = 16 << 20;

/// The virtio-blk device as a [`BlockDevice`].
struct VirtioDisk {
    blk: VirtIOBlk<IdentityHal, MmioTransport<'static>>,
    sync: bool,
}

impl BlockDevice for VirtioDisk {
    fn sectors(&self) -> u64 {
        self.blk.capacity()
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.blk
            .read_blocks(sector as usize, buf)
            .map_err(|_| DiskError { sector })
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.blk
            .write_blocks(sector as usize, buf)
            .map_err(|_| DiskError { sector })?;
        if self.sync {
            self.blk.flush().map_err(|_| DiskError { sector })?;
        }
        Ok(())
    }
}

enum Disk {
    Virtio(alloc::boxed::Box<VirtioDisk>),
    Memory(MemDisk),
}

impl BlockDevice for Disk {
    fn sectors(&self) -> u64 {
        match self {
            Self::Virtio(d) => d.sectors(),
            Self::Memory(d) => d.sectors(),
        }
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        match self {
            Self::Virtio(d) => d.read(sector, buf),
            Self::Memory(d) => d.read(sector, buf),
        }
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), DiskError> {
        match self {
            Self::Virtio(d) => d.write(sector, buf),
            Self::Memory(d) => d.write(sector, buf),
        }
    }
}

fn open_disk(sync: bool) -> Disk {
    // SAFETY: VIRTIO_BLK_BASE is the block device window; this is its only transport.
    match unsafe { mmio_transport(VIRTIO_BLK_BASE) } {
        Ok(t) if t.device_type() == DeviceType::Block => match VirtIOBlk::new(t) {
            Ok(blk) => return Disk::Virtio(alloc::boxed::Box::new(VirtioDisk { blk, sync })),
            Err(e) => println!("kv: virtio-blk driver: {e}; keeping the log in memory"),
        },
        Ok(t) => println!(
            "kv: device at {VIRTIO_BLK_BASE:#x} is {:?}",
            t.device_type()
        ),
        Err(e) => println!("kv: no disk ({e}); keeping the log in memory"),
    }
    let (_, free) = heap::usage();
    Disk::Memory(MemDisk::new(MEM_DISK_MAX.min(free / 4) / SECTOR))
}

/// The runtime's heap, as the store's memory gauge.
fn heap_usage() -> HeapUsage {
    let (used, free) = heap::usage();
    HeapUsage {
        used,
        peak: heap::peak(),
        size: used + free,
    }
}

/// One connection slot: a listening/connected socket and its buffers.
struct Conn {
    handle: SocketHandle,
    input: Vec<u8>,
    output: Vec<u8>,
    sent: usize,
    closing: bool,
    /// The socket state last seen (for `trace`).
    state: tcp::State,
}

struct Config {
    port: u16,
    conns: usize,
    backlog: usize,
    rxbuf: usize,
    txbuf: usize,
    /// `maxmemory=`, if given.
    maxmemory: Option<usize>,
    sync: bool,
    trace: bool,
}

fn parse_config(boot: &BootInfo) -> Result<Config, BadValue<'static>> {
    let cmd = boot.cmdline;
    let conns = cmd.parse_or("conns", 256usize)?.clamp(1, 4096);
    let maxmemory = match cmd.get("maxmemory") {
        None => None,
        Some(value) => Some(
            parse_size(value)
                .and_then(|v| usize::try_from(v).ok())
                .ok_or(BadValue {
                    key: "maxmemory",
                    value,
                })?,
        ),
    };
    Ok(Config {
        port: cmd.parse_or("port", 6379u16)?,
        conns,
        backlog: cmd.parse_or("backlog", 64usize)?.clamp(1, conns),
        rxbuf: cmd.parse_or("rxbuf", 8192usize)?.clamp(1024, 1 << 20),
        txbuf: cmd.parse_or("txbuf", 16384usize)?.clamp(1024, 1 << 20),
        maxmemory,
        sync: cmd.flag("sync"),
        trace: cmd.flag("trace"),
    })
}

/// The `maxmemory` of this boot: `maxmemory=` (lowered to what the heap allows), or the default
/// for this heap and these sockets.
fn choose_maxmemory(cfg: &Config, heap: usize) -> usize {
    let socket_bytes = cfg.rxbuf + cfg.txbuf;
    let default = memory::default_maxmemory(heap, cfg.conns - cfg.backlog, socket_bytes);
    match cfg.maxmemory {
        None => default,
        Some(m) if m > memory::max_maxmemory(heap) => {
            let max = memory::max_maxmemory(heap);
            println!("kv: maxmemory={m} exceeds what a heap of {heap} bytes allows; using {max}");
            max
        }
        Some(m) => m,
    }
}

/// Adds up to `n` listening sockets, without exceeding `cfg.conns` sockets in all, while the
/// heap has room for their buffers. Returns false when it ran out of room.
fn add_listeners(
    stack: &mut Stack,
    conns: &mut Vec<Conn>,
    cfg: &Config,
    mem: &Memory,
    n: usize,
) -> bool {
    for _ in 0..n.min(cfg.conns.saturating_sub(conns.len())) {
        let handle = mem
            .has_room(cfg.rxbuf + cfg.txbuf)
            .then(|| stack.try_add_listener(cfg.port, cfg.rxbuf, cfg.txbuf))
            .flatten();
        let Some(handle) = handle else {
            return false;
        };
        stack
            .sockets
            .get_mut::<tcp::Socket>(handle)
            .set_nagle_enabled(false);
        conns.push(Conn {
            handle,
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            closing: false,
            state: tcp::State::Listen,
        });
    }
    true
}

/// Frees a buffer's memory once it is empty and bigger than [`KEEP_CAPACITY`].
fn trim(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > KEEP_CAPACITY {
        *buf = Vec::new();
    }
}

fn main(boot: &BootInfo) -> u64 {
    let cfg = match parse_config(boot) {
        Ok(c) => c,
        Err(e) => {
            println!("kv: {e}");
            return EXIT_USAGE;
        }
    };
    let net_cfg = match NetConfig::from_cmdline(&boot.cmdline) {
        Ok(c) => c,
        Err(e) => {
            println!("kv: {e}");
            return EXIT_USAGE;
        }
    };

    let heap_size = heap_usage().size;
    let mem = Memory::new(choose_maxmemory(&cfg, heap_size), Some(heap_usage));
    let mut store = Store::with_memory(mem);
    let mut unrecovered = 0u64;
    let opened = Log::open(open_disk(cfg.sync), |r| {
        if unrecovered > 0 || store.apply(r).is_err() {
            unrecovered += 1;
        }
    });
    let (mut log, found) = match opened {
        Ok(x) => x,
        Err(e) => {
            println!("kv: recovering the log: {e}");
            return EXIT_DISK;
        }
    };
    if unrecovered > 0 {
        println!(
            "kv: the log holds more than the heap can: {unrecovered} of {} records not \
             recovered ({} keys, heap {heap_size} bytes); give the guest more memory",
            found.records,
            store.len()
        );
        return EXIT_MEMORY;
    }
    println!(
        "kv: memory: heap {heap_size} bytes, maxmemory {} bytes, {} in use",
        mem.maxmemory(),
        heap_usage().used
    );
    println!(
        "kv: log: {} records, {} bytes of {} (generation {}{})",
        found.records,
        found.log_bytes,
        log.capacity(),
        found.generation,
        if found.fresh { ", new log" } else { "" }
    );

    let mut stack = match Stack::new(&net_cfg) {
        Ok(s) => s,
        Err(e) => {
            println!("kv: {e}");
            return EXIT_NET;
        }
    };
    let mut conns: Vec<Conn> = Vec::new();
    let mut sockets_full = !add_listeners(&mut stack, &mut conns, &cfg, &mem, cfg.backlog);
    println!(
        "kv: listening on {}:{}, {} keys recovered",
        net_cfg.ip.address(),
        cfg.port,
        store.len()
    );

    loop {
        let now = Stack::now();
        stack.poll(now);
        let mut progress = false;
        let mut shutdown = false;

        // Read and execute requests; replies wait in `output` until the log is written.
        // Keep `backlog` sockets listening: a burst of SYNs finds no listener otherwise (RST),
        // e.g. when redis-benchmark connects its next 50 clients while the last 50 still close.
        let listening = conns
            .iter()
            .filter(|c| c.state == tcp::State::Listen)
            .count();
        if listening < cfg.backlog {
            let added = add_listeners(&mut stack, &mut conns, &cfg, &mem, cfg.backlog - listening);
            if !added && !sockets_full {
                println!(
                    "kv: no memory for more sockets ({} now); new connections wait",
                    conns.len()
                );
            }
            sockets_full = !added;
        }
        for (i, conn) in conns.iter_mut().enumerate() {
            let socket = stack.sockets.get_mut::<tcp::Socket>(conn.handle);
            if socket.state() != conn.state {
                if cfg.trace {
                    println!("kv: conn {i}: {} -> {}", conn.state, socket.state());
                }
                conn.state = socket.state();
            }
            if !socket.is_open() {
                conn.input = Vec::new();
                conn.output = Vec::new();
                conn.sent = 0;
                conn.closing = false;
                // Fails only in TIME-WAIT (then retried next round): the socket is not open.
                if socket.listen(cfg.port).is_ok() {
                    conn.state = tcp::State::Listen;
                }
                continue;
            }
            if conn.closing || conn.output.len() - conn.sent > MAX_PENDING_OUT {
                continue;
            }
            let room = resp::MAX_QUERY - conn.input.len();
            let mut no_memory = false;
            if socket.can_recv() && room > 0 {
                let got = socket.recv(|data| {
                    let n = data.len().min(room);
                    if mem.try_grow(&mut conn.input, n).is_err() {
                        no_memory = true;
                        return (0, 0);
                    }
                    conn.input.extend_from_slice(&data[..n]);
                    (n, n)
                });
                progress |= matches!(got, Ok(n) if n > 0);
            }
            let mut used = 0;
            while !conn.closing && conn.output.len() - conn.sent <= MAX_PENDING_OUT {
                match resp::parse(&conn.input[used..]) {
                    Parsed::Incomplete => {
                        if no_memory || conn.input.len() - used >= resp::MAX_QUERY {
                            let why = if no_memory {
                                ERR_REQUEST_MEMORY
                            } else {
                                ERR_REQUEST_TOO_BIG
                            };
                            resp::error(&mut conn.output, why);
                            conn.closing = true;
                            progress = true;
                        }
                        break;
                    }
                    Parsed::Error(msg) => {
                        resp::error(&mut conn.output, msg);
                        conn.closing = true;
                    }
                    Parsed::Request(args, n) => {
                        used += n;
                        match store.execute(&args, &mut log, &mut conn.output) {
                            Outcome::Continue => {}
                            Outcome::Close => conn.closing = true,
                            Outcome::Shutdown => {
                                shutdown = true;
                                conn.closing = true;
                            }
                        }
                    }
                }
            }
            conn.input.drain(..used);
            if conn.closing {
                conn.input = Vec::new();
            }
            trim(&mut conn.input);
        }

        // Group commit: one disk write for every mutation of this round, before any reply.
        if let Err(e) = log.flush() {
            println!("kv: writing the log: {e}");
            return EXIT_DISK;
        }
        if shutdown {
            // Reset every connection so that clients (redis-cli waits for the connection to
            // end after SHUTDOWN) do not hang on a VM that is gone.
            for conn in &conns {
                stack.sockets.get_mut::<tcp::Socket>(conn.handle).abort();
            }
            stack.poll(now);
            println!(
                "kv: shutdown: {} keys, {} commands, {} writes refused (OOM), log {} bytes",
                store.len(),
                store.commands(),
                store.oom_rejections(),
                log.len()
            );
            // Powering off: freeing the store's allocations one by one would cost more than
            // the whole run (linked_list_allocator walks its list of holes for every free, so
            // dropping a store of 500 k keys took minutes), and nothing reads the heap again.
            core::mem::forget((store, log, conns, stack));
            return 0;
        }

        // Send replies.
        for conn in &mut conns {
            let socket = stack.sockets.get_mut::<tcp::Socket>(conn.handle);
            if conn.sent < conn.output.len() && socket.can_send() {
                if let Ok(n) = socket.send_slice(&conn.output[conn.sent..]) {
                    conn.sent += n;
                    progress |= n > 0;
                }
                if conn.sent == conn.output.len() {
                    conn.output.clear();
                    conn.sent = 0;
                    trim(&mut conn.output);
                }
            }
            let drained = conn.output.is_empty();
            if (conn.closing && drained) || socket.state() == tcp::State::CloseWait {
                socket.close();
            }
        }

        stack.poll(now);
        if !progress {
            stack.wait(now);
        }
    }
}

// Keep the sector size in one place: the log format is defined in the library.
const _: () = assert!(SECTOR == virtio_drivers::device::blk::SECTOR_SIZE);
