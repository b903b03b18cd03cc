//! Frame building and parsing into caller-provided buffers (no allocation).
//!
//! Frames are Ethernet II + IPv4 (no options) + UDP / TCP / ICMP, or ARP. A
//! "frame length" always means the full Ethernet frame as written to a TAP
//! (destination MAC to last payload byte, no FCS, no vnet header): a 64-byte
//! UDP frame has an IPv4 total length of 50, a 1500-byte one 1486.
//!
//! UDP and TCP payloads produced here start with a 12-byte header — the
//! sequence number (u64 LE) at payload offset [`PAYLOAD_SEQ_OFF`] and the flow
//! id (u32 LE) at [`PAYLOAD_FLOW_OFF`] — followed by a pattern derived from the
//! sequence number, so a receiver can verify every byte with
//! [`verify_payload`].
//!
//! Frames written to / read from a TAP queue are preceded by the 12-byte
//! `virtio_net_hdr_v1`, see [`VnetHdr`].

use std::net::Ipv4Addr;

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// IPv4 header length (no options).
pub const IPV4_HLEN: usize = 20;
/// UDP header length.
pub const UDP_HLEN: usize = 8;
/// TCP header length (no options).
pub const TCP_HLEN: usize = 20;
/// ICMP echo header length.
pub const ICMP_HLEN: usize = 8;
/// Length of `virtio_net_hdr_v1` (with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of the L4 header in an Ethernet/IPv4 frame.
pub const L4_OFF: usize = ETH_HLEN + IPV4_HLEN;
/// Offset of the UDP payload in an Ethernet/IPv4/UDP frame.
pub const UDP_PAYLOAD_OFF: usize = L4_OFF + UDP_HLEN;
/// Offset of the TCP payload in an Ethernet/IPv4/TCP frame built here.
pub const TCP_PAYLOAD_OFF: usize = L4_OFF + TCP_HLEN;
/// Offset of the sequence number (u64 LE) within the payload.
pub const PAYLOAD_SEQ_OFF: usize = 0;
/// Offset of the flow id (u32 LE) within the payload.
pub const PAYLOAD_FLOW_OFF: usize = 8;
/// Length of the seq + flow payload header.
pub const PAYLOAD_HDR_LEN: usize = 12;
/// Smallest UDP frame built here: headers plus the seq/flow payload header.
pub const MIN_UDP_FRAME: usize = UDP_PAYLOAD_OFF + PAYLOAD_HDR_LEN;
/// Smallest TCP frame built here.
pub const MIN_TCP_FRAME: usize = TCP_PAYLOAD_OFF + PAYLOAD_HDR_LEN;
/// Largest frame (IPv4 total length 65535).
pub const MAX_FRAME: usize = ETH_HLEN + 65535;
/// Largest GSO super-frame a Linux device transmits unsegmented: `skb->len`
/// must stay below the default `gso_max_size` of 65536, so the whole Ethernet
/// frame is at most 65535 bytes (IPv4 total length 65521). Larger GSO frames
/// are segmented in software (and dropped on `PACKET_QDISC_BYPASS` sockets).
pub const MAX_GSO_FRAME: usize = 65535;
/// Minimum Ethernet frame length without FCS; ARP frames are padded to it.
pub const ETH_ZLEN: usize = 60;

/// Ethertype IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethertype ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// IP protocol ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol UDP.
pub const IPPROTO_UDP: u8 = 17;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP` (UFO, obsolete).
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (USO).
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN` flag bit.
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// Errors from frame builders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The output buffer is smaller than the frame.
    #[error("buffer too small: need {need} bytes, have {have}")]
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The requested frame is longer than IPv4 allows.
    #[error("frame length {0} exceeds {MAX_FRAME}")]
    TooLong(usize),
}

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

/// The 12-byte `virtio_net_hdr_v1` preceding every frame on a TAP queue fd (the datapath's
/// typed view).
pub use tapir_datapath::VirtioNetHdr as VnetHdr;

/// Writes `h` into the first 12 bytes of `buf`.
///
/// # Errors
/// [`FrameError::BufferTooSmall`].
pub fn write_vnet_hdr(h: &VnetHdr, buf: &mut [u8]) -> Result<(), FrameError> {
    check_len(buf, VNET_HDR_LEN)?;
    buf[..VNET_HDR_LEN].copy_from_slice(&h.to_bytes());
    Ok(())
}

/// Addresses and ports of a frame (ports unused for ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowSpec {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source IPv4 address.
    pub src_ip: Ipv4Addr,
    /// Destination IPv4 address.
    pub dst_ip: Ipv4Addr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
}

impl FlowSpec {
    /// The same flow in the opposite direction.
    #[must_use]
    pub fn reversed(&self) -> Self {
        Self {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            src_ip: self.dst_ip,
            dst_ip: self.src_ip,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

// ---------------------------------------------------------------------------
// Byte helpers

#[inline]
fn rd16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

#[inline]
fn wr16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
fn wr32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

#[inline]
fn mac_at(b: &[u8], off: usize) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[off..off + 6]);
    m
}

#[inline]
fn ip_at(b: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[off], b[off + 1], b[off + 2], b[off + 3])
}

