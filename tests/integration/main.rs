//! The integration tests: one binary, one module per area, run in parallel by libtest.
//! `cargo test --release --test integration remote::` runs one area's tests.
//!
//! The rate and CPU measurements (tests/timing) and the real-guest tests (tests/guest) are
//! binaries of their own: cargo runs test binaries one after another, so nothing here runs
//! beside them.

#[path = "../common/mod.rs"]
mod common;

mod archive;
mod blkio;
mod config;
mod control;
mod debuglog;
mod dirty_log;
mod encryption;
mod flood;
mod frontend;
mod handover;
mod hardening;
mod lazy;
mod lazy_crash;
mod metadata;
mod outage;
mod postcopy;
mod qsd_client;
mod remote;
mod resize;
mod resize_lazy;
mod restart;
mod servers;
mod sockets;
mod source_identity;
mod standby;
mod stripe_server;
mod systemd;
