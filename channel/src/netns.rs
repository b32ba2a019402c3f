//! Test hosts made of Linux network namespaces: a guard-type toolkit for networked tests and
//! benchmarks.
//!
//! A networked test needs two "hosts" joined by a wire. On one machine that is two network
//! namespaces joined by a veth pair:
//!
//! ```text
//!   netns ftvm-a                          netns ftvm-b
//!  ┌──────────────────────┐              ┌──────────────────────┐
//!  │ lo (up)              │   veth pair  │ lo (up)              │
//!  │ ftvm-va  mac_a [ip_a]│◀────────────▶│ftvm-vb  mac_b [ip_b] │
//!  │ IPv6 off             │              │ IPv6 off             │
//!  └──────────────────────┘              └──────────────────────┘
//! ```
//!
//! Every object is owned by a guard whose `Drop` removes it, so a failing (panicking) test still
//! cleans up: [`Netns`] (one namespace), [`VethPair`] (one veth link between two namespaces) and
//! [`HostPair`] (both namespaces plus the link, the common case). Creation is idempotent: a
//! leftover namespace or link of the same name (from a run that was killed) is removed first, so
//! every run starts from a known state. Two guards must therefore never use the same names at the
//! same time — tests that run in parallel (cargo runs tests of one binary on several threads) use
//! [`HostPairConfig::with_prefix`] to get names of their own.
//!
//! Configuration is done by running `ip` (iproute2), exactly as `scripts/netns.sh` does; code
//! *inside* a namespace runs in this process: [`Netns::run`] runs a closure on a thread that has
//! entered the namespace, [`Netns::spawn`] starts a long-lived one, [`Netns::enter`] moves the
//! calling thread in (and back out when the guard drops), and [`enter_netns`] moves the calling
//! thread in for good (what a transport bound "inside host B" does). [`Netns::exec`] runs a
//! program inside the namespace (`ip netns exec`).
//!
//! Everything here needs root (`CAP_SYS_ADMIN` + `CAP_NET_ADMIN`); [`require_root`] tells a test
//! whether it can run and why not:
//!
//! ```no_run
//! use ftvm_channel::netns::{require_root, HostPair, HostPairConfig};
//!
//! if ftvm_channel::skip::if_missing("my_test", require_root().err()) {
//!     return;
//! }
//! let hosts = HostPair::create(&HostPairConfig::with_prefix("ftvm-t1").with_ipv4()).unwrap();
//! let out = hosts.a().exec("ping", &["-c1", "-W1", "10.77.0.2"]).unwrap();
//! assert!(out.status.success());
//! hosts.veth().set_up(false).unwrap(); // cut the wire
//! hosts.veth().set_up(true).unwrap();
//! // `hosts` dropped here: the link and both namespaces are deleted.
//! ```

use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::JoinHandle;

/// Directory where `ip netns` keeps one bind-mounted file per named namespace.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Longest Linux interface name (`IFNAMSIZ - 1`).
pub const MAX_IFNAME_LEN: usize = 15;

/// Errors from creating, entering or configuring namespaces and links.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A helper program (`ip`, or the program given to [`Netns::exec`]) could not be started.
    #[error("could not run `{cmd}`")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why it could not be started.
        #[source]
        source: io::Error,
    },
    /// A helper program ran and failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The namespace file could not be opened (the namespace does not exist).
    #[error("could not open namespace file {path}")]
    Open {
        /// `/run/netns/<name>` or `/proc/thread-self/ns/net`.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `setns(2)` failed.
    #[error("setns into network namespace {name} failed")]
    Setns {
        /// Namespace name (or `"original"` when switching back).
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A thread could not be spawned.
    #[error("could not spawn a thread for namespace {name}")]
    Thread {
        /// Namespace name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A sysctl inside the namespace could not be written.
    #[error("could not write {path} in namespace {name}")]
    Sysctl {
        /// Namespace name.
        name: String,
        /// The `/proc/sys` file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A namespace or interface name is not usable.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Checks whether this process can create namespaces and links; `Err` carries the reason to print
/// in a `SKIP <test>: <reason>` line.
///
/// # Errors
/// A human-readable reason when not running as root or when `ip` (iproute2) is missing.
pub fn require_root() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!(
            "needs root (network namespaces, veth), running as uid {euid}"
        ));
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("`ip -V` failed ({})", out.status)),
        Err(e) => Err(format!("iproute2 `ip` not found: {e}")),
    }
}