fn check_len(buf: &[u8], need: usize) -> Result<(), FrameError> {
    if buf.len() < need {
        return Err(FrameError::BufferTooSmall {
            need,
            have: buf.len(),
        });
    }
    Ok(())
}

/// `v` as u16, for lengths already bounded by [`MAX_FRAME`].
#[inline]
fn len16(v: usize) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

// ---------------------------------------------------------------------------
// Checksums

/// Adds `data` to a running ones'-complement sum (unfolded, big-endian 16-bit
/// words; an odd trailing byte is padded with zero). Only the last chunk
/// summed may have odd length.
#[must_use]
pub fn csum_partial(data: &[u8], mut sum: u64) -> u64 {
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        sum += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        sum += u64::from(u16::from_be_bytes([rest[i], rest[i + 1]]));
        i += 2;
    }
    if i < rest.len() {
        sum += u64::from(rest[i]) << 8;
    }
    sum
}

/// Folds a running sum to 16 bits (not complemented).
#[must_use]
pub fn csum_fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves sum <= 0xffff.
    u16::try_from(sum).unwrap_or(u16::MAX)
}

/// The Internet checksum (RFC 1071) of `data`.
#[must_use]
pub fn checksum(data: &[u8]) -> u16 {
    !csum_fold(csum_partial(data, 0))
}

/// Unfolded IPv4 pseudo-header sum for an L4 segment of `l4_len` bytes.
#[must_use]
pub fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> u64 {
    let s = u64::from(u32::from(src));
    let d = u64::from(u32::from(dst));
    // l4_len is bounded by 65535 - 20 for frames built/parsed here.
    let len = u64::try_from(l4_len).unwrap_or(0);
    (s >> 16) + (s & 0xffff) + (d >> 16) + (d & 0xffff) + u64::from(proto) + len
}

/// Incrementally updates checksum `csum` for `old` bytes replaced by `new`
/// (same length, even, starting at an even offset of the checksummed area;
/// RFC 1624 eqn. 3). Never returns 0 (UDP "no checksum"); returns 0xffff instead.
#[must_use]
pub fn csum_replace(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u64::from(!csum);
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        sum += u64::from(!u16::from_be_bytes([o[0], o[1]]));
        sum += u64::from(u16::from_be_bytes([n[0], n[1]]));
    }
    match !csum_fold(sum) {
        0 => 0xffff,
        c => c,
    }
}

/// Verifies the IPv4 header checksum of an Ethernet/IPv4 frame.
#[must_use]
pub fn ipv4_header_ok(frame: &[u8]) -> bool {
    let Some(ip) = parse_ipv4(frame) else {
        return false;
    };
    csum_fold(csum_partial(&frame[ETH_HLEN..ip.l4_off], 0)) == 0xffff
}

/// Verifies the L4 (UDP/TCP/ICMP) checksum of an Ethernet/IPv4 frame. A UDP
/// checksum of 0 ("none") is accepted.
#[must_use]
pub fn l4_checksum_ok(frame: &[u8]) -> bool {
    let Some(ip) = parse_ipv4(frame) else {
        return false;
    };
    let seg = &frame[ip.l4_off..ip.end];
    let pseudo = match ip.proto {
        IPPROTO_UDP => {
            if seg.len() >= UDP_HLEN && rd16(seg, 6) == 0 {
                return true;
            }
            pseudo_header_sum(ip.src, ip.dst, IPPROTO_UDP, seg.len())
        }
        IPPROTO_TCP => pseudo_header_sum(ip.src, ip.dst, IPPROTO_TCP, seg.len()),
        IPPROTO_ICMP => 0,
        _ => return false,
    };
    csum_fold(csum_partial(seg, pseudo)) == 0xffff
}

// ---------------------------------------------------------------------------
// Payload pattern

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

/// Fills `payload` with the seq/flow header followed by the pattern for `seq`.
/// A payload shorter than [`PAYLOAD_HDR_LEN`] gets a truncated header.
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
    hdr[..8].copy_from_slice(&seq.to_le_bytes());
    hdr[8..].copy_from_slice(&flow.to_le_bytes());
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

