//! Tests that measure throughput, rates and CPU time through the real binary: busy polling
//! on shared cores ([`polling`]) and the QoS limits ([`qos`]). They are a binary of their own
//! so that no other test's load skews what they measure (cargo runs test binaries one after
//! another). Within it, [`exclusive`] and [`shared`] keep a polling test from overlapping any
//! other test, while the QoS tests, which use little CPU, run side by side.

#[path = "../../benches/common/mod.rs"]
mod bench;
#[path = "../common/mod.rs"]
mod common;

mod polling;
mod qos;

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static MEASURING: RwLock<()> = RwLock::new(());

/// Held by a test that must run alone (it loads every core and measures).
fn exclusive() -> RwLockWriteGuard<'static, ()> {
    MEASURING.write().unwrap_or_else(|p| p.into_inner())
}

/// Held by a test that may run beside others holding it, but not beside an [`exclusive`] one.
fn shared() -> RwLockReadGuard<'static, ()> {
    MEASURING.read().unwrap_or_else(|p| p.into_inner())
}