/// Prints `SKIP <test>: <reason>` and returns from the calling test when the process cannot
/// create network namespaces (see [`require_root`]).
#[macro_export]
macro_rules! require_root {
    ($test:expr) => {
        if $crate::skip::if_missing($test, $crate::netns::require_root().err()) {
            return;
        }
    };
}

fn display_cmd(program: &OsStr, args: &[&OsStr]) -> String {
    let mut s = program.to_string_lossy().into_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a program, waits for it, and turns a non-zero exit into [`NetnsError::Command`].
fn run_checked<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Output, NetnsError> {
    let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    let cmd = display_cmd(OsStr::new(program), &args);
    tracing::debug!(%cmd, "netns: running");
    let out = Command::new(program)
        .args(&args)
        .output()
        .map_err(|source| NetnsError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            cmd,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// Runs `ip ARGS...`; fails on a non-zero exit.
///
/// # Errors
/// [`NetnsError::Spawn`] / [`NetnsError::Command`].
pub fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<Output, NetnsError> {
    run_checked("ip", args)
}

fn check_ns_name(name: &str) -> Result<(), NetnsError> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(NetnsError::InvalidName {
            name: name.to_owned(),
            reason: "empty or a dot name",
        });
    }
    if name.contains('/') || name.chars().any(char::is_whitespace) {
        return Err(NetnsError::InvalidName {
            name: name.to_owned(),
            reason: "contains '/' or whitespace",
        });
    }
    Ok(())
}

fn check_ifname(name: &str) -> Result<(), NetnsError> {
    check_ns_name(name)?;
    if name.len() > MAX_IFNAME_LEN {
        return Err(NetnsError::InvalidName {
            name: name.to_owned(),
            reason: "interface names are at most 15 bytes",
        });
    }
    Ok(())
}

/// Path of the file `ip netns` keeps for namespace `name`.
#[must_use]
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

fn setns_file(file: &File, name: &str) -> Result<(), NetnsError> {
    // SAFETY: `file` is an open namespace file descriptor that outlives the call; setns only
    // changes the calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Setns {
            name: name.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn open_ns_file(path: PathBuf) -> Result<File, NetnsError> {
    File::open(&path).map_err(|source| NetnsError::Open { path, source })
}

/// Moves the **calling thread** into network namespace `name` (as created by `ip netns add`) for
/// the rest of its life. Sockets created afterwards on this thread live in that namespace (and
/// stay there, wherever the thread goes next).
///
/// # Errors
/// [`NetnsError::Open`] when the namespace does not exist, [`NetnsError::Setns`] without
/// `CAP_SYS_ADMIN`.
pub fn enter_netns(name: &str) -> Result<(), NetnsError> {
    check_ns_name(name)?;
    let file = open_ns_file(netns_path(name))?;
    setns_file(&file, name)?;
    tracing::debug!(netns = name, "thread entered network namespace");
    Ok(())
}

/// Moves the calling thread into network namespace `name` until the returned guard drops (which
/// moves it back to the namespace it was in).
///
/// # Errors
/// [`NetnsError::Open`] / [`NetnsError::Setns`].
pub fn enter_scoped(name: &str) -> Result<NetnsEntered, NetnsError> {
    let original = open_ns_file(PathBuf::from("/proc/thread-self/ns/net"))?;
    enter_netns(name)?;
    Ok(NetnsEntered { original })
}

/// One named network namespace (`/run/netns/<name>`).
///
/// An *owning* guard ([`Netns::create`]) deletes the namespace on drop; a borrowed handle
/// ([`Netns::open`]) does not.
pub struct Netns {
    name: String,
    owned: bool,
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netns")
            .field("name", &self.name)
            .field("owned", &self.owned)
            .finish()
    }
}

impl Netns {
    /// Creates namespace `name` (deleting a leftover one of that name first), brings `lo` up and
    /// turns IPv6 off in it (no router solicitations or DAD frames on test links). The namespace
    /// is deleted when the guard drops.
    ///
    /// # Errors
    /// [`NetnsError`] when `ip netns add` fails (not root) or the name is invalid.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        check_ns_name(name)?;
        if netns_path(name).exists() {
            tracing::info!(netns = name, "deleting leftover network namespace");
            ip(&["netns", "del", name])?;
        }
        ip(&["netns", "add", name])?;
        // From here on `ns` owns the namespace: an error below deletes it again.
        let ns = Self {
            name: name.to_owned(),
            owned: true,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.disable_ipv6()?;
        tracing::debug!(netns = name, "network namespace created");
        Ok(ns)
    }

    /// A handle on an existing namespace (e.g. one made by `scripts/netns.sh up`); dropping it
    /// leaves the namespace alone.
    ///
    /// # Errors
    /// [`NetnsError::Open`] when it does not exist.
    pub fn open(name: &str) -> Result<Self, NetnsError> {
        check_ns_name(name)?;
        let path = netns_path(name);
        if !path.exists() {
            return Err(NetnsError::Open {
                path,
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        Ok(Self {
            name: name.to_owned(),
            owned: false,
        })
    }

    /// The namespace's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <name> ARGS...` (configure something inside the namespace).
    ///
    /// # Errors
    /// [`NetnsError::Command`] when `ip` fails.
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output, NetnsError> {
        let mut all: Vec<&OsStr> = vec![OsStr::new("-n"), OsStr::new(&self.name)];
        all.extend(args.iter().map(AsRef::as_ref));
        ip(&all)
    }

    /// Runs `program ARGS...` inside the namespace (`ip netns exec <name> program ARGS...`) and
    /// waits for it. Unlike the other methods this does **not** fail on a non-zero exit: the
    /// caller inspects [`Output::status`].
    ///
    /// # Errors
    /// [`NetnsError::Spawn`] when `ip` cannot be started.
    pub fn exec<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Result<Output, NetnsError> {
        self.command(program, args)
            .output()
            .map_err(|source| NetnsError::Spawn {
                cmd: format!("ip netns exec {} {program}", self.name),
                source,
            })
    }

    /// A [`Command`] that runs `program ARGS...` inside the namespace, for callers that want to
    /// spawn it in the background or redirect its output.
    #[must_use]
    pub fn command<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd.args(args);
        cmd
    }

    /// Moves the calling thread into the namespace until the returned guard drops (which moves it
    /// back to the namespace it was in).
    ///
    /// # Errors
    /// [`NetnsError::Open`] / [`NetnsError::Setns`].
    pub fn enter(&self) -> Result<NetnsEntered, NetnsError> {
        enter_scoped(&self.name)
    }

    /// Runs `f` on a fresh thread that has entered the namespace and returns its result. A panic
    /// in `f` is propagated to the caller.
    ///
    /// # Errors
    /// [`NetnsError`] when the thread cannot be started or cannot enter the namespace.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let name = self.name.as_str();
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{name}"))
                .spawn_scoped(s, move || -> Result<T, NetnsError> {
                    enter_netns(name)?;
                    Ok(f())
                })
                .map_err(|source| NetnsError::Thread {
                    name: name.to_owned(),
                    source,
                })?;
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Starts a named thread that enters the namespace and then runs `f`. The join handle yields
    /// `Err` when entering failed (and `f` never ran).
    ///
    /// # Errors
    /// [`NetnsError::Thread`] when the thread cannot be spawned.
    pub fn spawn<T, F>(
        &self,
        thread_name: &str,
        f: F,
    ) -> Result<JoinHandle<Result<T, NetnsError>>, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(thread_name.to_owned())
            .spawn(move || {
                enter_netns(&name)?;
                Ok(f())
            })
            .map_err(|source| NetnsError::Thread {
                name: self.name.clone(),
                source,
            })
    }

    /// Writes `value` to `/proc/sys/<key with dots as slashes>` inside the namespace.
    ///
    /// # Errors
    /// [`NetnsError::Sysctl`] when the file cannot be written.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let name = self.name.clone();
        self.run(|| std::fs::write(&path, value))?
            .map_err(|source| NetnsError::Sysctl { name, path, source })
    }

    fn disable_ipv6(&self) -> Result<(), NetnsError> {
        if !Path::new("/proc/sys/net/ipv6").exists() {
            return Ok(()); // kernel without IPv6: nothing to turn off
        }
        self.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        self.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
    }

    /// Creates a persistent TAP device `ifname` inside the namespace (`ip tuntap add mode tap`),
    /// brings it up and, when given, assigns `addr/prefix_len`. A VMM opens it by name
    /// (`TUNSETIFF` on `/dev/net/tun`) from a thread inside the namespace ([`Netns::enter`]). It
    /// is deleted with the namespace.
    ///
    /// # Errors
    /// [`NetnsError`] when `ip` fails or the name is too long.
    pub fn add_tap(&self, ifname: &str, addr: Option<(Ipv4Addr, u8)>) -> Result<(), NetnsError> {
        check_ifname(ifname)?;
        self.ip(&["tuntap", "add", "dev", ifname, "mode", "tap"])?;
        if let Some((a, len)) = addr {
            self.ip(&["addr", "add", &format!("{a}/{len}"), "dev", ifname])?;
        }
        self.ip(&["link", "set", ifname, "up"])?;
        Ok(())
    }

    /// Sets interface `ifname` (inside the namespace) up or down.
    ///
    /// # Errors
    /// [`NetnsError::Command`] when `ip` fails.
    pub fn set_link(&self, ifname: &str, up: bool) -> Result<(), NetnsError> {
        self.ip(&["link", "set", ifname, if up { "up" } else { "down" }])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        match ip(&["netns", "del", &self.name]) {
            Ok(_) => tracing::debug!(netns = %self.name, "network namespace deleted"),
            Err(e) => {
                tracing::warn!(netns = %self.name, error = %e, "could not delete network namespace")
            }
        }
    }
}

/// The calling thread's stay in a namespace ([`Netns::enter`]); dropping it moves the thread back.
#[derive(Debug)]
pub struct NetnsEntered {
    original: File,
}

impl Drop for NetnsEntered {
    fn drop(&mut self) {
        if let Err(e) = setns_file(&self.original, "original") {
            tracing::error!(error = %e, "could not move thread back to its network namespace");
        }
    }
}

/// One end of a veth link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VethEnd {
    /// Namespace holding this end.
    pub netns: String,
    /// Interface name (≤ 15 bytes).
    pub ifname: String,
    /// MAC address.
    pub mac: [u8; 6],
    /// Optional IPv4 address and prefix length.
    pub ipv4: Option<(Ipv4Addr, u8)>,
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
#[must_use]
pub fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// A veth link between two namespaces; deleted on drop.
#[derive(Debug)]
pub struct VethPair {
    a: VethEnd,
    b: VethEnd,
}

impl VethPair {
    /// Creates the link `a.ifname` (in `a.netns`) ↔ `b.ifname` (in `b.netns`) with the given MAC
    /// addresses, optional MTU and IPv4 addresses, and brings both ends up. A leftover link of
    /// the same name in either namespace is deleted first. Both namespaces must exist.
    ///
    /// # Errors
    /// [`NetnsError`] when a name is invalid or `ip` fails.
    pub fn create(a: VethEnd, b: VethEnd, mtu: Option<u32>) -> Result<Self, NetnsError> {
        check_ifname(&a.ifname)?;
        check_ifname(&b.ifname)?;
        for end in [&a, &b] {
            if ip(&["-n", &end.netns, "link", "show", "dev", &end.ifname]).is_ok() {
                tracing::info!(netns = %end.netns, ifname = %end.ifname, "deleting leftover link");
                ip(&["-n", &end.netns, "link", "del", "dev", &end.ifname])?;
            }
        }
        let (mac_a, mac_b) = (format_mac(a.mac), format_mac(b.mac));
        ip(&[
            "link", "add", &a.ifname, "netns", &a.netns, "address", &mac_a, "type", "veth", "peer",
            "name", &b.ifname, "netns", &b.netns, "address", &mac_b,
        ])?;
        let pair = Self { a, b };
        for end in [&pair.a, &pair.b] {
            if let Some(mtu) = mtu {
                let mtu = mtu.to_string();
                ip(&[
                    "-n",
                    &end.netns,
                    "link",
                    "set",
                    "dev",
                    &end.ifname,
                    "mtu",
                    &mtu,
                ])?;
            }
            if let Some((addr, len)) = end.ipv4 {
                let cidr = format!("{addr}/{len}");
                ip(&["-n", &end.netns, "addr", "add", &cidr, "dev", &end.ifname])?;
            }
        }
        pair.set_up(true)?;
        tracing::debug!(a = %pair.a.ifname, b = %pair.b.ifname, "veth pair created");
        Ok(pair)
    }

    /// End A.
    #[must_use]
    pub fn a(&self) -> &VethEnd {
        &self.a
    }

    /// End B.
    #[must_use]
    pub fn b(&self) -> &VethEnd {
        &self.b
    }

    /// Sets both ends up or down. Down cuts the wire (frames sent meanwhile are dropped); up
    /// restores it.
    ///
    /// # Errors
    /// [`NetnsError::Command`] when `ip` fails.
    pub fn set_up(&self, up: bool) -> Result<(), NetnsError> {
        let state = if up { "up" } else { "down" };
        for end in [&self.a, &self.b] {
            ip(&["-n", &end.netns, "link", "set", "dev", &end.ifname, state])?;
        }
        Ok(())
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting one end deletes the pair. The namespace may already be gone (and the link
        // with it): that is not worth a warning.
        if netns_path(&self.a.netns).exists() {
            if let Err(e) = ip(&["-n", &self.a.netns, "link", "del", "dev", &self.a.ifname]) {
                tracing::warn!(ifname = %self.a.ifname, error = %e, "could not delete veth pair");
            }
        }
    }
}

/// Names, MACs and addresses of a [`HostPair`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPairConfig {
    /// Namespace of host A (default `ftvm-a`).
    pub netns_a: String,
    /// Namespace of host B (default `ftvm-b`).
    pub netns_b: String,
    /// Veth end in A (default `ftvm-va`).
    pub if_a: String,
    /// Veth end in B (default `ftvm-vb`).
    pub if_b: String,
    /// MAC of A's end (default `02:66:74:76:6d:0a`, locally administered).
    pub mac_a: [u8; 6],
    /// MAC of B's end (default `02:66:74:76:6d:0b`).
    pub mac_b: [u8; 6],
    /// IPv4 address of A's end (`None`: no address; raw-frame transports need none).
    pub ipv4_a: Option<(Ipv4Addr, u8)>,
    /// IPv4 address of B's end.
    pub ipv4_b: Option<(Ipv4Addr, u8)>,
    /// MTU of both ends (`None`: the veth default, 1500).
    pub mtu: Option<u32>,
}

/// Default MAC of host A's veth end (same as `scripts/netns.sh`).
pub const DEFAULT_MAC_A: [u8; 6] = [0x02, 0x66, 0x74, 0x76, 0x6d, 0x0a];
/// Default MAC of host B's veth end.
pub const DEFAULT_MAC_B: [u8; 6] = [0x02, 0x66, 0x74, 0x76, 0x6d, 0x0b];
/// IPv4 address [`HostPairConfig::with_ipv4`] gives host A.
pub const DEFAULT_IPV4_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// IPv4 address [`HostPairConfig::with_ipv4`] gives host B.
pub const DEFAULT_IPV4_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

impl Default for HostPairConfig {
    /// `ftvm-a`/`ftvm-b` joined by `ftvm-va`/`ftvm-vb`, as `scripts/netns.sh up` makes them.
    fn default() -> Self {
        Self::with_prefix("ftvm")
    }
}

impl HostPairConfig {
    /// Names derived from `prefix`: namespaces `<prefix>-a`/`<prefix>-b`, interfaces
    /// `<prefix>-va`/`<prefix>-vb` (so `prefix` must be at most 12 bytes); default MACs, no
    /// addresses. Give every concurrently running test its own prefix.
    #[must_use]
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            netns_a: format!("{prefix}-a"),
            netns_b: format!("{prefix}-b"),
            if_a: format!("{prefix}-va"),
            if_b: format!("{prefix}-vb"),
            mac_a: DEFAULT_MAC_A,
            mac_b: DEFAULT_MAC_B,
            ipv4_a: None,
            ipv4_b: None,
            mtu: None,
        }
    }

    /// Adds the default addresses `10.77.0.1/24` (A) and `10.77.0.2/24` (B).
    #[must_use]
    pub fn with_ipv4(self) -> Self {
        self.with_addrs(DEFAULT_IPV4_A, DEFAULT_IPV4_B, 24)
    }

    /// Adds IPv4 addresses `a/prefix_len` and `b/prefix_len`.
    #[must_use]
    pub fn with_addrs(mut self, a: Ipv4Addr, b: Ipv4Addr, prefix_len: u8) -> Self {
        self.ipv4_a = Some((a, prefix_len));
        self.ipv4_b = Some((b, prefix_len));
        self
    }
}