/// Verifies every byte of a payload built by [`write_payload`] and returns
/// `(flow, seq)`.
///
/// # Errors
/// [`PayloadError::TooShort`] or the first mismatching byte.
pub fn verify_payload(payload: &[u8]) -> Result<(u32, u64), PayloadError> {
    let (flow, seq) = read_payload_header(payload).ok_or(PayloadError::TooShort(payload.len()))?;
    // Bytes 8..12 of the first word are the flow id; check from word 1 plus
    // the pattern bytes 12..16 of word 1 (PAYLOAD_HDR_LEN = 12 lies in word 1).
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

// ---------------------------------------------------------------------------
// Builders

fn write_eth(buf: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    buf[0..6].copy_from_slice(&dst);
    buf[6..12].copy_from_slice(&src);
    wr16(buf, 12, ethertype);
}

/// Writes an IPv4 header (DF, TTL 64) at `ETH_HLEN` with a correct checksum.
fn write_ipv4(buf: &mut [u8], spec: &FlowSpec, proto: u8, total_len: usize, id: u16) {
    let ip = &mut buf[ETH_HLEN..ETH_HLEN + IPV4_HLEN];
    ip[0] = 0x45;
    ip[1] = 0;
    wr16(ip, 2, len16(total_len));
    wr16(ip, 4, id);
    wr16(ip, 6, 0x4000);
    ip[8] = 64;
    ip[9] = proto;
    wr16(ip, 10, 0);
    ip[12..16].copy_from_slice(&spec.src_ip.octets());
    ip[16..20].copy_from_slice(&spec.dst_ip.octets());
    let c = checksum(ip);
    wr16(ip, 10, c);
}

fn clamp_frame(frame_len: usize, min: usize) -> Result<usize, FrameError> {
    if frame_len > MAX_FRAME {
        return Err(FrameError::TooLong(frame_len));
    }
    Ok(frame_len.max(min))
}

/// Writes the Ethernet and IPv4 headers of a `buf.len()`-byte frame; the IP id is the low 16
/// bits of `seq`.
fn write_eth_ipv4(buf: &mut [u8], spec: &FlowSpec, proto: u8, seq: u64) {
    write_eth(buf, spec.dst_mac, spec.src_mac, ETHERTYPE_IPV4);
    let ip_len = buf.len() - ETH_HLEN;
    #[allow(
        clippy::cast_possible_truncation,
        reason = "IP id is the low 16 bits of seq"
    )]
    write_ipv4(buf, spec, proto, ip_len, seq as u16);
}

/// Writes Ethernet + IPv4 + UDP header + payload, leaving the UDP checksum 0.
fn build_udp_common(
    buf: &mut [u8],
    spec: &FlowSpec,
    frame_len: usize,
    flow: u32,
    seq: u64,
) -> Result<usize, FrameError> {
    let len = clamp_frame(frame_len, MIN_UDP_FRAME)?;
    check_len(buf, len)?;
    let buf = &mut buf[..len];
    write_eth_ipv4(buf, spec, IPPROTO_UDP, seq);
    let udp = &mut buf[L4_OFF..];
    wr16(udp, 0, spec.src_port);
    wr16(udp, 2, spec.dst_port);
    wr16(udp, 4, len16(len - L4_OFF));
    wr16(udp, 6, 0);
    write_payload(&mut buf[UDP_PAYLOAD_OFF..], flow, seq);
    Ok(len)
}

/// Computes and stores the full UDP checksum of a frame built here.
fn fill_udp_checksum(frame: &mut [u8], spec_src: Ipv4Addr, spec_dst: Ipv4Addr) {
    let seg_len = frame.len() - L4_OFF;
    wr16(frame, L4_OFF + 6, 0);
    let sum = csum_partial(
        &frame[L4_OFF..],
        pseudo_header_sum(spec_src, spec_dst, IPPROTO_UDP, seg_len),
    );
    let c = match !csum_fold(sum) {
        0 => 0xffff,
        c => c,
    };
    wr16(frame, L4_OFF + 6, c);
}

/// Builds an Ethernet/IPv4/UDP frame of `frame_len` bytes (clamped to at least
/// [`MIN_UDP_FRAME`]) with correct IPv4 and UDP checksums and a seq/flow
/// payload. Returns the frame length.
///
/// # Errors
/// [`FrameError`] if `buf` is too small or the frame too long.
pub fn build_udp(
    buf: &mut [u8],
    spec: &FlowSpec,
    frame_len: usize,
    flow: u32,
    seq: u64,
) -> Result<usize, FrameError> {
    let len = build_udp_common(buf, spec, frame_len, flow, seq)?;
    fill_udp_checksum(&mut buf[..len], spec.src_ip, spec.dst_ip);
    Ok(len)
}

/// Like [`build_udp`] but with UDP checksum 0 ("no checksum").
///
/// # Errors
/// As [`build_udp`].
pub fn build_udp_nocsum(
    buf: &mut [u8],
    spec: &FlowSpec,
    frame_len: usize,
    flow: u32,
    seq: u64,
) -> Result<usize, FrameError> {
    build_udp_common(buf, spec, frame_len, flow, seq)
}

/// A frame with a partial (offloaded) L4 checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialCsumFrame {
    /// Frame length.
    pub len: usize,
    /// Offset of the L4 header (from the Ethernet header).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
    /// A matching vnet header (`NEEDS_CSUM`, plus GSO fields for TSO).
    pub vnet: VnetHdr,
}

/// Builds a UDP frame whose checksum field holds only the (folded, not
/// complemented) pseudo-header sum, as for `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
///
/// # Errors
/// As [`build_udp`].
pub fn build_udp_partial_csum(
    buf: &mut [u8],
    spec: &FlowSpec,
    frame_len: usize,
    flow: u32,
    seq: u64,
) -> Result<PartialCsumFrame, FrameError> {
    let len = build_udp_common(buf, spec, frame_len, flow, seq)?;
    let p = pseudo_header_sum(spec.src_ip, spec.dst_ip, IPPROTO_UDP, len - L4_OFF);
    wr16(buf, L4_OFF + 6, csum_fold(p));
    let csum_start = len16(L4_OFF);
    Ok(PartialCsumFrame {
        len,
        csum_start,
        csum_offset: 6,
        vnet: VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start,
            csum_offset: 6,
            ..VnetHdr::default()
        },
    })
}

