//! ZeroMQ transport (in progress).
