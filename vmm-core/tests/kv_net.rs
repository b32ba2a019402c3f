//! The `kv` guest through a TAP device in a network namespace, driven by `redis-cli`.

mod common;

use common::{namespace, net_missing, redis_reply, start_kv, wait_ready};
use ftvm_vmm_core::vm::RunOutcome;

fn disk(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let p = dir.path().join("kv.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(8 << 20).unwrap();
    p
}

#[test]
fn redis_cli_set_get_incr() {
    if ftvm_vmm_core::testing::skip::if_missing("redis_cli_set_get_incr", net_missing()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&dir);
    let ns = namespace("kv");
    let vm = start_kv(&ns, &disk, "");
    wait_ready(&ns, &vm);
    assert_eq!(redis_reply(&ns, &["SET", "greeting", "hello world"]), "OK");
    assert_eq!(redis_reply(&ns, &["GET", "greeting"]), "hello world");
    assert_eq!(redis_reply(&ns, &["INCR", "counter"]), "1");
    assert_eq!(redis_reply(&ns, &["INCR", "counter"]), "2");
    assert_eq!(redis_reply(&ns, &["GET", "missing"]), "");
    common::redis_shutdown(&ns);
    assert_eq!(vm.join(), Ok(RunOutcome::PoweredOff(0)));
}

#[test]
fn kv_data_survives_a_restart_from_the_same_disk() {
    if ftvm_vmm_core::testing::skip::if_missing(
        "kv_data_survives_a_restart_from_the_same_disk",
        net_missing(),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&dir);
    let ns = namespace("kvp");
    {
        let vm = start_kv(&ns, &disk, "");
        wait_ready(&ns, &vm);
        assert_eq!(redis_reply(&ns, &["SET", "persist", "across-boots"]), "OK");
        assert_eq!(redis_reply(&ns, &["INCRBY", "n", "41"]), "41");
        common::redis_shutdown(&ns);
        assert_eq!(vm.join(), Ok(RunOutcome::PoweredOff(0)));
    }
    let vm = start_kv(&ns, &disk, "");
    wait_ready(&ns, &vm);
    assert_eq!(redis_reply(&ns, &["GET", "persist"]), "across-boots");
    assert_eq!(redis_reply(&ns, &["INCR", "n"]), "42");
    common::redis_shutdown(&ns);
    let console = vm.console.clone();
    assert_eq!(vm.join(), Ok(RunOutcome::PoweredOff(0)));
    let text = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    assert!(
        text.contains("2 keys recovered"),
        "second boot console: {text}"
    );
}