/// Builds `[vnet hdr (all zero)][UDP frame]` for writing to a TAP queue.
/// Returns the total length including the header.
///
/// # Errors
/// As [`build_udp`].
pub fn build_udp_vnet(
    buf: &mut [u8],
    spec: &FlowSpec,
    frame_len: usize,
    flow: u32,
    seq: u64,
) -> Result<usize, FrameError> {
    check_len(buf, VNET_HDR_LEN)?;
    write_vnet_hdr(&VnetHdr::default(), buf)?;
    Ok(VNET_HDR_LEN + build_udp(&mut buf[VNET_HDR_LEN..], spec, frame_len, flow, seq)?)
}

/// Builds an Ethernet/IPv4/TCP frame of up to [`MAX_FRAME`] bytes for TSO:
/// ACK|PSH, TCP sequence `tcp_seq`, seq/flow payload, partial TCP checksum
/// (pseudo-header sum) and a vnet header with `NEEDS_CSUM` and, if the payload
/// exceeds `gso_size`, `GSO_TCPV4` (`hdr_len` 54).
///
/// # Errors
/// As [`build_udp`].
#[allow(clippy::too_many_arguments, reason = "a flat builder is simplest here")]
pub fn build_tcp_tso(
    buf: &mut [u8],
    spec: &FlowSpec,
    frame_len: usize,
    gso_size: u16,
    tcp_seq: u32,
    flow: u32,
    seq: u64,
) -> Result<PartialCsumFrame, FrameError> {
    let len = clamp_frame(frame_len, MIN_TCP_FRAME)?;
    check_len(buf, len)?;
    let buf = &mut buf[..len];
    write_eth_ipv4(buf, spec, IPPROTO_TCP, seq);
    let tcp = &mut buf[L4_OFF..];
    wr16(tcp, 0, spec.src_port);
    wr16(tcp, 2, spec.dst_port);
    wr32(tcp, 4, tcp_seq);
    wr32(tcp, 8, 1);
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x18; // PSH | ACK
    wr16(tcp, 14, 0xffff);
    wr16(tcp, 16, 0);
    wr16(tcp, 18, 0);
    write_payload(&mut buf[TCP_PAYLOAD_OFF..], flow, seq);
    let p = pseudo_header_sum(spec.src_ip, spec.dst_ip, IPPROTO_TCP, len - L4_OFF);
    wr16(buf, L4_OFF + 16, csum_fold(p));
    let payload_len = len - TCP_PAYLOAD_OFF;
    let gso = gso_size > 0 && payload_len > usize::from(gso_size);
    let csum_start = len16(L4_OFF);
    Ok(PartialCsumFrame {
        len,
        csum_start,
        csum_offset: 16,
        vnet: VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: if gso {
                VIRTIO_NET_HDR_GSO_TCPV4
            } else {
                VIRTIO_NET_HDR_GSO_NONE
            },
            hdr_len: if gso { len16(TCP_PAYLOAD_OFF) } else { 0 },
            gso_size: if gso { gso_size } else { 0 },
            csum_start,
            csum_offset: 16,
            num_buffers: 0,
        },
    })
}

/// ARP operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpOp {
    /// Who-has (1).
    Request,
    /// Is-at (2).
    Reply,
}

/// Builds an Ethernet ARP request (broadcast; target MAC zero) or reply
/// (unicast to `target_mac`), padded to [`ETH_ZLEN`]. Returns its length.
///
/// # Errors
/// [`FrameError::BufferTooSmall`].
pub fn build_arp(
    buf: &mut [u8],
    op: ArpOp,
    sender_mac: [u8; 6],
    sender_ip: Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
) -> Result<usize, FrameError> {
    check_len(buf, ETH_ZLEN)?;
    let buf = &mut buf[..ETH_ZLEN];
    let (dst, tha, code) = match op {
        ArpOp::Request => ([0xff; 6], [0u8; 6], 1),
        ArpOp::Reply => (target_mac, target_mac, 2),
    };
    write_eth(buf, dst, sender_mac, ETHERTYPE_ARP);
    let a = &mut buf[ETH_HLEN..];
    wr16(a, 0, 1); // Ethernet
    wr16(a, 2, ETHERTYPE_IPV4);
    a[4] = 6;
    a[5] = 4;
    wr16(a, 6, code);
    a[8..14].copy_from_slice(&sender_mac);
    a[14..18].copy_from_slice(&sender_ip.octets());
    a[18..24].copy_from_slice(&tha);
    a[24..28].copy_from_slice(&target_ip.octets());
    a[28..].fill(0);
    Ok(ETH_ZLEN)
}

