//! Network namespaces for tests (see xdp engineer).
