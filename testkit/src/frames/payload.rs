//! The verifiable payload every UDP and TCP frame built here carries: a 12-byte header (the
//! sequence number, then the flow id) and a pattern derived from the sequence number.

/// Offset of the sequence number (u64 LE) within the payload.
pub const PAYLOAD_SEQ_OFF: usize = 0;
/// Offset of the flow id (u32 LE) within the payload.
pub const PAYLOAD_FLOW_OFF: usize = 8;
/// Length of the seq + flow payload header.
pub const PAYLOAD_HDR_LEN: usize = 12;

/// Errors from [`verify_payload`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Shorter than the seq/flow header.
    #[error("payload of {0} bytes is shorter than the {PAYLOAD_HDR_LEN}-byte header")]
    TooShort(usize),
    /// A pattern byte differs.
    #[error(
        "flow {flow} seq {seq}: payload byte {offset} is {got:#04x}, expected {expected:#04x}"
    )]
    Mismatch {
        /// Flow id from the header.
        flow: u32,
        /// Sequence number from the header.
        seq: u64,
        /// Offset within the payload.
        offset: usize,
        /// Expected byte.
        expected: u8,
        /// Received byte.
        got: u8,
    },
}

#[inline]
fn pattern_word(seq: u64, k: u64) -> u64 {
    (seq ^ 0x5bd1_e995_a5a5_5a5a)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(k.wrapping_mul(0xd6e8_feb8_6659_fd93))
}

/// The expected pattern byte at payload offset `i` (`i >= PAYLOAD_HDR_LEN`).
#[inline]
#[must_use]
pub fn pattern_byte(seq: u64, i: usize) -> u8 {
    let k = u64::try_from(i / 8).unwrap_or(0);
    pattern_word(seq, k).to_le_bytes()[i % 8]
}

/// Fills `payload` with the seq/flow header followed by the pattern for `seq`. A payload
/// shorter than [`PAYLOAD_HDR_LEN`] gets a truncated header.
pub fn write_payload(payload: &mut [u8], flow: u32, seq: u64) {
    let mut k = 0u64;
    let mut chunks = payload.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&pattern_word(seq, k).to_le_bytes());
        k += 1;
    }
    let rest = chunks.into_remainder();
    let w = pattern_word(seq, k).to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&w[..n]);
    let mut hdr = [0u8; PAYLOAD_HDR_LEN];
    hdr[PAYLOAD_SEQ_OFF..PAYLOAD_FLOW_OFF].copy_from_slice(&seq.to_le_bytes());
    hdr[PAYLOAD_FLOW_OFF..].copy_from_slice(&flow.to_le_bytes());
    let n = payload.len().min(PAYLOAD_HDR_LEN);
    payload[..n].copy_from_slice(&hdr[..n]);
}

/// Writes only the sequence number into the payload header.
pub fn write_payload_seq(payload: &mut [u8], seq: u64) {
    payload[PAYLOAD_SEQ_OFF..PAYLOAD_SEQ_OFF + 8].copy_from_slice(&seq.to_le_bytes());
}

/// Reads `(flow, seq)` from the payload header without checking the pattern.
#[must_use]
pub fn read_payload_header(payload: &[u8]) -> Option<(u32, u64)> {
    let h = payload.get(..PAYLOAD_HDR_LEN)?;
    let mut s = [0u8; 8];
    s.copy_from_slice(&h[PAYLOAD_SEQ_OFF..PAYLOAD_SEQ_OFF + 8]);
    let mut f = [0u8; 4];
    f.copy_from_slice(&h[PAYLOAD_FLOW_OFF..PAYLOAD_FLOW_OFF + 4]);
    Some((u32::from_le_bytes(f), u64::from_le_bytes(s)))
}

/// Verifies every byte of a payload built by [`write_payload`] and returns `(flow, seq)`.
///
/// # Errors
/// [`PayloadError::TooShort`] or the first mismatching byte.
pub fn verify_payload(payload: &[u8]) -> Result<(u32, u64), PayloadError> {
    let (flow, seq) = read_payload_header(payload).ok_or(PayloadError::TooShort(payload.len()))?;
    // Bytes 8..12 of the first word are the flow id; check from word 1 plus the pattern bytes
    // 12..16 of word 1 (PAYLOAD_HDR_LEN = 12 lies in word 1).
    for (k, c) in (1u64..).zip(payload[8..].chunks(8)) {
        let off = usize::try_from(k).unwrap_or(usize::MAX) * 8;
        let w = pattern_word(seq, k).to_le_bytes();
        for (j, (&got, &exp)) in c.iter().zip(w.iter()).enumerate() {
            let o = off + j;
            if o >= PAYLOAD_HDR_LEN && got != exp {
                return Err(PayloadError::Mismatch {
                    flow,
                    seq,
                    offset: o,
                    expected: exp,
                    got,
                });
            }
        }
    }
    Ok((flow, seq))
}
