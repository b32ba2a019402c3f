//! The log writer's lifetime: when the last [`LogWriter`] is dropped, its sender and so the
//! logging link go with it, and the backup learns at once that the log ended (a reference
//! cycle through the writer's observer once kept the link open until the backup gave up
//! waiting for the hang-up, 30 s later).

use std::time::{Duration, Instant};

use ftvm_channel::tcp::TcpMode;
use ftvm_channel::{Config, PollerConfig};
use ftvm_ft::primary::LogWriter;
use ftvm_ringbuf::IdleKind;
use ftvm_testkit::link::TcpLink;

#[test]
fn dropping_the_last_writer_hangs_up_the_link() {
    let (backup_end, primary_end) = TcpLink::new()
        .ring(1 << 16)
        .mode(TcpMode::Blocking)
        .poller(PollerConfig {
            core: None,
            idle: IdleKind::Park,
        })
        .connect()
        .expect("link");
    let backup = std::thread::spawn(move || {
        let mut rx = backup_end.start(Config::default()).expect("rx");
        // Wait for the hang-up: the poller's error once everything received is consumed.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if rx.poll_records(|_| {}).is_err() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    });
    let sender = primary_end.start(Config::default()).expect("sender");
    let writer = LogWriter::new(sender, IdleKind::Yield);
    let clone = writer.clone();
    let observer = writer.observer().clone();
    drop(writer);
    std::thread::sleep(Duration::from_millis(200));
    // A clone still holds the link; the observer (kept by the metrics endpoint) does not.
    drop(clone);
    let waited = backup.join().expect("backup thread");
    let waited = waited.expect("the link stayed open 20 s after the last writer was dropped");
    assert!(
        waited < Duration::from_secs(5),
        "the backup saw the hang-up only after {waited:?}"
    );
    // The observer outlives the writer and still answers (with the final counters).
    let snap = observer.snapshot();
    assert!(snap.log.is_some(), "{snap:?}");
}