/// Two test hosts: namespaces A and B joined by a veth pair, all removed on drop.
#[derive(Debug)]
pub struct HostPair {
    // Field order is drop order: the link first, then the namespaces.
    veth: VethPair,
    a: Netns,
    b: Netns,
    config: HostPairConfig,
}

impl HostPair {
    /// Creates both namespaces (lo up, IPv6 off) and the veth pair between them, with the
    /// configured MACs, MTU and addresses; leftovers of the same names are replaced.
    ///
    /// # Errors
    /// [`NetnsError`] from any step; what was created before the failing step is removed.
    pub fn create(config: &HostPairConfig) -> Result<Self, NetnsError> {
        let a = Netns::create(&config.netns_a)?;
        let b = Netns::create(&config.netns_b)?;
        let veth = VethPair::create(
            VethEnd {
                netns: config.netns_a.clone(),
                ifname: config.if_a.clone(),
                mac: config.mac_a,
                ipv4: config.ipv4_a,
            },
            VethEnd {
                netns: config.netns_b.clone(),
                ifname: config.if_b.clone(),
                mac: config.mac_b,
                ipv4: config.ipv4_b,
            },
            config.mtu,
        )?;
        Ok(Self {
            veth,
            a,
            b,
            config: config.clone(),
        })
    }

