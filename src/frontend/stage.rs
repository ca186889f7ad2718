//! How far to bring the device up: the stages, by number and name.

use std::fmt;
use std::str::FromStr;

/// How far to bring the device up. Each stage runs the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Setup = 0,
    Config = 1,
    Memory = 2,
    Virtqueue = 3,
    Copy = 4,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Setup,
        Stage::Config,
        Stage::Memory,
        Stage::Virtqueue,
        Stage::Copy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Setup => "setup",
            Stage::Config => "config",
            Stage::Memory => "memory",
            Stage::Virtqueue => "virtqueue",
            Stage::Copy => "copy",
        }
    }

    pub fn number(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Stage {
    type Err = String;

    /// A stage number (0-4) or name (setup, config, memory, virtqueue, copy), case-insensitive.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let s = s.trim();
        Stage::ALL
            .iter()
            .copied()
            .find(|st| st.name().eq_ignore_ascii_case(s) || st.number().to_string() == s)
            .ok_or_else(|| {
                format!(
                    "unknown stage {s:?}: expected 0-4 or setup, config, memory, virtqueue, copy"
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_parsing() {
        assert_eq!("0".parse::<Stage>().unwrap(), Stage::Setup);
        assert_eq!("Copy".parse::<Stage>().unwrap(), Stage::Copy);
        assert_eq!("virtqueue".parse::<Stage>().unwrap(), Stage::Virtqueue);
        assert_eq!("3".parse::<Stage>().unwrap(), Stage::Virtqueue);
        assert!("5".parse::<Stage>().is_err());
        assert!("nope".parse::<Stage>().is_err());
    }
}
