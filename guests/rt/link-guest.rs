//! Build script shared by every guest binary (`build = "../rt/link-guest.rs"` in their
//! Cargo.toml): links the guest as a static, non-PIE ELF at 0x10000 with the runtime's linker script.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let script = format!("{dir}/../rt/link.ld");
    println!("cargo:rerun-if-changed={script}");
    for arg in [
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        &format!("-T{script}"),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
