//! The actuator: a thread's CPU share set through the cgroup v1 `cpu` controller.
//!
//! [`CgroupCpu`] creates a child group of the `cpu` hierarchy (e.g.
//! `/sys/fs/cgroup/cpu/ftvm-<pid>-primary`), moves threads into it by writing their tids to its
//! `tasks` file, and sets `cpu.cfs_quota_us = share × cpu.cfs_period_us` (`-1` at full share).
//! A short period (10 ms by default) keeps a throttled thread's run/stop cycle below what a
//! client of the guest can see, instead of the default 100 ms on/off bursts. On drop the threads
//! go back to the groups they came from and the group is removed.
//!
//! ```text
//! /sys/fs/cgroup/cpu/                       (where the threads were: remembered per tid)
//! └── ftvm-<pid>-primary/
//!     ├── tasks                <- vCPU tid
//!     ├── cpu.cfs_period_us    10000
//!     └── cpu.cfs_quota_us     share × 10000 (≥ 1000, the kernel's minimum), -1 = no limit
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::ThrottleError;

/// The kernel's smallest `cpu.cfs_quota_us`.
pub const MIN_QUOTA_US: u64 = 1000;

/// The calling thread's kernel thread id.
pub fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// CPU time a thread (of any process) has run, from `/proc/<tid>/schedstat`.
///
/// # Errors
/// The file is missing (the thread exited) or malformed.
pub fn thread_cpu_time(tid: i32) -> io::Result<Duration> {
    let text = fs::read_to_string(format!("/proc/{tid}/schedstat"))?;
    let ns = text
        .split_whitespace()
        .next()
        .and_then(|f| f.parse::<u64>().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad schedstat"))?;
    Ok(Duration::from_nanos(ns))
}

/// The mount point of the cgroup v1 hierarchy that holds the `cpu` controller.
///
/// # Errors
/// [`ThrottleError::NoCpuController`] when no such hierarchy is mounted.
pub fn cpu_mount() -> Result<PathBuf, ThrottleError> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").map_err(|e| ThrottleError::NoCpuController {
            why: format!("cannot read /proc/self/mounts: {e}"),
        })?;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 4 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "cpu") {
            return Ok(PathBuf::from(f[1]));
        }
    }
    Err(ThrottleError::NoCpuController {
        why: "no cgroup v1 hierarchy with the cpu controller is mounted (cgroup v2 only?)".into(),
    })
}

/// Why the cgroup actuator cannot be used here, if it cannot (tests print it in `SKIP`).
pub fn cgroup_cpu_unusable() -> Option<String> {
    static PROBE: AtomicU64 = AtomicU64::new(0);
    let n = PROBE.fetch_add(1, Ordering::Relaxed);
    let name = format!("ftvm-probe-{}-{n}", std::process::id());
    match CgroupCpu::create(&name, Duration::from_millis(10)) {
        Ok(g) => {
            drop(g);
            None
        }
        Err(e) => Some(super::error_text(&e)),
    }
}

/// The cgroup of `tid` in the hierarchy mounted at `mount` (from `/proc/<tid>/cgroup`).
fn cgroup_of(mount: &Path, tid: i32) -> io::Result<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{tid}/cgroup"))?;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        if ctrls.split(',').any(|c| c == "cpu") {
            return Ok(mount.join(path.trim_start_matches('/')));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("tid {tid} is in no cpu cgroup"),
    ))
}

