//! Telling the connected frontend that the config space changed (the disk grew):
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend request channel.
//!
//! The frontend hands that channel over with `SET_BACKEND_REQ_FD` (with `BACKEND_REQ`
//! negotiated). vhost-user-backend 0.24 passes it on as a `vhost::Backend`, whose 0.18 API has
//! no way to send this message, so the relay keeps a duplicate of the descriptor here and the
//! message (a bare header) is written by [`ConfigChange::notify`]. Nothing else is ever sent on
//! that channel, so the two never interleave. QEMU answers by reading the config space again
//! (GET_CONFIG) and, if the capacity changed, raising the guest's config interrupt.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: protocol version 1, no reply wanted.
const VERSION_1: u32 = 0x1;
/// A frontend that does not read its channel must not hold the control socket for long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The live connection's backend request channel, if the frontend gave one.
#[derive(Debug, Clone, Default)]
pub struct ConfigChange(Arc<Mutex<Option<UnixStream>>>);

impl ConfigChange {
    /// Keeps `channel` (the connection's) or forgets it (`None`, at disconnection).
    pub fn set(&self, channel: Option<UnixStream>) {
        if let Some(c) = &channel {
            if let Err(e) = c.set_write_timeout(Some(WRITE_TIMEOUT)) {
                log::warn!("backend request channel: cannot set a write timeout: {e}");
            }
        }
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = channel;
    }

    /// Sends the config-change message. `Ok(false)`: no frontend channel to send it on (no
    /// frontend, or one without `BACKEND_REQ`): the next connection reads the new config.
    pub fn notify(&self) -> io::Result<bool> {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(channel) = guard.as_mut() else {
            return Ok(false);
        };
        let mut header = [0u8; 12];
        header[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        header[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        // Bytes 8..12: the payload size, 0.
        if let Err(e) = channel.write_all(&header) {
            // A broken channel stays broken: forget it.
            *guard = None;
            return Err(e);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn notify_writes_a_bare_config_change_header_and_none_without_a_channel() {
        let c = ConfigChange::default();
        assert!(!c.notify().unwrap());
        let (ours, theirs) = UnixStream::pair().unwrap();
        c.set(Some(ours));
        assert!(c.notify().unwrap());
        let mut got = [0u8; 12];
        (&theirs).read_exact(&mut got).unwrap();
        assert_eq!(got, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        drop(theirs);
        // The peer is gone: an error, and the channel forgotten.
        assert!(c.notify().is_err());
        assert!(!c.notify().unwrap());
        c.set(None);
    }
}
