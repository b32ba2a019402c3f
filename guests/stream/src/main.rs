//! `stream`: TCP sink and source for network throughput tests.
//!
//! - port `sink` (default 5001): discards and counts everything it receives;
//! - port `source` (default 5002): sends an endless byte pattern (`offset % 251` for the byte at
//!   `offset` of the connection, so a client can check it) until the client closes;
//! - port `control` (default 5000): line commands `stats` (reply with the totals) and `quit`
//!   (print the totals and power off with 0).
//!
//! - `dirty=<bytes>` (k/M/G suffix; default 0): a region of that size rewritten page by page
//!   without pause between polls of the network — a guest that dirties memory as fast as its
//!   vCPU runs (the re-protection tests and benchmark: pre-copy that does not converge by
//!   itself).
//!
//! Command line: `ip=10.0.2.15/24 gw=10.0.2.1 sink=5001 source=5002 control=5000 conns=4
//! bufsize=65536 dirty=0`. Prints `stream: sink on <ip>:5001, source on <ip>:5002, control on <ip>:5000`
//! when ready, a line per closed connection, and `stream: totals: ...` on `quit`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::fmt::Write;

use ftvm_guest_net::{NetConfig, Stack};
use ftvm_guest_rt::cmdline::parse_size;
use ftvm_guest_rt::{entry, println, sys, BootInfo};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

entry!(main);

/// Exit code for a bad command line.
const EXIT_USAGE: u64 = 2;
/// Exit code when the network cannot be brought up.
const EXIT_NET: u64 = 3;
/// The pattern period (prime, so it does not line up with segment sizes).
const PATTERN_PERIOD: u64 = 251;
/// Guest page size (the unit of dirty tracking).
const PAGE: usize = 4096;
/// Pages of the `dirty=` region written between two polls of the network.
const DIRTY_STEP: usize = 256;

/// The `dirty=` region: one byte per page is rewritten, `DIRTY_STEP` pages at a time, round
/// and round (each write dirties its page again after the VMM harvested it).
struct Dirtier {
    region: Vec<u8>,
    next: usize,
    pass: u8,
}

impl Dirtier {
    fn new(bytes: usize) -> Option<Self> {
        let mut region = Vec::new();
        region.try_reserve_exact(bytes).ok()?;
        region.resize(bytes, 0);
        Some(Dirtier {
            region,
            next: 0,
            pass: 0,
        })
    }

    /// Writes the next `DIRTY_STEP` pages.
    fn step(&mut self) {
        for _ in 0..DIRTY_STEP {
            if self.next >= self.region.len() {
                self.next = 0;
                self.pass = self.pass.wrapping_add(1);
            }
            // Through `black_box`, so that the optimiser keeps writes nobody reads.
            *core::hint::black_box(&mut self.region[self.next]) = self.pass;
            self.next += PAGE;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Sink,
    Source,
    Control,
}

struct Slot {
    role: Role,
    port: u16,
    handle: SocketHandle,
    /// Bytes moved on the current connection.
    bytes: u64,
    /// CLOCK_NS when the current connection was established (0 = not yet).
    since_ns: u64,
    line: Vec<u8>,
    reply: Vec<u8>,
}

#[derive(Default)]
struct Totals {
    sunk: u64,
    sourced: u64,
    connections: u64,
}

fn mbit_s(bytes: u64, ns: u64) -> u64 {
    (bytes as u128 * 8 * 1000 / u128::from(ns.max(1))) as u64
}

fn main(boot: &BootInfo) -> u64 {
    let cmd = boot.cmdline;
    let ports = (
        cmd.parse_or("sink", 5001u16),
        cmd.parse_or("source", 5002u16),
        cmd.parse_or("control", 5000u16),
        cmd.parse_or("conns", 4usize),
        cmd.parse_or("bufsize", 65536usize),
    );
    let (sink, source, control, conns, bufsize) = match ports {
        (Ok(a), Ok(b), Ok(c), Ok(n), Ok(s)) => (a, b, c, n.clamp(1, 64), s.clamp(4096, 1 << 20)),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), ..) | (.., Err(e), _) | (.., Err(e)) => {
            println!("stream: {e}");
            return EXIT_USAGE;
        }
    };
    let dirty = match cmd.get("dirty").map(parse_size) {
        None => 0,
        Some(Some(b)) => b as usize,
        Some(None) => {
            println!("stream: bad dirty= (want bytes, optional k/M/G suffix)");
            return EXIT_USAGE;
        }
    };
    let mut dirtier = match dirty {
        0 => None,
        b => match Dirtier::new(b) {
            Some(d) => Some(d),
            None => {
                println!("stream: dirty={b}: not enough memory");
                return EXIT_USAGE;
            }
        },
    };
    let net_cfg = match NetConfig::from_cmdline(&cmd) {
        Ok(c) => c,
        Err(e) => {
            println!("stream: {e}");
            return EXIT_USAGE;
        }
    };
    let mut stack = match Stack::new(&net_cfg) {
        Ok(s) => s,
        Err(e) => {
            println!("stream: {e}");
            return EXIT_NET;
        }
    };
    let mut slots = Vec::new();
    for (role, port, n, rx, tx) in [
        (Role::Sink, sink, conns, bufsize, 1024),
        (Role::Source, source, conns, 1024, bufsize),
        (Role::Control, control, 2, 1024, 4096),
    ] {
        for _ in 0..n {
            slots.push(Slot {
                role,
                port,
                handle: stack.add_listener(port, rx, tx),
                bytes: 0,
                since_ns: 0,
                line: Vec::new(),
                reply: Vec::new(),
            });
        }
    }
    let ip = net_cfg.ip.address();
    println!("stream: sink on {ip}:{sink}, source on {ip}:{source}, control on {ip}:{control}");

