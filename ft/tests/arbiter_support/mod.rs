//! Helpers shared by the arbiter and detector scenario tests: child processes that re-run the
//! test binary in a "child role", guards that kill what they started, free loopback ports, and
//! local etcd servers.
#![allow(dead_code)] // Each test file uses a different subset.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable that turns a run of the test binary into a child process.
pub const CHILD_ENV: &str = "FTVM_FT_TEST_CHILD";

/// The child role this process was started in, if any.
pub fn child_role() -> Option<String> {
    std::env::var(CHILD_ENV).ok()
}

/// In a child entry point (`#[ignore]`d: not a test of its own, in the normal run it would
/// pass without checking anything; its parent runs it with [`ChildGuard::spawn_test`]): panics unless this process was started in child role `role`
/// (a child entry run by hand, e.g. with `--ignored`, fails instead of passing).
pub fn expect_child_role(role: &str) {
    let got = child_role();
    assert_eq!(
        got.as_deref(),
        Some(role),
        "a child entry point: its parent test starts it with {CHILD_ENV}={role}"
    );
}

/// Reads a required environment variable of a child.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("child needs {name}"))
}

/// A child process, killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    pub child: Child,
    pub name: String,
}

impl ChildGuard {
    /// Re-runs this test binary with only `test` (the exact name of an `#[ignore]`d child entry
    /// point) selected, in child role `role`, with extra environment `envs`. Its stdout is
    /// piped.
    pub fn spawn_test(test: &str, role: &str, envs: &[(&str, String)]) -> Self {
        let exe = std::env::current_exe().expect("current exe");
        let mut cmd = Command::new(exe);
        cmd.args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn child test process");
        Self {
            child,
            name: role.to_string(),
        }
    }

    /// Spawns an arbitrary command (stdout and stderr to a log file when given).
    pub fn spawn(name: &str, cmd: &mut Command, log: Option<&Path>) -> std::io::Result<Self> {
        cmd.stdin(Stdio::null());
        if let Some(log) = log {
            let f = std::fs::File::create(log)?;
            cmd.stdout(f.try_clone()?).stderr(f);
        }
        Ok(Self {
            child: cmd.spawn()?,
            name: name.to_string(),
        })
    }

    /// Waits for the child and returns what follows `prefix` on each line of its stdout that
    /// contains it; panics if the child failed or takes longer than `limit`.
    pub fn collect(mut self, prefix: &str, limit: Duration) -> Vec<String> {
        let stdout = self.child.stdout.take().expect("piped stdout");
        let prefix = prefix.to_string();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                // libtest may print "test <name> ... " on the same line before the output.
                .filter_map(|l| l.find(&prefix).map(|i| l[i + prefix.len()..].to_string()))
                .collect::<Vec<_>>()
        });
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait().expect("wait child") {
                Some(status) => {
                    assert!(status.success(), "child {} failed: {status}", self.name);
                    break;
                }
                None if Instant::now() > deadline => {
                    panic!("child {} did not finish within {limit:?}", self.name)
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        reader.join().expect("reader thread")
    }

    /// Kills the child now (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `N` distinct loopback ports (TCP or UDP) for this test and its children; see
/// [`ftvm_testkit::loopback_ports`].
pub fn free_ports<const N: usize>() -> [u16; N] {
    ftvm_testkit::loopback_ports().expect("free loopback ports")
}

/// One local etcd member (loopback only), killed on drop. Its data directory lives in a temp
/// directory owned by the caller, so it survives a stop/start.
#[derive(Debug)]
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub initial_cluster: String,
    /// Shared by all members of one cluster (a member with another token is another cluster).
    pub cluster_token: String,
    pub process: Option<ChildGuard>,
}

impl EtcdMember {
    /// The member's client URL.
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The member's peer URL.
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// Starts (or restarts) the member.
    pub fn start(&mut self) {
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(self.client_url())
            .arg("--advertise-client-urls")
            .arg(self.client_url())
            .arg("--listen-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&self.cluster_token)
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"]);
        let log = self.log.clone();
        self.process =
            Some(ChildGuard::spawn(&self.name, &mut cmd, Some(&log)).expect("start etcd"));
    }

    /// Stops the member (SIGKILL: a crash).
    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Waits until the member accepts TCP connections on its client port.
    pub fn wait_listening(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd {} not listening after {limit:?}; log:\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A local etcd cluster of `n` members on loopback, with its temp directory; every member is
/// killed when this is dropped (also when the test fails).
#[derive(Debug)]
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    pub dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until each accepts client connections.
    pub fn start(n: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| {
                let [client, peer] = free_ports();
                (client, peer)
            })
            .collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<EtcdMember> = ports
            .iter()
            .enumerate()
            .map(|(i, &(client_port, peer_port))| EtcdMember {
                name: format!("m{i}"),
                client_port,
                peer_port,
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                initial_cluster: initial_cluster.clone(),
                cluster_token: format!("ftvm-test-{}", ports[0].1),
                process: None,
            })
            .collect();
        for m in &mut members {
            m.start();
        }
        for m in &members {
            m.wait_listening(Duration::from_secs(15));
        }
        Self { members, dir }
    }

    /// Client URLs of all members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::client_url).collect()
    }
}

/// A node id (test names are always valid).
pub fn id(s: &str) -> ftvm_ft::NodeId {
    ftvm_ft::NodeId::new(s).expect("valid node id")
}

/// Wall-clock nanoseconds since the epoch (the lockstep start time shared with children).
pub fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
}
