//! One point in time: a disk is copied away only while no VM runs on it, and no VM starts on
//! it while a copy is under way.
//!
//! The vhost relay reports each ring a frontend starts (SET_VRING_KICK) and stops (the reply
//! to GET_VRING_BASE, once the queue is drained), and that the frontend went away. The stripe
//! server asks before every READ_STRIPE: refused while any ring runs. The first stripe read
//! starts a *move*; from then on a ring start is refused (the relay closes that connection)
//! until the move is declared over or cancelled on the control socket (`move-end`).

use std::sync::Mutex;

/// Why a stripe read or a ring start was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("a VM's rings run on this disk")]
    RingsRunning,
    #[error("a move of this disk is under way (end it with `move-end` on the control socket)")]
    Moving,
}

#[derive(Debug, Default)]
struct State {
    /// Bit `q`: queue `q`'s ring runs.
    rings: u64,
    moving: bool,
    /// Stripes served since the move started.
    served: u64,
}

/// What `move-status` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GateStatus {
    pub moving: bool,
    pub rings_running: bool,
    pub stripes_served: u64,
}

#[derive(Debug, Default)]
pub struct MoveGate {
    state: Mutex<State>,
}

impl MoveGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A frontend starts ring `queue`: refused during a move.
    pub fn ring_started(&self, queue: u32) -> Result<(), Refused> {
        let mut s = self.lock();
        if s.moving {
            return Err(Refused::Moving);
        }
        s.rings |= 1u64.checked_shl(queue).unwrap_or(0);
        Ok(())
    }

    /// Ring `queue` stopped (drained).
    pub fn ring_stopped(&self, queue: u32) {
        self.lock().rings &= !1u64.checked_shl(queue).unwrap_or(0);
    }

    /// The frontend is gone: none of its rings runs.
    pub fn frontend_gone(&self) {
        self.lock().rings = 0;
    }

    /// Before a stripe is read for a client: refused while a ring runs; otherwise the move is
    /// (or stays) under way.
    pub fn stripe_read(&self) -> Result<(), Refused> {
        let mut s = self.lock();
        if s.rings != 0 {
            return Err(Refused::RingsRunning);
        }
        s.moving = true;
        s.served += 1;
        Ok(())
    }

    /// `move-end`: the move is over or cancelled; a VM may start again. Returns the status
    /// before.
    pub fn end_move(&self) -> GateStatus {
        let before = self.status();
        let mut s = self.lock();
        s.moving = false;
        s.served = 0;
        before
    }

    pub fn status(&self) -> GateStatus {
        let s = self.lock();
        GateStatus {
            moving: s.moving,
            rings_running: s.rings != 0,
            stripes_served: s.served,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_rings_exclude_each_other() {
        let g = MoveGate::default();
        g.ring_started(0).unwrap();
        g.ring_started(70).unwrap(); // out of the mask: ignored, not a panic
        assert_eq!(g.stripe_read(), Err(Refused::RingsRunning));
        assert!(!g.status().moving);
        g.ring_stopped(0);
        g.stripe_read().unwrap();
        assert_eq!(g.ring_started(1), Err(Refused::Moving));
        assert_eq!(
            g.status(),
            GateStatus {
                moving: true,
                rings_running: false,
                stripes_served: 1
            }
        );
        assert!(g.end_move().moving);
        g.ring_started(1).unwrap();
        assert_eq!(g.stripe_read(), Err(Refused::RingsRunning));
        g.frontend_gone();
        g.stripe_read().unwrap();
    }
}
