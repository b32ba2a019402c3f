//! Storage fencing of a shared disk image through its owner record (`<image>.owner`, OFD
//! locks): real files, real locks, a real child process that is stopped and killed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ftvm_vmm_core::devices::virtio::blk::BlkError;
use ftvm_vmm_core::devices::virtio::owner::{owner_path, DiskOwner};

/// Set in the re-executed test binary: the child holds a writer's read lock on this image's
/// owner record.
const CHILD_ENV: &str = "FTVM_DISK_OWNER_CHILD";
/// What the child prints once it holds the lock.
const LOCKED: &str = "CHILD-HOLDS-READ-LOCK";

fn image(dir: &Path) -> PathBuf {
    let p = dir.join("shared.img");
    std::fs::write(&p, vec![0u8; 4096]).expect("image");
    p
}

/// A writer's request: under the fence, `data` at offset 0 of the image.
fn write(owner: &DiskOwner, ours: u64, img: &Path, data: &[u8]) -> Result<(), BlkError> {
    let _guard = owner.guard(ours)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .and_then(|f| f.write_all_at(data, 0))
        .expect("pwrite");
    Ok(())
}

fn head(img: &Path) -> Vec<u8> {
    std::fs::read(img).expect("read image")[..8].to_vec()
}

#[test]
fn a_superseded_writer_is_refused_and_the_new_owner_writes() {
    let _one = ftvm_testkit::one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path());
    let old = DiskOwner::open(&img).expect("open");
    assert_eq!(old.path(), owner_path(&img));
    assert_eq!(old.generation().expect("generation"), 0, "a new record");
    let t = old.take(1, Duration::from_secs(2)).expect("take 1");
    assert_eq!((t.previous, t.forced), (0, false));
    write(&old, 1, &img, b"old-gen1").expect("generation 1 writes");
    assert_eq!(head(&img), b"old-gen1");

    // A new owner, with its own open file description (as another process would have).
    let new = DiskOwner::open(&img).expect("open");
    let t = new.take(2, Duration::from_secs(2)).expect("take 2");
    assert_eq!((t.previous, t.forced), (1, false));
    assert_eq!(
        std::fs::read(owner_path(&img)).expect("record"),
        2u64.to_le_bytes()
    );

    // The old writer's next write is refused; the image is unchanged.
    match write(&old, 1, &img, b"ZOMBIE!!") {
        Err(BlkError::Superseded { owner, ours, .. }) => assert_eq!((owner, ours), (2, 1)),
        other => panic!("the zombie write was not refused: {other:?}"),
    }
    assert_eq!(head(&img), b"old-gen1");
    // Nor can it take the disk back.
    assert!(matches!(
        old.take(1, Duration::from_secs(2)),
        Err(BlkError::Superseded { owner: 2, .. })
    ));
    assert_eq!(new.generation().expect("generation"), 2);

    write(&new, 2, &img, b"new-gen2").expect("generation 2 writes");
    assert_eq!(head(&img), b"new-gen2");
}

#[test]
fn taking_ownership_waits_for_a_writer_in_its_request() {
    let _one = ftvm_testkit::one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path());
    let writer = DiskOwner::open(&img).expect("open");
    writer.take(1, Duration::from_secs(2)).expect("take 1");
    let taker = DiskOwner::open(&img).expect("open");
    let hold = Duration::from_millis(150);
    let taken = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = &writer;
        s.spawn(move || {
            let g = writer.guard(1).expect("guard");
            tx.send(()).expect("send");
            std::thread::sleep(hold);
            drop(g);
        });
        rx.recv().expect("writer holds the lock");
        taker.take(2, Duration::from_secs(2)).expect("take 2")
    });
    // The write lock was granted only once the writer's request was done.
    assert!(!taken.forced, "{taken:?}");
    assert!(taken.waited >= hold / 2, "{taken:?}");
    assert_eq!(writer.generation().expect("generation"), 2);
}

/// Kills (SIGKILL) and reaps the child when dropped, also if the test panics.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid (not reaped yet, so the pid is still ours).
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn takeover_waits_its_bound_for_a_stopped_writer_and_not_for_a_killed_one() {
    const TEST: &str = "takeover_waits_its_bound_for_a_stopped_writer_and_not_for_a_killed_one";
    let _one = ftvm_testkit::one_at_a_time();
    if let Ok(img) = std::env::var(CHILD_ENV) {
        // The child: a writer of generation 1 inside its request, holding the read lock.
        let owner = DiskOwner::open(Path::new(&img)).expect("child: open");
        let _guard = owner.guard(1).expect("child: guard");
        let mut out = std::io::stdout();
        writeln!(out, "{LOCKED}").expect("child: stdout");
        out.flush().expect("child: flush");
        // The parent stops and kills it long before this.
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path());
    let taker = DiskOwner::open(&img).expect("open");
    taker.take(1, Duration::from_secs(2)).expect("take 1");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Reap(
        Command::new(exe)
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &img)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child"),
    );
    let stdout = child.0.stdout.take().expect("child stdout");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(LOCKED) => break,
            Some(Ok(_)) => {}
            other => panic!("the child ended before it held the lock: {other:?}"),
        }
    }
    // The writer stalls inside its request.
    signal(&child.0, libc::SIGSTOP);
    let patience = Duration::from_millis(600);
    let t0 = Instant::now();
    let taken = taker.take(2, patience).expect("take 2");
    let took = t0.elapsed();
    eprintln!("{TEST}: stopped writer: {taken:?} in {took:?}");
    assert!(
        taken.forced,
        "the lock of a stopped writer was granted: {taken:?}"
    );
    assert!(took >= patience, "{took:?}");
    assert!(took < patience + Duration::from_secs(2), "{took:?}");
    assert_eq!(taker.generation().expect("generation"), 2);

    // A killed writer's OFD lock goes with it: the next take-over is immediate.
    signal(&child.0, libc::SIGKILL);
    let status = child.0.wait().expect("wait child");
    assert!(!status.success(), "{status:?}");
    let t0 = Instant::now();
    let taken = taker.take(3, Duration::from_secs(2)).expect("take 3");
    let took = t0.elapsed();
    eprintln!("{TEST}: killed writer: {taken:?} in {took:?}");
    assert!(!taken.forced, "{taken:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(taker.generation().expect("generation"), 3);
}
