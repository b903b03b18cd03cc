//! A human-readable view of a snapshot: pretty JSON with the feature bits, the status byte
//! and the MAC decoded (what `tapir state inspect FILE` prints).

use serde::Serialize;

use crate::snapshot::DeviceSnapshot;

/// Names of the virtio and virtio-net feature bits (virtio 1.2, 5.1.3 and 6), by bit.
const FEATURE_NAMES: &[(u32, &str)] = &[
    (0, "CSUM"),
    (1, "GUEST_CSUM"),
    (2, "CTRL_GUEST_OFFLOADS"),
    (3, "MTU"),
    (5, "MAC"),
    (6, "GSO"),
    (7, "GUEST_TSO4"),
    (8, "GUEST_TSO6"),
    (9, "GUEST_ECN"),
    (10, "GUEST_UFO"),
    (11, "HOST_TSO4"),
    (12, "HOST_TSO6"),
    (13, "HOST_ECN"),
    (14, "HOST_UFO"),
    (15, "MRG_RXBUF"),
    (16, "STATUS"),
    (17, "CTRL_VQ"),
    (18, "CTRL_RX"),
    (19, "CTRL_VLAN"),
    (20, "CTRL_RX_EXTRA"),
    (21, "GUEST_ANNOUNCE"),
    (22, "MQ"),
    (23, "CTRL_MAC_ADDR"),
    (24, "NOTIFY_ON_EMPTY"),
    (27, "ANY_LAYOUT"),
    (28, "RING_INDIRECT_DESC"),
    (29, "RING_EVENT_IDX"),
    (32, "VERSION_1"),
    (33, "ACCESS_PLATFORM"),
    (34, "RING_PACKED"),
    (35, "IN_ORDER"),
    (36, "ORDER_PLATFORM"),
    (37, "SR_IOV"),
    (38, "NOTIFICATION_DATA"),
    (39, "NOTIF_CONFIG_DATA"),
    (40, "RING_RESET"),
    (41, "ADMIN_VQ"),
    (50, "DEVICE_STATS"),
    (52, "VQ_NOTF_COAL"),
    (53, "NOTF_COAL"),
    (54, "GUEST_USO4"),
    (55, "GUEST_USO6"),
    (56, "HOST_USO"),
    (57, "HASH_REPORT"),
    (59, "GUEST_HDRLEN"),
    (60, "RSS"),
    (61, "RSC_EXT"),
    (62, "STANDBY"),
    (63, "SPEED_DUPLEX"),
];

/// Names of the device status bits (virtio 1.2, 2.1).
const STATUS_NAMES: &[(u8, &str)] = &[
    (1, "ACKNOWLEDGE"),
    (2, "DRIVER"),
    (4, "DRIVER_OK"),
    (8, "FEATURES_OK"),
    (64, "DEVICE_NEEDS_RESET"),
    (128, "FAILED"),
];

/// The names of the feature bits set in `features`, in bit order; a bit without a name is
/// shown as `"bit N"`.
#[must_use]
pub fn feature_names(features: u64) -> Vec<String> {
    (0..64u32)
        .filter(|bit| features & (1u64 << bit) != 0)
        .map(|bit| {
            FEATURE_NAMES
                .iter()
                .find(|(b, _)| *b == bit)
                .map_or_else(|| format!("bit {bit}"), |(_, name)| (*name).to_owned())
        })
        .collect()
}

/// The names of the status bits set in `status`; an unnamed bit is shown as `"bit N"`.
#[must_use]
pub fn status_names(status: u8) -> Vec<String> {
    (0..8u32)
        .filter_map(|bit| {
            let mask = 1u8.checked_shl(bit)?;
            if status & mask == 0 {
                return None;
            }
            Some(
                STATUS_NAMES
                    .iter()
                    .find(|(m, _)| *m == mask)
                    .map_or_else(|| format!("bit {bit}"), |(_, name)| (*name).to_owned()),
            )
        })
        .collect()
}

/// What [`to_json`] prints: the decoded fields first, then the snapshot as it is.
#[derive(Serialize)]
struct View<'a> {
    decoded: Decoded,
    #[serde(flatten)]
    snapshot: &'a DeviceSnapshot,
}

#[derive(Serialize)]
struct Decoded {
    features: Vec<String>,
    status: Vec<String>,
    mac: String,
}

/// Pretty JSON of `s`: every field as stored (numbers stay numbers, so in-flight heads are
/// plain integers), preceded by a `decoded` object with the feature and status names and
/// the MAC written `aa:bb:cc:dd:ee:ff`.
#[must_use]
pub fn to_json(s: &DeviceSnapshot) -> String {
    let [a, b, c, d, e, f] = s.mac;
    let view = View {
        decoded: Decoded {
            features: feature_names(s.features),
            status: status_names(s.status),
            mac: format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}"),
        },
        snapshot: s,
    };
    // Serializing plain structs with string keys into a String cannot fail; should it ever,
    // say so in the output rather than panic.
    serde_json::to_string_pretty(&view)
        .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
}
