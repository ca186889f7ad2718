//! What every layer's channel does around the channel below it, written once: a layer only
//! says what happens to an operation on the way down ([`Layer::add`]) and to a completion on
//! the way up ([`Layer::reap`]).

use std::io;

use super::{Completion, IoBuf, IoChannel, IoOp, Notifier};

/// The channel below a layer's channel, and the operations the layer finished without it.
pub struct Below {
    channel: Box<dyn IoChannel>,
    /// Completions reaped from `channel`; kept to reuse the allocation.
    reaped: Vec<Completion>,
    /// Finished here (refused, say), returned by the next poll.
    ready: Vec<Completion>,
}

impl Below {
    pub fn new(channel: Box<dyn IoChannel>) -> Self {
        Below {
            channel,
            reaped: Vec::new(),
            ready: Vec::new(),
        }
    }

    /// Sends `op` down under the layer's own id `key`.
    pub fn add(&mut self, key: u64, op: IoOp) {
        self.channel.add(key, op);
    }

    /// Finishes operation `id` from above without sending anything down; the next poll
    /// returns it (callers poll after submitting, so no notification is needed).
    pub fn finish(&mut self, id: u64, result: Result<(), i32>, buf: Option<IoBuf>) {
        self.ready.push(Completion { id, result, buf });
    }

    pub fn submit(&mut self) -> io::Result<()> {
        self.channel.submit()
    }

    /// Moves the operations finished here to `out`, then hands each completion from below to
    /// `reap` (which pushes what it finishes onto `out`).
    pub fn poll(
        &mut self,
        out: &mut Vec<Completion>,
        mut reap: impl FnMut(Completion, &mut Vec<Completion>),
    ) {
        out.append(&mut self.ready);
        self.channel.poll(&mut self.reaped);
        for c in self.reaped.drain(..) {
            reap(c, out);
        }
    }

    pub fn wait(&mut self) -> io::Result<()> {
        if !self.ready.is_empty() {
            return Ok(());
        }
        self.channel.wait()
    }

    /// Operations in flight below plus those finished here, not yet polled.
    pub fn in_flight(&self) -> usize {
        self.channel.in_flight() + self.finished()
    }

    /// Operations finished here, not yet polled.
    pub fn finished(&self) -> usize {
        self.ready.len()
    }

    pub fn notifier(&self) -> &Notifier {
        self.channel.notifier()
    }
}

/// What a layer does to the operations passing through it; [`LayerChannel`] does the rest.
/// (A layer with more than one channel below, or requests that wait for something else, can
/// implement [`IoChannel`] itself around a [`Below`].)
pub trait Layer: Send {
    /// Takes operation `id` from above: sends what it needs down through `below`, under ids
    /// of the layer's own, or finishes it there.
    fn add(&mut self, below: &mut Below, id: u64, op: IoOp);
    /// Accounts one completion from below; pushes the operations it finishes onto `out`.
    fn reap(&mut self, c: Completion, out: &mut Vec<Completion>);
    /// Told when the channel submits what was added, so a layer can count what is pending.
    fn submitted(&mut self) {}
    /// Operations added and not yet returned by poll. The default suits a layer that sends
    /// every operation down at once; a layer that keeps work of its own counts it itself.
    fn in_flight(&self, below: &Below) -> usize {
        below.in_flight()
    }
    /// Whether the layer has work it can do at once (held-back completions, operations waiting
    /// for room): `wait` then returns without blocking, and the next poll does it. A layer that
    /// has such work outside a poll must signal the notifier, so that the caller polls again.
    fn has_work(&self) -> bool {
        false
    }
    /// Does the layer's own pending work at the start of every poll, before the completions
    /// from below are reaped.
    fn resume(&mut self, _below: &mut Below, _out: &mut Vec<Completion>) {}
}

/// A layer's channel: `L` over the channel below.
pub struct LayerChannel<L> {
    layer: L,
    below: Below,
}

impl<L: Layer> LayerChannel<L> {
    pub fn new(layer: L, below: Box<dyn IoChannel>) -> Self {
        LayerChannel {
            layer,
            below: Below::new(below),
        }
    }
}

impl<L: Layer> IoChannel for LayerChannel<L> {
    fn add(&mut self, id: u64, op: IoOp) {
        self.layer.add(&mut self.below, id, op);
    }

    fn submit(&mut self) -> io::Result<()> {
        self.layer.submitted();
        self.below.submit()
    }

    fn poll(&mut self, out: &mut Vec<Completion>) {
        let layer = &mut self.layer;
        layer.resume(&mut self.below, out);
        self.below.poll(out, |c, out| layer.reap(c, out));
    }

    fn wait(&mut self) -> io::Result<()> {
        if self.layer.has_work() {
            return Ok(());
        }
        self.below.wait()
    }

    fn in_flight(&self) -> usize {
        self.layer.in_flight(&self.below)
    }

    fn notifier(&self) -> &Notifier {
        self.below.notifier()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::block::testing::{pattern, Fault, MemDevice};
    use crate::block::BlockDevice;

    /// Refuses flushes, passes the rest through.
    struct NoFlush;

    impl Layer for NoFlush {
        fn add(&mut self, below: &mut Below, id: u64, op: IoOp) {
            match op {
                IoOp::Flush => below.finish(id, Err(libc::EROFS), None),
                op => below.add(id, op),
            }
        }
        fn reap(&mut self, c: Completion, out: &mut Vec<Completion>) {
            out.push(c);
        }
    }

    #[test]
    fn finished_here_is_polled_first_and_does_not_wait_for_below() {
        let mem = MemDevice::new(64);
        mem.on_nth(0, Fault::Delay(Duration::from_millis(700)));
        let notifier = Notifier::new().unwrap();
        let below = mem.new_channel_with(notifier.clone()).unwrap();
        let mut ch = LayerChannel::new(NoFlush, below);
        assert_eq!(ch.notifier().as_raw_fd(), notifier.as_raw_fd());
        let write = IoOp::Write {
            sector: 0,
            buf: pattern(512, 1),
        };
        ch.add(1, write);
        ch.add(2, IoOp::Flush);
        ch.submit().unwrap();
        assert_eq!(ch.in_flight(), 2);
        let t0 = Instant::now();
        ch.wait().unwrap();
        assert!(t0.elapsed() < Duration::from_millis(500));
        let mut done = Vec::new();
        ch.poll(&mut done);
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].id, done[0].result), (2, Err(libc::EROFS)));
        assert_eq!(ch.in_flight(), 1);
        // The write below completes through the same notifier.
        assert!(notifier.wait(Duration::from_secs(5)));
        ch.poll(&mut done);
        assert_eq!((done[1].id, done[1].result), (1, Ok(())));
        assert_eq!(ch.in_flight(), 0);
    }
}
