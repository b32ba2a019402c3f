//! Go-live: the backup taking over, and the primary continuing alone (issue #7; being built).