fn write(path: &Path, value: &str) -> Result<(), ThrottleError> {
    fs::write(path, value).map_err(|source| ThrottleError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

/// A cgroup v1 `cpu` group owned by this process: threads moved in, a quota set, everything
/// undone on drop.
#[derive(Debug)]
pub struct CgroupCpu {
    dir: PathBuf,
    period_us: u64,
    /// Threads moved in, with the group each came from.
    members: Vec<(i32, PathBuf)>,
    quota_us: Option<u64>,
}

impl CgroupCpu {
    /// Creates (or takes over, if a previous run left it) the group `name` under the `cpu`
    /// hierarchy, with CFS period `period` (1 ms ..= 1 s) and no quota.
    ///
    /// # Errors
    /// [`ThrottleError::NoCpuController`], [`ThrottleError::CreateGroup`] (not root, read-only
    /// cgroupfs), [`ThrottleError::Write`], [`ThrottleError::Config`] for a bad name or period.
    pub fn create(name: &str, period: Duration) -> Result<Self, ThrottleError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(ThrottleError::Config(format!("bad cgroup name {name:?}")));
        }
        let period_us = period.as_micros() as u64;
        if !(1000..=1_000_000).contains(&period_us) {
            return Err(ThrottleError::Config(format!(
                "CFS period {period:?} outside 1 ms ..= 1 s"
            )));
        }
        let mount = cpu_mount()?;
        let dir = mount.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                tracing::warn!(dir = %dir.display(), "cgroup exists (left by an earlier run?): reusing it");
            }
            Err(source) => return Err(ThrottleError::CreateGroup { path: dir, source }),
        }
        let group = CgroupCpu {
            dir,
            period_us,
            members: Vec::new(),
            quota_us: None,
        };
        // Quota first: a period shorter than an existing quota is refused.
        write(&group.dir.join("cpu.cfs_quota_us"), "-1")?;
        write(&group.dir.join("cpu.cfs_period_us"), &period_us.to_string())?;
        Ok(group)
    }

    /// The group's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The CFS period.
    pub fn period(&self) -> Duration {
        Duration::from_micros(self.period_us)
    }

    /// The quota in force (`None`: no limit).
    pub fn quota(&self) -> Option<Duration> {
        self.quota_us.map(Duration::from_micros)
    }

    /// Moves thread `tid` (of any process) into the group; it goes back on drop.
    ///
    /// # Errors
    /// [`ThrottleError::MoveThread`] (no such thread, no permission).
    pub fn add_thread(&mut self, tid: i32) -> Result<(), ThrottleError> {
        let mount = self
            .dir
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("/"));
        let from = cgroup_of(&mount, tid).map_err(|source| ThrottleError::MoveThread {
            tid,
            path: self.dir.clone(),
            source,
        })?;
        fs::write(self.dir.join("tasks"), tid.to_string()).map_err(|source| {
            ThrottleError::MoveThread {
                tid,
                path: self.dir.clone(),
                source,
            }
        })?;
        self.members.push((tid, from));
        Ok(())
    }

    /// Sets the share of one CPU the group's threads may use together: `quota = share ×
    /// period`, at least [`MIN_QUOTA_US`]; `share ≥ 1` removes the limit.
    ///
    /// # Errors
    /// [`ThrottleError::Write`].
    pub fn set_share(&mut self, share: f64) -> Result<(), ThrottleError> {
        let quota = if !share.is_finite() || share >= 1.0 {
            None
        } else {
            Some(((share.max(0.0) * self.period_us as f64) as u64).max(MIN_QUOTA_US))
        };
        if quota == self.quota_us {
            return Ok(());
        }
        let text = quota.map_or_else(|| "-1".to_string(), |q| q.to_string());
        write(&self.dir.join("cpu.cfs_quota_us"), &text)?;
        self.quota_us = quota;
        Ok(())
    }

    /// Sets the group's weight against its siblings when the CPUs are contended
    /// (`cpu.shares`, default 1024; 2..=262144).
    ///
    /// # Errors
    /// [`ThrottleError::Write`].
    pub fn set_weight(&mut self, shares: u64) -> Result<(), ThrottleError> {
        write(
            &self.dir.join("cpu.shares"),
            &shares.clamp(2, 262_144).to_string(),
        )
    }

    /// Threads in the group now (from its `tasks` file).
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn tasks(&self) -> io::Result<Vec<i32>> {
        let text = fs::read_to_string(self.dir.join("tasks"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Moves every thread of the group that was not added with [`add_thread`] back to where
    /// the first member came from; returns how many. Threads a member spawns inherit its
    /// group; drop does this before removing the group. (Doing it periodically while
    /// throttling, to keep e.g. the output releaser out of the quota, made the lag worse in the
    /// `throttle` benchmark here: the evicted threads then compete with the vCPUs at the
    /// default weight. Not done for now.)
    ///
    /// [`add_thread`]: CgroupCpu::add_thread
    pub fn evict_strangers(&self) -> usize {
        let Some((_, home)) = self.members.first() else {
            return 0;
        };
        let Ok(tasks) = self.tasks() else {
            return 0;
        };
        let mut moved = 0;
        for tid in tasks {
            if self.members.iter().any(|(m, _)| *m == tid) {
                continue;
            }
            if fs::write(home.join("tasks"), tid.to_string()).is_ok() {
                moved += 1;
            }
        }
        if moved > 0 {
            tracing::debug!(moved, dir = %self.dir.display(), "threads spawned inside the throttled group moved out");
        }
        moved
    }

    /// The group's `cpu.stat` counters: `(nr_periods, nr_throttled, throttled_time)`.
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn stat(&self) -> io::Result<(u64, u64, Duration)> {
        let text = fs::read_to_string(self.dir.join("cpu.stat"))?;
        let mut v = (0, 0, Duration::ZERO);
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let (Some(k), Some(n)) = (f.next(), f.next().and_then(|n| n.parse::<u64>().ok()))
            else {
                continue;
            };
            match k {
                "nr_periods" => v.0 = n,
                "nr_throttled" => v.1 = n,
                "throttled_time" => v.2 = Duration::from_nanos(n),
                _ => {}
            }
        }
        Ok(v)
    }
}

impl Drop for CgroupCpu {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("cpu.cfs_quota_us"), "-1");
        self.evict_strangers();
        for (tid, from) in self.members.drain(..) {
            if let Err(e) = fs::write(from.join("tasks"), tid.to_string()) {
                // ESRCH: the thread has exited, nothing to move.
                if e.raw_os_error() != Some(libc::ESRCH) {
                    tracing::warn!(tid, to = %from.display(), error = %e, "cannot move a thread back");
                }
            }
        }
        // The kernel may take a moment to let go of exiting threads.
        for _ in 0..50 {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        tracing::warn!(dir = %self.dir.display(), "cannot remove the cgroup");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cpu_time_grows_while_spinning() {
        let tid = current_tid();
        let a = thread_cpu_time(tid).expect("schedstat");
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        let b = thread_cpu_time(tid).expect("schedstat");
        assert!(b > a, "{a:?} -> {b:?}");
        assert!(thread_cpu_time(i32::MAX).is_err());
    }

    #[test]
    fn bad_names_and_periods_are_refused() {
        for name in ["", "a/b", ".."] {
            assert!(matches!(
                CgroupCpu::create(name, Duration::from_millis(10)),
                Err(ThrottleError::Config(_))
            ));
        }
        assert!(matches!(
            CgroupCpu::create("ftvm-x", Duration::from_micros(10)),
            Err(ThrottleError::Config(_))
        ));
    }

    #[test]
    fn a_group_limits_a_thread_and_cleans_up() {
        // Bounds a time or a CPU share: one at a time with the other such tests.
        let _one = crate::testing::one_at_a_time();
        if crate::testing::skip::if_missing(
            "ft::throttle::cgroup::tests::a_group_limits_a_thread_and_cleans_up",
            cgroup_cpu_unusable(),
        ) {
            return;
        }
        let name = format!("ftvm-unit-{}", std::process::id());
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let spinner = std::thread::spawn(move || {
            tx.send(current_tid()).expect("send tid");
            while stop_rx.try_recv().is_err() {
                std::hint::spin_loop();
            }
        });
        let tid = rx.recv().expect("tid");
        let mut g = CgroupCpu::create(&name, Duration::from_millis(10)).expect("create");
        g.add_thread(tid).expect("move");
        let tasks = fs::read_to_string(g.path().join("tasks")).expect("tasks");
        assert!(tasks.lines().any(|l| l == tid.to_string()), "{tasks}");
        g.set_share(0.2).expect("share");
        assert_eq!(g.quota(), Some(Duration::from_millis(2)));
        let q = fs::read_to_string(g.path().join("cpu.cfs_quota_us")).expect("quota");
        assert_eq!(q.trim(), "2000");
        // The thread gets about 20 % of a CPU: not much more, and not much less than the
        // machine left it (its run-queue wait beyond the quota's throttling is the evidence of
        // other work; generous bounds: a loaded 2-core machine).
        let sched = || crate::testing::thread_schedstat(tid).expect("schedstat");
        let throttled = || g.stat().expect("stat").2;
        let (s0, th0) = (sched(), throttled());
        let t0 = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        let (s1, th1) = (sched(), throttled());
        let wall = t0.elapsed().as_secs_f64();
        let share = (s1.cpu - s0.cpu).as_secs_f64() / wall;
        assert!(share < 0.3, "limited thread used {share:.2} of a CPU");
        assert!(g.stat().expect("stat").1 > 0, "never throttled");
        let held =
            (s1.run_queue_wait - s0.run_queue_wait).as_secs_f64() - (th1 - th0).as_secs_f64();
        let could = (1.0 - held.max(0.0) / wall).clamp(0.0, 1.0);
        assert!(
            share >= 0.6 * could.min(0.2),
            "limited thread used {share:.2} of a CPU under a 0.2 quota (the machine left it {could:.2})"
        );
        // A thread started by a member inherits the group; it is moved out.
        g.add_thread(current_tid()).expect("move self");
        let (ctx, crx) = std::sync::mpsc::channel();
        let (cstop_tx, cstop_rx) = std::sync::mpsc::channel::<()>();
        let child = std::thread::spawn(move || {
            ctx.send(current_tid()).expect("send");
            let _ = cstop_rx.recv();
        });
        let child_tid = crx.recv().expect("child tid");
        assert!(g.tasks().expect("tasks").contains(&child_tid));
        assert_eq!(g.evict_strangers(), 1);
        assert!(!g.tasks().expect("tasks").contains(&child_tid));
        cstop_tx.send(()).expect("stop child");
        child.join().expect("child");
        g.set_weight(4096).expect("weight");
        let w = fs::read_to_string(g.path().join("cpu.shares")).expect("shares");
        assert_eq!(w.trim(), "4096");
        g.set_share(0.0001).expect("share");
        assert_eq!(g.quota(), Some(Duration::from_micros(MIN_QUOTA_US)));
        g.set_share(1.0).expect("share");
        assert_eq!(g.quota(), None);
        let dir = g.path().to_owned();
        drop(g);
        assert!(!dir.exists(), "group not removed");
        let back = cgroup_of(&cpu_mount().expect("mount"), tid).expect("cgroup");
        assert_ne!(back, dir);
        stop_tx.send(()).expect("stop");
        spinner.join().expect("spinner");
    }
}
