//! Builds the guest programs of `guests/` (a cargo workspace of its own) and hands their ELF
//! paths to `src/guests.rs` as `GUEST_<NAME>_ELF` for `include_bytes!`.
//!
//! The nested build is
//! `$CARGO build --release --target x86_64-unknown-linux-gnu --manifest-path <ws>/guests/Cargo.toml
//! --target-dir <ws>/target/guests`:
//! - a target dir of its own, derived from the workspace root (never from OUT_DIR or
//!   CARGO_TARGET_DIR, which differ per user): the outer cargo holds the lock on its own;
//! - an explicit `--target`, so that the guests' target rustflags (`guests/.cargo/config.toml`)
//!   do not hit build scripts and proc macros;
//! - without `RUSTFLAGS`/`CARGO_ENCODED_RUSTFLAGS` (cargo sets the latter, empty, for build
//!   scripts; either one, even empty, makes cargo ignore the config rustflags and the guests come
//!   out PIE), the clippy wrappers, and the outer target dir and target.
//!
//! Each image is checked: ELF64 x86-64, `ET_EXEC`, no `PT_INTERP`/`PT_DYNAMIC`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{self, Command};

/// The guest binaries and the environment variables that carry their paths.
const GUESTS: [(&str, &str); 4] = [
    ("cpu", "GUEST_CPU_ELF"),
    ("kv", "GUEST_KV_ELF"),
    ("stream", "GUEST_STREAM_ELF"),
    ("nondet", "GUEST_NONDET_ELF"),
];

/// The target the guests are compiled for (the only one installed everywhere).
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Variables that must not leak from the outer cargo into the nested one.
const REMOVED_ENV: [&str; 8] = [
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_TARGET",
];

/// The sources of the guest workspace whose change must rebuild the guests.
const WATCHED: [&str; 9] = [
    "Cargo.toml",
    "Cargo.lock",
    ".cargo/config.toml",
    "rt",
    "net",
    "cpu",
    "kv",
    "stream",
    "nondet",
];

fn fail(msg: &str) -> ! {
    eprintln!("error: building the guests (guests/) failed: {msg}");
    process::exit(1);
}

fn main() {
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| fail("CARGO_MANIFEST_DIR is not set"));
    let ws_root = manifest_dir
        .parent()
        .unwrap_or_else(|| fail("vmm-core has no parent directory"))
        .to_path_buf();
    let guests_dir = ws_root.join("guests");
    let target_dir = ws_root.join("target").join("guests");

    println!("cargo:rerun-if-changed=build.rs");
    for w in WATCHED {
        println!("cargo:rerun-if-changed={}", guests_dir.join(w).display());
    }
    // The guest ABI crate the guests depend on by path (outside guests/).
    println!("cargo:rerun-if-changed={}", ws_root.join("abi").display());

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--manifest-path")
        .arg(guests_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&guests_dir);
    for var in REMOVED_ENV {
        cmd.env_remove(var);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run cargo: {e}")));
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        fail(&format!(
            "`cargo build --release --target {GUEST_TARGET} --manifest-path {}` exited with {} \
             (its output is above)",
            guests_dir.join("Cargo.toml").display(),
            out.status
        ));
    }

    let bin_dir = target_dir.join(GUEST_TARGET).join("release");
    for (name, var) in GUESTS {
        let path = bin_dir.join(name);
        if let Err(msg) = check_elf(&path) {
            fail(&format!("{}: {msg}", path.display()));
        }
        println!("cargo:rustc-env={var}={}", path.display());
    }
}

/// Checks that `path` is a static x86-64 executable the VMM's loader accepts.
fn check_elf(path: &Path) -> Result<(), String> {
    let elf = fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let u16_at = |off: usize| {
        elf.get(off..off + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |off: usize| {
        elf.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |off: usize| {
        elf.get(off..off + 8).map(|b| {
            let mut le = [0u8; 8];
            le.copy_from_slice(b);
            u64::from_le_bytes(le)
        })
    };
    if elf.get(..5) != Some(b"\x7fELF\x02".as_slice()) {
        return Err("not an ELF64 file".into());
    }
    match u16_at(16) {
        Some(2) => {}
        Some(3) => {
            return Err("ET_DYN (PIE): the guest rustflags were not applied \
                        (RUSTFLAGS or CARGO_ENCODED_RUSTFLAGS set?)"
                .into())
        }
        other => return Err(format!("ELF type {other:?}, want ET_EXEC (2)")),
    }
    if u16_at(18) != Some(0x3e) {
        return Err("not an x86-64 image".into());
    }
    let phoff = u64_at(32).ok_or("truncated header")? as usize;
    let phentsize = usize::from(u16_at(54).ok_or("truncated header")?);
    let phnum = usize::from(u16_at(56).ok_or("truncated header")?);
    for i in 0..phnum {
        match u32_at(phoff + i * phentsize).ok_or("truncated program headers")? {
            2 => return Err("has PT_DYNAMIC: not a static image".into()),
            3 => return Err("has PT_INTERP: not a static image".into()),
            _ => {}
        }
    }
    Ok(())
}