/// A parsed ARP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpView {
    /// Operation.
    pub op: ArpOp,
    /// Sender hardware address.
    pub sender_mac: [u8; 6],
    /// Sender protocol address.
    pub sender_ip: Ipv4Addr,
    /// Target hardware address.
    pub target_mac: [u8; 6],
    /// Target protocol address.
    pub target_ip: Ipv4Addr,
}

/// Parses an Ethernet/ARP (IPv4 over Ethernet) frame.
#[must_use]
pub fn parse_arp(frame: &[u8]) -> Option<ArpView> {
    if frame.len() < ETH_HLEN + 28 || rd16(frame, 12) != ETHERTYPE_ARP {
        return None;
    }
    let a = &frame[ETH_HLEN..];
    if rd16(a, 0) != 1 || rd16(a, 2) != ETHERTYPE_IPV4 || a[4] != 6 || a[5] != 4 {
        return None;
    }
    let op = match rd16(a, 6) {
        1 => ArpOp::Request,
        2 => ArpOp::Reply,
        _ => return None,
    };
    Some(ArpView {
        op,
        sender_mac: mac_at(a, 8),
        sender_ip: ip_at(a, 14),
        target_mac: mac_at(a, 18),
        target_ip: ip_at(a, 24),
    })
}

/// ICMP echo direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoKind {
    /// Echo request (type 8).
    Request,
    /// Echo reply (type 0).
    Reply,
}

/// Builds an Ethernet/IPv4/ICMP echo frame with `payload_len` bytes of
/// payload (byte `i` = `i as u8`) and correct checksums. Returns its length.
///
/// # Errors
/// As [`build_udp`].
pub fn build_icmp_echo(
    buf: &mut [u8],
    spec: &FlowSpec,
    kind: EchoKind,
    ident: u16,
    seq: u16,
    payload_len: usize,
) -> Result<usize, FrameError> {
    let len = L4_OFF + ICMP_HLEN + payload_len;
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    check_len(buf, len)?;
    let buf = &mut buf[..len];
    write_eth(buf, spec.dst_mac, spec.src_mac, ETHERTYPE_IPV4);
    write_ipv4(buf, spec, IPPROTO_ICMP, len - ETH_HLEN, seq);
    let icmp = &mut buf[L4_OFF..];
    icmp[0] = match kind {
        EchoKind::Request => 8,
        EchoKind::Reply => 0,
    };
    icmp[1] = 0;
    wr16(icmp, 2, 0);
    wr16(icmp, 4, ident);
    wr16(icmp, 6, seq);
    for (i, b) in icmp[ICMP_HLEN..].iter_mut().enumerate() {
        #[allow(clippy::cast_possible_truncation, reason = "the pattern is i mod 256")]
        {
            *b = i as u8;
        }
    }
    let c = checksum(icmp);
    wr16(icmp, 2, c);
    Ok(len)
}

/// A parsed ICMP echo frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpEchoView<'a> {
    /// Request or reply.
    pub kind: EchoKind,
    /// Source IP.
    pub src: Ipv4Addr,
    /// Destination IP.
    pub dst: Ipv4Addr,
    /// Identifier.
    pub ident: u16,
    /// Sequence number.
    pub seq: u16,
    /// Payload after the 8-byte ICMP header.
    pub payload: &'a [u8],
}

/// Parses an Ethernet/IPv4/ICMP echo request or reply.
#[must_use]
pub fn parse_icmp_echo(frame: &[u8]) -> Option<IcmpEchoView<'_>> {
    let ip = parse_ipv4(frame)?;
    if ip.proto != IPPROTO_ICMP || ip.end - ip.l4_off < ICMP_HLEN {
        return None;
    }
    let icmp = &frame[ip.l4_off..ip.end];
    let kind = match (icmp[0], icmp[1]) {
        (8, 0) => EchoKind::Request,
        (0, 0) => EchoKind::Reply,
        _ => return None,
    };
    Some(IcmpEchoView {
        kind,
        src: ip.src,
        dst: ip.dst,
        ident: rd16(icmp, 4),
        seq: rd16(icmp, 6),
        payload: &icmp[ICMP_HLEN..],
    })
}

// ---------------------------------------------------------------------------
// Parsers

/// A parsed Ethernet/IPv4 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4View {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// IP protocol.
    pub proto: u8,
    /// Offset of the L4 header in the frame.
    pub l4_off: usize,
    /// End of the IP datagram in the frame (`ETH_HLEN + total length`).
    pub end: usize,
}

/// Parses the Ethernet and IPv4 headers (no VLAN). Trailing padding beyond the
/// IP total length is allowed.
#[must_use]
pub fn parse_ipv4(frame: &[u8]) -> Option<Ipv4View> {
    if frame.len() < ETH_HLEN + IPV4_HLEN || rd16(frame, 12) != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    if ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(rd16(ip, 2));
    if ihl < IPV4_HLEN || total < ihl || ETH_HLEN + total > frame.len() {
        return None;
    }
    Some(Ipv4View {
        src_mac: mac_at(frame, 6),
        dst_mac: mac_at(frame, 0),
        src: ip_at(ip, 12),
        dst: ip_at(ip, 16),
        proto: ip[9],
        l4_off: ETH_HLEN + ihl,
        end: ETH_HLEN + total,
    })
}

