//! `stream` (placeholder while the server lands).
#![no_std]
#![no_main]
use ftvm_guest_rt::{entry, println, BootInfo};
entry!(main);
fn main(_boot: &BootInfo) -> u64 {
    println!("stream: not implemented yet");
    1
}
