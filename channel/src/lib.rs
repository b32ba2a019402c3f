//! Reliable log shipping between primary and backup over shm, TCP, io_uring and AF_XDP (under construction).
#![deny(missing_docs)]
