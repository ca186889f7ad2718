//! Integer fields bounded at parse time: a value out of range is reported with its range,
//! where serde alone would say "expected u16".

use serde::de::{self, Deserializer, Visitor};
use std::fmt;

use super::{
    MAX_FETCH_CONNECTIONS, MAX_NUM_QUEUES, MAX_POLL_QUEUE_TIMEOUT_US, MAX_QUEUE_SIZE,
    MAX_REQUEST_BYTES,
};

/// How an out-of-range integer is reported, at parse time and by [`Options::validate`].
pub(super) fn range_problem(lo: u64, hi: u64) -> String {
    format!("must be in {lo}..={hi}")
}

/// An integer field in `lo..=hi`: out of range (negative, too large for its type) is reported
/// with the range, where serde alone would say "expected u16".
fn ranged<'de, D, T>(d: D, lo: u64, hi: u64) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Range(u64, u64);
    impl Range {
        fn check<E: de::Error>(&self, v: Option<u64>) -> Result<u64, E> {
            v.filter(|v| (self.0..=self.1).contains(v))
                .ok_or_else(|| E::custom(range_problem(self.0, self.1)))
        }
    }
    impl Visitor<'_> for Range {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "an integer in {}..={}", self.0, self.1)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            self.check(Some(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            self.check(u64::try_from(v).ok())
        }
        fn visit_u128<E: de::Error>(self, v: u128) -> Result<u64, E> {
            self.check(u64::try_from(v).ok())
        }
        fn visit_i128<E: de::Error>(self, v: i128) -> Result<u64, E> {
            self.check(u64::try_from(v).ok())
        }
    }
    let v = d.deserialize_any(Range(lo, hi))?;
    T::try_from(v).map_err(|_| de::Error::custom(range_problem(lo, hi)))
}

pub(super) fn num_queues<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    ranged(d, 1, MAX_NUM_QUEUES.into())
}
pub(super) fn queue_size<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    ranged(d, 1, MAX_QUEUE_SIZE.into())
}
pub(super) fn seg_size_max<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, 512, MAX_REQUEST_BYTES)
}
pub(super) fn seg_count_max<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, 1, MAX_QUEUE_SIZE.into())
}
pub(super) fn poll_queue_timeout_us<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ranged(d, 0, MAX_POLL_QUEUE_TIMEOUT_US)
}
/// An optional integer field in `lo..=hi` (`null` is the same as leaving it out).
fn opt_ranged<'de, D, T>(d: D, lo: u64, hi: u64) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Opt<T>(u64, u64, std::marker::PhantomData<T>);
    impl<'de, T: TryFrom<u64>> Visitor<'de> for Opt<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "an integer in {}..={}", self.0, self.1)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            ranged(d, self.0, self.1).map(Some)
        }
    }
    d.deserialize_option(Opt(lo, hi, std::marker::PhantomData))
}

pub(super) fn autofetch_mib_per_sec<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<u32>, D::Error> {
    opt_ranged(d, 1, u32::MAX.into())
}
pub(super) fn fetch_connections<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    opt_ranged(d, 1, MAX_FETCH_CONNECTIONS.into())
}
pub(super) fn fetch_timeout_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    opt_ranged(d, 1, 3600)
}
pub(super) fn fetch_retry_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    opt_ranged(d, 0, 86400)
}
pub(super) fn handover_wait_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    opt_ranged(d, 1, 3600)
}
