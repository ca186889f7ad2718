//! `socket_mode` and `socket_group`: who may connect to the vhost socket.

use super::{field_err, ConfigError, Options};
use crate::sys::socket::SocketGroup;

impl Options {
    /// `socket_mode` as permission bits, [`crate::sys::socket::PRIVATE_MODE`] (0600) without it.
    /// Octal digits, optionally after `0o`. Bits outside 0777 and any bit for "other" users
    /// are refused: connecting needs write permission, and whoever can connect can read and
    /// write the whole disk.
    pub fn socket_mode(&self) -> Result<u32, ConfigError> {
        let Some(text) = &self.socket_mode else {
            return Ok(crate::sys::socket::PRIVATE_MODE);
        };
        let digits = text.trim();
        let digits = digits.strip_prefix("0o").unwrap_or(digits);
        let bad = || {
            field_err(
                "socket_mode",
                format!("{text:?} is not an octal mode such as \"0660\""),
            )
        };
        if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(bad());
        }
        // Too many digits for a u32 is outside 0777 too.
        let mode = u32::from_str_radix(digits, 8).unwrap_or(u32::MAX);
        if mode & !0o777 != 0 {
            return Err(field_err(
                "socket_mode",
                format!("{text} has bits outside 0777 (setuid, setgid, sticky)"),
            ));
        }
        if mode & 0o007 != 0 {
            return Err(field_err(
                "socket_mode",
                format!(
                    "{text} gives other users access (anyone who can connect can read and \
                     write the whole disk); use socket_group and at most 0770"
                ),
            ));
        }
        Ok(mode)
    }

    /// `socket_group`: all digits is a gid, anything else a group name.
    pub fn socket_group(&self) -> Result<Option<SocketGroup>, ConfigError> {
        let Some(text) = &self.socket_group else {
            return Ok(None);
        };
        let text = text.trim();
        if text.is_empty() {
            return Err(field_err("socket_group", "must not be empty"));
        }
        if text.bytes().all(|b| b.is_ascii_digit()) {
            // u32::MAX is chown's "leave the group alone".
            return match text.parse::<u32>() {
                Ok(gid) if gid != u32::MAX => Ok(Some(SocketGroup::Id(gid))),
                _ => Err(field_err(
                    "socket_group",
                    format!("gid {text} is out of range (at most 4294967294)"),
                )),
            };
        }
        if text.contains('\0') || text.contains(':') {
            return Err(field_err(
                "socket_group",
                format!("{text:?} is not a group name"),
            ));
        }
        Ok(Some(SocketGroup::Name(text.to_string())))
    }
}
