//! The blob format: a fixed header, then a checksummed, versioned postcard payload.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "TAPIRSNP"
//!      8     2  format version, u16 LE (CURRENT_VERSION)
//!     10     2  reserved, u16, must be 0
//!     12     4  payload length, u32 LE (at most MAX_BLOB - HEADER_LEN)
//!     16     4  CRC-32 (IEEE, as crc32fast computes it) of the payload, u32 LE
//!     20     n  payload: postcard encoding of the version's snapshot type
//! ```
//!
//! # Versions
//!
//! - 1: the first format.
//! - 2: `QueuePairState::rx_carried`, the frames a source read from the TAP and could not
//!   deliver yet (version 1 snapshots upgrade with none).
//!
//! The public types in `snapshot.rs` are the payload of [`CURRENT_VERSION`]. When a change
//! to them alters the encoding (any added, removed, reordered or retyped field, or enum
//! variant inserted before the last), a new version is made like this:
//!
//! 1. copy the current types, unchanged, into a private `v1` module (frozen from then on);
//! 2. bump [`CURRENT_VERSION`] and change the public types;
//! 3. in [`decode_payload`], add an arm `1 => postcard_decode::<v1::DeviceSnapshot>(1,
//!    payload).map(upgrade_v1)`, where `upgrade_v1` converts a v1 snapshot into the current
//!    one (filling new fields with what a v1 source implied);
//! 4. keep a v1 golden blob in `tests/golden.rs` decoding.
//!
//! Callers only ever see [`decode`] and the current types. The result of an upgrade is
//! validated like any other snapshot. The encoder only writes the current version: a
//! successor is never older than its source in a handoff that is expected to work (an
//! older successor refuses the blob with [`StateError::FutureVersion`] and the source
//! carries on).

use crate::error::StateError;
use crate::snapshot::DeviceSnapshot;

mod v1;

/// The 8 bytes every blob starts with.
pub const MAGIC: [u8; 8] = *b"TAPIRSNP";
/// The format version [`encode`] writes and the newest [`decode`] reads.
pub const CURRENT_VERSION: u16 = 2;
/// The oldest format version [`decode`] reads.
pub const OLDEST_VERSION: u16 = 1;
/// Length of the fixed header in front of the payload.
pub const HEADER_LEN: usize = 20;
/// Largest blob (header and payload) accepted: 1 MiB. A larger length field is refused
/// before anything is read or allocated.
pub const MAX_BLOB: usize = 1 << 20;
/// Largest payload accepted: [`MAX_BLOB`] minus the header.
pub const MAX_PAYLOAD: usize = MAX_BLOB - HEADER_LEN;

/// The parsed fixed header of a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version of the payload.
    pub version: u16,
    /// Payload length in bytes.
    pub payload_len: u32,
    /// CRC-32 of the payload.
    pub checksum: u32,
}

impl Header {
    /// Reads and checks the header at the front of `bytes`: length, magic, version,
    /// reserved field and the length field's upper bound. The payload is not looked at.
    ///
    /// # Errors
    ///
    /// [`StateError::TooShort`], [`StateError::BadMagic`], [`StateError::FutureVersion`],
    /// [`StateError::UnsupportedVersion`], [`StateError::ReservedNonZero`],
    /// [`StateError::TooLarge`].
    pub fn parse(bytes: &[u8]) -> Result<Self, StateError> {
        Header::parse_as(MAGIC, OLDEST_VERSION, CURRENT_VERSION, bytes)
    }

