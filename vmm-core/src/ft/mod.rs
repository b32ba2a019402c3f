//! Fault tolerance: failure detection, arbiter, primary/backup roles (under construction).
