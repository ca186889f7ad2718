//! Virtio and vhost-user protocol feature bits: which ones this frontend acks, and their names
//! for printing.

use std::fmt;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Virtio feature bits this frontend can use (others are never acked).
pub fn wanted_features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_RO,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
    ]
    .iter()
    .fold(
        VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        |acc, b| acc | 1u64 << b,
    )
}

/// Protocol features this frontend can use.
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
}

const VIRTIO_FEATURE_NAMES: &[(u32, &str)] = &[
    (VIRTIO_BLK_F_BARRIER, "BARRIER"),
    (VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
    (VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
    (VIRTIO_BLK_F_GEOMETRY, "GEOMETRY"),
    (VIRTIO_BLK_F_RO, "RO"),
    (VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
    (VIRTIO_BLK_F_SCSI, "SCSI"),
    (VIRTIO_BLK_F_FLUSH, "FLUSH"),
    (VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
    (VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"),
    (VIRTIO_BLK_F_MQ, "MQ"),
    (VIRTIO_BLK_F_DISCARD, "DISCARD"),
    (VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
    (15, "LIFETIME"),
    (16, "SECURE_ERASE"),
    (17, "ZONED"),
    (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
    (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
    (30, "PROTOCOL_FEATURES"),
    (VIRTIO_F_VERSION_1, "VERSION_1"),
    (33, "ACCESS_PLATFORM"),
    (34, "RING_PACKED"),
    (35, "IN_ORDER"),
    (36, "ORDER_PLATFORM"),
    (37, "SR_IOV"),
    (38, "NOTIFICATION_DATA"),
    (39, "NOTIF_CONFIG_DATA"),
    (40, "RING_RESET"),
];

/// Names of the set bits of a virtio feature word (virtio-blk and transport bits);
/// unknown bits show as `bit<N>`.
pub fn virtio_feature_names(bits: u64) -> Vec<String> {
    (0..64u32)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| {
            VIRTIO_FEATURE_NAMES
                .iter()
                .find(|(bit, _)| *bit == b)
                .map(|(_, n)| n.to_string())
                .unwrap_or_else(|| format!("bit{b}"))
        })
        .collect()
}

/// Names of the set bits of a vhost-user protocol feature word.
pub fn protocol_feature_names(bits: u64) -> Vec<String> {
    let known = VhostUserProtocolFeatures::from_bits_truncate(bits);
    let mut names: Vec<String> = known.iter_names().map(|(n, _)| n.to_string()).collect();
    let unknown = bits & !known.bits();
    names.extend(
        (0..64u32)
            .filter(|b| unknown & (1u64 << b) != 0)
            .map(|b| format!("bit{b}")),
    );
    names
}

pub(super) fn fmt_features(
    f: &mut fmt::Formatter<'_>,
    label: &str,
    bits: u64,
    names: &[String],
) -> fmt::Result {
    writeln!(f, "  {label}: {bits:#018x} [{}]", names.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_names() {
        let n = virtio_feature_names(1 << 32 | 1 << 2 | 1 << 63);
        assert_eq!(n, vec!["SEG_MAX", "VERSION_1", "bit63"]);
        let p = protocol_feature_names(
            (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG).bits(),
        );
        assert!(p.contains(&"MQ".to_string()) && p.contains(&"CONFIG".to_string()));
    }
}
