//! Moving a disk host to host: ubiblk v0.5's remote stripe protocol (version 1, TLS 1.2 with
//! an external PSK), its server, and the gate that keeps a copy at one point in time.
//!
//! - [`protocol`]: the wire format (requests, statuses, the metadata blob), for both sides;
//! - [`tls`]: the PSK (`psk_identity`, `psk_file`) and TLS-PSK streams (the `openssl` crate);
//! - [`gate`]: the one-point-in-time rule between the VM's rings and stripe reads;
//! - [`server`]: the stripe server a backend runs with `stripe_server:` (its client, the
//!   `ubiblk://` source, is in [`crate::lazy::source`]).

pub mod gate;
pub mod protocol;
pub mod server;
pub mod tls;

pub use gate::MoveGate;
pub use protocol::Geometry;
pub use tls::Psk;