    /// [`parse`](Self::parse) for another kind of blob (see [`seal`]): its own magic and
    /// range of format versions.
    ///
    /// # Errors
    ///
    /// As [`parse`](Self::parse).
    pub fn parse_as(
        expected_magic: [u8; 8],
        oldest: u16,
        newest: u16,
        bytes: &[u8],
    ) -> Result<Self, StateError> {
        let Some((header, _)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(StateError::TooShort {
                len: bytes.len(),
                need: HEADER_LEN,
            });
        };
        // A total pattern over the fixed-size array: no index can be out of range.
        let [m0, m1, m2, m3, m4, m5, m6, m7, v0, v1, r0, r1, l0, l1, l2, l3, c0, c1, c2, c3] =
            *header;
        let magic = [m0, m1, m2, m3, m4, m5, m6, m7];
        if magic != expected_magic {
            return Err(StateError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([v0, v1]);
        if version > newest {
            return Err(StateError::FutureVersion {
                found: version,
                supported: newest,
            });
        }
        if version < oldest {
            return Err(StateError::UnsupportedVersion {
                found: version,
                oldest,
            });
        }
        let reserved = u16::from_le_bytes([r0, r1]);
        if reserved != 0 {
            return Err(StateError::ReservedNonZero { found: reserved });
        }
        let payload_len = u32::from_le_bytes([l0, l1, l2, l3]);
        if usize::try_from(payload_len).map_or(true, |n| n > MAX_PAYLOAD) {
            return Err(StateError::TooLarge {
                len: u64::from(payload_len),
                max: u64::try_from(MAX_PAYLOAD).unwrap_or(u64::MAX),
            });
        }
        Ok(Self {
            version,
            payload_len,
            checksum: u32::from_le_bytes([c0, c1, c2, c3]),
        })
    }
}

/// Encodes `s` as a current-version blob. Does not validate: a source should use
/// [`try_encode`], which does; tests use this to build blobs of invalid snapshots.
///
/// A snapshot whose encoding exceeds [`MAX_BLOB`] yields a blob [`decode`] refuses
/// ([`StateError::TooLarge`]); [`try_encode`] reports it at the sender instead.
///
/// # Panics
///
/// Never in practice: postcard fails only for sequences of unknown length, a full fixed
/// buffer, or types it does not implement, and the snapshot types have none of those.
#[must_use]
pub fn encode(s: &DeviceSnapshot) -> Vec<u8> {
    #[allow(clippy::expect_used)] // see "# Panics": cannot fail for these types
    let payload = postcard::to_allocvec(s).expect("postcard encodes plain derived types");
    frame(MAGIC, CURRENT_VERSION, &payload)
}

/// Frames another kind of payload (the vhost-user session blob) the way snapshots are
/// framed: `magic`, format `version`, length and CRC-32, so that its reader gets the same
/// checks ([`unseal`]). The caller encodes the payload and knows its versions.
#[must_use]
pub fn seal(magic: [u8; 8], version: u16, payload: &[u8]) -> Vec<u8> {
    frame(magic, version, payload)
}

/// Checks a blob made by [`seal`]: magic, a version from `oldest` to `newest`, reserved
/// field, exact length (at most [`MAX_BLOB`]) and checksum. Returns the version and the
/// payload, for the caller to decode.
///
/// # Errors
///
/// The first check that fails, as its own [`StateError`] variant.
pub fn unseal(
    magic: [u8; 8],
    oldest: u16,
    newest: u16,
    bytes: &[u8],
) -> Result<(u16, &[u8]), StateError> {
    let header = Header::parse_as(magic, oldest, newest, bytes)?;
    let payload = payload_of(bytes, &header)?;
    let computed = crc32fast::hash(payload);
    if computed != header.checksum {
        return Err(StateError::Checksum {
            expected: header.checksum,
            computed,
        });
    }
    Ok((header.version, payload))
}

/// Validates `s`, encodes it and checks the blob fits [`MAX_BLOB`]: what a source sends.
///
/// # Errors
///
/// The validation error of `s`, or [`StateError::EncodedTooLarge`].
pub fn try_encode(s: &DeviceSnapshot) -> Result<Vec<u8>, StateError> {
    s.validate()?;
    let blob = encode(s);
    if blob.len() > MAX_BLOB {
        return Err(StateError::EncodedTooLarge {
            len: blob.len(),
            max: MAX_BLOB,
        });
    }
    Ok(blob)
}

/// Decodes and validates a blob: header, exact length, checksum, payload (upgraded from an
/// older format version if need be), then [`DeviceSnapshot::validate`].
///
/// Never panics, whatever `bytes` holds, and allocates nothing before the checksum matched.
///
/// # Errors
///
/// The first check that fails, as its own [`StateError`] variant.
pub fn decode(bytes: &[u8]) -> Result<DeviceSnapshot, StateError> {
    let s = decode_unvalidated(bytes)?;
    s.validate()?;
    Ok(s)
}

/// Like [`decode`] but without [`DeviceSnapshot::validate`]: for inspecting a blob that
/// framing accepts but validation refuses (`tapir state inspect`). Never resume from it.
///
/// # Errors
///
/// A framing or payload error.
pub fn decode_unvalidated(bytes: &[u8]) -> Result<DeviceSnapshot, StateError> {
    let header = Header::parse(bytes)?;
    let payload = payload_of(bytes, &header)?;
    let computed = crc32fast::hash(payload);
    if computed != header.checksum {
        return Err(StateError::Checksum {
            expected: header.checksum,
            computed,
        });
    }
    decode_payload(header.version, payload)
}

/// Prefixes `payload` with a header for `magic` and `version`.
fn frame(magic: [u8; 8], version: u16, payload: &[u8]) -> Vec<u8> {
    // A payload over 4 GiB cannot be described; u32::MAX makes decode refuse it as TooLarge.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut blob = Vec::with_capacity(HEADER_LEN.saturating_add(payload.len()));
    blob.extend_from_slice(&magic);
    blob.extend_from_slice(&version.to_le_bytes());
    blob.extend_from_slice(&0u16.to_le_bytes());
    blob.extend_from_slice(&len.to_le_bytes());
    blob.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    blob.extend_from_slice(payload);
    blob
}

/// The payload after the header, exactly `header.payload_len` bytes long.
fn payload_of<'a>(bytes: &'a [u8], header: &Header) -> Result<&'a [u8], StateError> {
    // Header::parse bounded payload_len by MAX_PAYLOAD, so it fits a usize.
    let expected = usize::try_from(header.payload_len).unwrap_or(usize::MAX);
    let body = bytes.get(HEADER_LEN..).unwrap_or_default();
    match body.len().cmp(&expected) {
        std::cmp::Ordering::Less => Err(StateError::Truncated {
            expected,
            found: body.len(),
        }),
        std::cmp::Ordering::Greater => Err(StateError::TrailingBytes {
            expected,
            extra: body.len().saturating_sub(expected),
        }),
        std::cmp::Ordering::Equal => Ok(body),
    }
}