/// A parsed Ethernet/IPv4/UDP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpView<'a> {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source address.
    pub src_ip: Ipv4Addr,
    /// Destination address.
    pub dst_ip: Ipv4Addr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// UDP checksum field as found.
    pub checksum: u16,
    /// Offset of the payload in the frame.
    pub payload_off: usize,
    /// The UDP payload (bounded by the UDP length).
    pub payload: &'a [u8],
}

/// Parses an Ethernet/IPv4/UDP frame (unfragmented).
#[must_use]
pub fn parse_udp(frame: &[u8]) -> Option<UdpView<'_>> {
    let ip = parse_ipv4(frame)?;
    if ip.proto != IPPROTO_UDP || ip.end - ip.l4_off < UDP_HLEN {
        return None;
    }
    let udp = &frame[ip.l4_off..ip.end];
    let ulen = usize::from(rd16(udp, 4));
    if ulen < UDP_HLEN || ulen > udp.len() {
        return None;
    }
    let payload_off = ip.l4_off + UDP_HLEN;
    Some(UdpView {
        src_mac: ip.src_mac,
        dst_mac: ip.dst_mac,
        src_ip: ip.src,
        dst_ip: ip.dst,
        src_port: rd16(udp, 0),
        dst_port: rd16(udp, 2),
        checksum: rd16(udp, 6),
        payload_off,
        payload: &frame[payload_off..ip.l4_off + ulen],
    })
}

// ---------------------------------------------------------------------------
// In-place sequence rewriting (traffic generators)

/// How the L4 checksum of a template must be maintained when its payload
/// changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsumFixup {
    /// No payload-dependent checksum (UDP checksum 0, or a partial checksum
    /// that an offload completes).
    None,
    /// A full UDP checksum at this frame offset.
    Udp(usize),
}

/// Where a template frame's seq/flow payload lives, for cheap per-packet
/// rewriting by generators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadLoc {
    /// Offset of the L4 header.
    pub l4_off: usize,
    /// Offset of the payload.
    pub payload_off: usize,
    /// End of the payload.
    pub payload_end: usize,
    /// Checksum maintenance.
    pub fixup: CsumFixup,
    /// Unfolded pseudo-header sum (for full recomputation).
    pseudo: u64,
}

impl PayloadLoc {
    /// Locates the payload of an Ethernet/IPv4 UDP or TCP frame. `partial_csum`
    /// says the L4 checksum is completed by an offload (vnet `NEEDS_CSUM`) and
    /// so needs no maintenance. `None` if the frame is neither or its payload
    /// is shorter than [`PAYLOAD_HDR_LEN`].
    #[must_use]
    pub fn locate(frame: &[u8], partial_csum: bool) -> Option<Self> {
        let ip = parse_ipv4(frame)?;
        let seg_len = ip.end - ip.l4_off;
        let (payload_off, fixup) = match ip.proto {
            IPPROTO_UDP => {
                let u = parse_udp(frame)?;
                let fix = if partial_csum || u.checksum == 0 {
                    CsumFixup::None
                } else {
                    CsumFixup::Udp(ip.l4_off + 6)
                };
                (u.payload_off, fix)
            }
            IPPROTO_TCP if partial_csum && seg_len >= TCP_HLEN => {
                let doff = usize::from(frame[ip.l4_off + 12] >> 4) * 4;
                if doff < TCP_HLEN || doff > seg_len {
                    return None;
                }
                (ip.l4_off + doff, CsumFixup::None)
            }
            _ => return None,
        };
        if ip.end - payload_off < PAYLOAD_HDR_LEN {
            return None;
        }
        Some(Self {
            l4_off: ip.l4_off,
            payload_off,
            payload_end: ip.end,
            fixup,
            pseudo: pseudo_header_sum(ip.src, ip.dst, ip.proto, seg_len),
        })
    }

    /// Rewrites only the sequence number (8 bytes) and updates the checksum
    /// incrementally. O(1).
    pub fn set_seq(&self, frame: &mut [u8], seq: u64) {
        let off = self.payload_off + PAYLOAD_SEQ_OFF;
        let mut old = [0u8; 8];
        old.copy_from_slice(&frame[off..off + 8]);
        let new = seq.to_le_bytes();
        frame[off..off + 8].copy_from_slice(&new);
        if let CsumFixup::Udp(c) = self.fixup {
            // The payload starts at an even offset from the L4 header.
            if (off - self.l4_off) & 1 == 0 {
                let csum = rd16(frame, c);
                wr16(frame, c, csum_replace(csum, &old, &new));
            } else {
                self.recompute(frame);
            }
        }
    }

    /// Rewrites the whole payload (header + pattern) for `flow`/`seq` and
    /// recomputes the checksum if needed. O(payload).
    pub fn set_payload(&self, frame: &mut [u8], flow: u32, seq: u64) {
        write_payload(&mut frame[self.payload_off..self.payload_end], flow, seq);
        self.recompute(frame);
    }