    let mut totals = Totals::default();
    let mut quit = false;
    loop {
        let now = Stack::now();
        stack.poll(now);
        let mut progress = false;
        for slot in &mut slots {
            let socket = stack.sockets.get_mut::<tcp::Socket>(slot.handle);
            if !socket.is_open() {
                if slot.since_ns != 0 {
                    let ns = sys::clock_ns().saturating_sub(slot.since_ns);
                    let what = match slot.role {
                        Role::Sink => "sink",
                        Role::Source => "source",
                        Role::Control => "control",
                    };
                    println!(
                        "stream: {what} connection closed: {} bytes in {} ms ({} Mbit/s)",
                        slot.bytes,
                        ns / 1_000_000,
                        mbit_s(slot.bytes, ns)
                    );
                }
                slot.bytes = 0;
                slot.since_ns = 0;
                slot.line.clear();
                slot.reply.clear();
                // Cannot fail: the port is non-zero and the socket is closed.
                let _ = socket.listen(slot.port);
                continue;
            }
            if slot.since_ns == 0 && socket.is_active() && socket.state() != tcp::State::Listen {
                slot.since_ns = sys::clock_ns().max(1);
                totals.connections += 1;
            }
            match slot.role {
                Role::Sink => {
                    while socket.can_recv() {
                        match socket.recv(|d| (d.len(), d.len())) {
                            Ok(n) if n > 0 => {
                                slot.bytes += n as u64;
                                totals.sunk += n as u64;
                                progress = true;
                            }
                            _ => break,
                        }
                    }
                }
                Role::Source => {
                    while socket.can_send() {
                        let start = slot.bytes;
                        let sent = socket.send(|buf| {
                            for (i, b) in buf.iter_mut().enumerate() {
                                *b = ((start + i as u64) % PATTERN_PERIOD) as u8;
                            }
                            (buf.len(), buf.len())
                        });
                        match sent {
                            Ok(n) if n > 0 => {
                                slot.bytes += n as u64;
                                totals.sourced += n as u64;
                                progress = true;
                            }
                            _ => break,
                        }
                    }
                    // Discard anything the client sends.
                    while socket.can_recv() && socket.recv(|d| (d.len(), ())).is_ok() {}
                }
                Role::Control => {
                    if socket.can_recv() {
                        let _ = socket.recv(|d| {
                            slot.line.extend_from_slice(d);
                            (d.len(), ())
                        });
                        progress = true;
                    }
                    while let Some(nl) = slot.line.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = slot.line.drain(..=nl).collect();
                        match line.trim_ascii() {
                            b"stats" => {
                                let mut text = alloc::string::String::new();
                                let _ = writeln!(
                                    text,
                                    "sunk={} sourced={} connections={}",
                                    totals.sunk, totals.sourced, totals.connections
                                );
                                slot.reply.extend_from_slice(text.as_bytes());
                            }
                            b"quit" => quit = true,
                            b"" => {}
                            _ => slot.reply.extend_from_slice(b"unknown command\n"),
                        }
                    }
                    if !slot.reply.is_empty() && socket.can_send() {
                        if let Ok(n) = socket.send_slice(&slot.reply) {
                            slot.reply.drain(..n);
                        }
                    }
                }
            }
            if socket.state() == tcp::State::CloseWait {
                socket.close();
            }
        }
        if quit {
            // Reset every connection so that no client hangs on a VM that is gone.
            for slot in &slots {
                stack.sockets.get_mut::<tcp::Socket>(slot.handle).abort();
            }
            stack.poll(now);
            println!(
                "stream: totals: sunk={} sourced={} connections={}",
                totals.sunk, totals.sourced, totals.connections
            );
            return 0;
        }
        stack.poll(now);
        if let Some(d) = dirtier.as_mut() {
            d.step();
        } else if !progress {
            stack.wait(now);
        }
    }
}
