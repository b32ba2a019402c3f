//! KVM virtual machine monitor with record/replay fault tolerance (under construction).
#![deny(missing_docs)]

pub mod ft;
pub mod guests;