    fn recompute(&self, frame: &mut [u8]) {
        if let CsumFixup::Udp(c) = self.fixup {
            wr16(frame, c, 0);
            let sum = csum_partial(&frame[self.l4_off..self.payload_end], self.pseudo);
            let v = match !csum_fold(sum) {
                0 => 0xffff,
                v => v,
            };
            wr16(frame, c, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FlowSpec {
        FlowSpec {
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_ip: Ipv4Addr::new(10, 0, 0, 2),
            dst_ip: Ipv4Addr::new(10, 0, 0, 1),
            src_port: 40000,
            dst_port: 9000,
        }
    }

    /// Straightforward RFC 1071 reference: 16-bit words, fold at the end.
    fn ref_csum(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        let mut i = 0;
        while i < data.len() {
            let hi = u32::from(data[i]) << 8;
            let lo = data.get(i + 1).map_or(0, |&b| u32::from(b));
            sum += hi | lo;
            i += 2;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !u16::try_from(sum).unwrap()
    }

    #[test]
    fn known_checksums() {
        // RFC 1071 example words.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(csum_fold(csum_partial(&d, 0)), 0xddf2);
        // A classic IPv4 header example (checksum 0xb861).
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), 0xb861);
        for len in 0..200 {
            let v: Vec<u8> = (0..len)
                .map(|i: u32| (i * 37 + 11).to_le_bytes()[0])
                .collect();
            assert_eq!(checksum(&v), ref_csum(&v), "len {len}");
        }
    }

    #[test]
    fn udp_build_parse_roundtrip() {
        let mut buf = vec![0u8; 2048];
        for &fl in &[0usize, 40, 54, 60, 64, 65, 128, 1500, 1514] {
            let len = build_udp(&mut buf, &spec(), fl, 7, 0x1122_3344_5566_7788).unwrap();
            assert_eq!(len, fl.max(MIN_UDP_FRAME));
            let f = &buf[..len];
            assert!(ipv4_header_ok(f));
            assert!(l4_checksum_ok(f));
            // Cross-check the UDP checksum against the reference over an
            // explicit pseudo header.
            let mut ph = Vec::new();
            ph.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1, 0, 17]);
            ph.extend_from_slice(&len16(len - L4_OFF).to_be_bytes());
            let mut seg = f[L4_OFF..].to_vec();
            seg[6] = 0;
            seg[7] = 0;
            ph.extend_from_slice(&seg);
            assert_eq!(rd16(f, L4_OFF + 6), ref_csum(&ph));
            assert_eq!(rd16(f, ETH_HLEN + 2), len16(len - ETH_HLEN));
            let u = parse_udp(f).unwrap();
            assert_eq!((u.src_port, u.dst_port), (40000, 9000));
            assert_eq!(u.src_ip, Ipv4Addr::new(10, 0, 0, 2));
            assert_eq!(u.dst_mac, spec().dst_mac);
            assert_eq!(u.payload.len(), len - UDP_PAYLOAD_OFF);
            assert_eq!(verify_payload(u.payload), Ok((7, 0x1122_3344_5566_7788)));
        }
        assert_eq!(build_udp(&mut buf, &spec(), 1500, 0, 0).unwrap(), 1500);
        assert_eq!(rd16(&buf, ETH_HLEN + 2), 1486);
        assert!(build_udp(&mut buf, &spec(), 4096, 0, 0).is_err());
        assert!(build_udp(&mut buf, &spec(), MAX_FRAME + 1, 0, 0).is_err());
    }

    #[test]
    fn payload_corruption_detected() {
        let mut buf = [0u8; 300];
        let len = build_udp(&mut buf, &spec(), 300, 3, 99).unwrap();
        let off = UDP_PAYLOAD_OFF;
        for i in [12usize, 13, 20, 100, len - off - 1] {
            let mut c = buf;
            c[off + i] ^= 0x40;
            match verify_payload(&c[off..len]) {
                Err(PayloadError::Mismatch {
                    offset, flow, seq, ..
                }) => {
                    assert_eq!((offset, flow, seq), (i, 3, 99));
                }
                r => panic!("{r:?}"),
            }
        }
        assert_eq!(
            verify_payload(&buf[off..off + 5]),
            Err(PayloadError::TooShort(5))
        );
        // Pattern differs between seqs.
        let mut b2 = [0u8; 300];
        build_udp(&mut b2, &spec(), 300, 3, 100).unwrap();
        assert_ne!(buf[off + 12..len], b2[off + 12..len]);
        assert_eq!(pattern_byte(99, 200), buf[off + 200]);
    }