    /// Host A's namespace.
    #[must_use]
    pub fn a(&self) -> &Netns {
        &self.a
    }

    /// Host B's namespace.
    #[must_use]
    pub fn b(&self) -> &Netns {
        &self.b
    }

    /// The link between them.
    #[must_use]
    pub fn veth(&self) -> &VethPair {
        &self.veth
    }

    /// The configuration it was made from.
    #[must_use]
    pub fn config(&self) -> &HostPairConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_ifname("ftvm-va").is_ok());
        assert!(check_ifname("sixteen-chars-xx").is_err());
        assert!(check_ns_name("a/b").is_err());
        assert!(check_ns_name("").is_err());
        assert_eq!(format_mac(DEFAULT_MAC_A), "02:66:74:76:6d:0a");
        let c = HostPairConfig::default();
        assert_eq!((c.netns_a.as_str(), c.if_b.as_str()), ("ftvm-a", "ftvm-vb"));
    }

    #[test]
    fn host_pair_lifecycle() {
        if crate::skip::if_missing("netns::tests::host_pair_lifecycle", require_root().err()) {
            return;
        }
        let cfg = HostPairConfig::with_prefix("ftvm-u1").with_ipv4();
        {
            let hosts = HostPair::create(&cfg).expect("create hosts");
            // TCP from A reaches B over the link, and not while the link is down.
            let listener = hosts
                .b()
                .run(|| std::net::TcpListener::bind((DEFAULT_IPV4_B, 0)))
                .expect("run in b")
                .expect("bind in b");
            let addr = listener.local_addr().expect("local addr");
            let connect = || {
                hosts
                    .a()
                    .run(|| {
                        std::net::TcpStream::connect_timeout(
                            &addr,
                            std::time::Duration::from_secs(1),
                        )
                    })
                    .expect("run in a")
            };
            assert!(connect().is_ok(), "A reaches B over the veth pair");
            hosts.veth().set_up(false).expect("link down");
            assert!(connect().is_err(), "A cannot reach B with the link down");
            hosts.veth().set_up(true).expect("link up");
            assert!(connect().is_ok(), "A reaches B again after link up");
            drop(listener);
            // Code running in B sees B's interface and the sysctl written at creation.
            let (has_vb, ipv6_off) = hosts
                .b()
                .run(|| {
                    (
                        std::fs::read_to_string("/proc/thread-self/net/dev")
                            .map(|s| s.contains("ftvm-u1-vb"))
                            .unwrap_or(false),
                        std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
                            .map(|s| s.trim() == "1")
                            .unwrap_or(true),
                    )
                })
                .expect("run in b");
            assert!(has_vb, "B's veth end is visible inside B");
            assert!(ipv6_off, "IPv6 is off inside B");
            // The calling thread is not in B, and can enter and leave it.
            let dev_here = std::fs::read_to_string("/proc/thread-self/net/dev").expect("read");
            assert!(!dev_here.contains("ftvm-u1-vb"));
            {
                let _in_b = hosts.b().enter().expect("enter b");
                let dev = std::fs::read_to_string("/proc/thread-self/net/dev").expect("read");
                assert!(dev.contains("ftvm-u1-vb"), "{dev}");
            }
            let dev = std::fs::read_to_string("/proc/thread-self/net/dev").expect("read");
            assert!(!dev.contains("ftvm-u1-vb"));
            // Re-creating over a leftover works.
            let again = HostPair::create(&cfg);
            assert!(again.is_ok(), "{again:?}");
            // `again` now owns the names: dropping `hosts` too would delete them twice.
            std::mem::forget(hosts);
            drop(again);
        }
        assert!(
            !netns_path("ftvm-u1-a").exists(),
            "namespace A removed on drop"
        );
        assert!(
            !netns_path("ftvm-u1-b").exists(),
            "namespace B removed on drop"
        );
    }
}
