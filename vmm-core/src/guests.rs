//! The guest programs of `guests/`, embedded in the VMM at build time.

/// The embedded ELF image of a guest by name (`kv`, `cpu`, `stream`), if it was built.
pub fn by_name(_name: &str) -> Option<&'static [u8]> {
    None
}