    #[test]
    fn partial_and_nocsum() {
        let mut buf = [0u8; 1500];
        let p = build_udp_partial_csum(&mut buf, &spec(), 1000, 1, 5).unwrap();
        assert_eq!((p.csum_start, p.csum_offset), (34, 6));
        assert_eq!(p.vnet.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
        // Completing the checksum the way an offload does yields a valid frame.
        let start = usize::from(p.csum_start);
        let c = checksum(&buf[start..p.len]);
        wr16(&mut buf, start + 6, c);
        assert!(l4_checksum_ok(&buf[..p.len]));
        let n = build_udp_nocsum(&mut buf, &spec(), 100, 1, 5).unwrap();
        assert_eq!(rd16(&buf, L4_OFF + 6), 0);
        assert!(l4_checksum_ok(&buf[..n]));
        let n = build_udp_vnet(&mut buf, &spec(), 64, 1, 5).unwrap();
        assert_eq!(n, 76);
        assert_eq!(VnetHdr::parse(&buf).unwrap(), VnetHdr::default());
    }

    #[test]
    fn seq_rewrite_keeps_checksum_valid() {
        let mut buf = [0u8; 1514];
        for fl in [64usize, 65, 333, 1514] {
            let len = build_udp(&mut buf, &spec(), fl, 9, 0).unwrap();
            let f = &mut buf[..len];
            let loc = PayloadLoc::locate(f, false).unwrap();
            assert_eq!(loc.fixup, CsumFixup::Udp(L4_OFF + 6));
            for seq in [1u64, 2, u64::MAX, 0x8000_0000_0000_0000, 12345] {
                loc.set_seq(f, seq);
                assert!(l4_checksum_ok(f), "fl {fl} seq {seq}");
                assert_eq!(read_payload_header(&f[UDP_PAYLOAD_OFF..]), Some((9, seq)));
                loc.set_payload(f, 9, seq);
                assert!(l4_checksum_ok(f));
                assert_eq!(verify_payload(&f[UDP_PAYLOAD_OFF..]), Ok((9, seq)));
            }
        }
    }

    #[test]
    fn tcp_tso_frame() {
        let mut buf = vec![0u8; MAX_FRAME];
        let p = build_tcp_tso(&mut buf, &spec(), MAX_FRAME, 1448, 1000, 2, 77).unwrap();
        assert_eq!(p.len, MAX_FRAME);
        let f = &buf[..p.len];
        assert!(ipv4_header_ok(f));
        assert_eq!(rd16(f, ETH_HLEN + 2), 65535);
        assert_eq!(p.vnet.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(p.vnet.gso_size, 1448);
        assert_eq!(p.vnet.hdr_len, 54);
        assert_eq!((p.vnet.csum_start, p.vnet.csum_offset), (34, 16));
        assert_eq!(verify_payload(&f[TCP_PAYLOAD_OFF..]), Ok((2, 77)));
        // Completing the partial checksum gives a valid TCP checksum.
        let mut g = f.to_vec();
        let c = checksum(&g[34..]);
        wr16(&mut g, 34 + 16, c);
        assert!(l4_checksum_ok(&g));
        let loc = PayloadLoc::locate(f, true).unwrap();
        assert_eq!(loc.payload_off, TCP_PAYLOAD_OFF);
        // Small TCP frame: no GSO.
        let p = build_tcp_tso(&mut buf, &spec(), 200, 1448, 0, 0, 0).unwrap();
        assert_eq!(p.vnet.gso_type, VIRTIO_NET_HDR_GSO_NONE);
        let h = p.vnet.to_bytes();
        assert_eq!(VnetHdr::parse(&h), Some(p.vnet));
    }

    #[test]
    fn arp_and_icmp() {
        let mut buf = [0u8; 200];
        let s = spec();
        let n = build_arp(
            &mut buf,
            ArpOp::Request,
            s.src_mac,
            s.src_ip,
            [0; 6],
            s.dst_ip,
        )
        .unwrap();
        assert_eq!(n, ETH_ZLEN);
        assert_eq!(buf[..6], [0xff; 6]);
        let a = parse_arp(&buf[..n]).unwrap();
        assert_eq!(a.op, ArpOp::Request);
        assert_eq!((a.sender_ip, a.target_ip), (s.src_ip, s.dst_ip));
        let n = build_arp(
            &mut buf,
            ArpOp::Reply,
            s.dst_mac,
            s.dst_ip,
            s.src_mac,
            s.src_ip,
        )
        .unwrap();
        let a = parse_arp(&buf[..n]).unwrap();
        assert_eq!(a.op, ArpOp::Reply);
        assert_eq!(buf[..6], s.src_mac);
        assert_eq!(a.target_mac, s.src_mac);

        let n = build_icmp_echo(&mut buf, &s, EchoKind::Request, 0x1234, 7, 56).unwrap();
        assert_eq!(n, 14 + 20 + 8 + 56);
        assert!(ipv4_header_ok(&buf[..n]));
        assert!(l4_checksum_ok(&buf[..n]));
        assert_eq!(ref_csum(&buf[L4_OFF..n]), 0);
        let e = parse_icmp_echo(&buf[..n]).unwrap();
        assert_eq!(
            (e.kind, e.ident, e.seq, e.payload.len()),
            (EchoKind::Request, 0x1234, 7, 56)
        );
        let n = build_icmp_echo(&mut buf, &s.reversed(), EchoKind::Reply, 1, 2, 3).unwrap();
        let e = parse_icmp_echo(&buf[..n]).unwrap();
        assert_eq!((e.kind, e.src), (EchoKind::Reply, s.dst_ip));
        assert!(parse_udp(&buf[..n]).is_none());
        assert!(parse_arp(&buf[..n]).is_none());
    }
}
