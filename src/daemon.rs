//! daemon (in progress)