/// Decodes a payload of format `version` into the current types: the one place that
/// knows every version (see the module docs for how a version is added).
fn decode_payload(version: u16, payload: &[u8]) -> Result<DeviceSnapshot, StateError> {
    match version {
        1 => postcard_decode::<v1::DeviceSnapshot>(1, payload).map(v1::upgrade),
        2 => postcard_decode::<DeviceSnapshot>(2, payload),
        // Header::parse refused every other version; keep the error honest anyway.
        found if found > CURRENT_VERSION => Err(StateError::FutureVersion {
            found,
            supported: CURRENT_VERSION,
        }),
        found => Err(StateError::UnsupportedVersion {
            found,
            oldest: OLDEST_VERSION,
        }),
    }
}

/// Decodes a whole payload as `T`: bytes left over are an error, not ignored.
fn postcard_decode<T: serde::de::DeserializeOwned>(
    version: u16,
    payload: &[u8],
) -> Result<T, StateError> {
    let (value, rest) = postcard::take_from_bytes::<T>(payload)
        .map_err(|source| StateError::Malformed { version, source })?;
    if !rest.is_empty() {
        return Err(StateError::PayloadTrailingBytes {
            version,
            unused: rest.len(),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod seal_tests {
    use super::*;

    #[test]
    fn a_sealed_payload_unseals_and_nothing_else_does() {
        let blob = seal(*b"TESTBLOB", 3, b"payload");
        assert_eq!(
            unseal(*b"TESTBLOB", 2, 3, &blob).unwrap(),
            (3, &b"payload"[..])
        );
        assert!(matches!(
            unseal(*b"OTHERMAG", 2, 3, &blob),
            Err(StateError::BadMagic { .. })
        ));
        assert!(matches!(
            unseal(*b"TESTBLOB", 1, 2, &blob),
            Err(StateError::FutureVersion { .. })
        ));
        let mut bad = blob.clone();
        if let Some(b) = bad.last_mut() {
            *b ^= 1;
        }
        assert!(matches!(
            unseal(*b"TESTBLOB", 2, 3, &bad),
            Err(StateError::Checksum { .. })
        ));
        let cut = blob.get(..blob.len() - 1).unwrap_or_default();
        assert!(matches!(
            unseal(*b"TESTBLOB", 2, 3, cut),
            Err(StateError::Truncated { .. })
        ));
    }
}
