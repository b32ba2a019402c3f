//! Flow control and CPU throttling of the primary (issue #8; being built).
