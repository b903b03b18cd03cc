//! Guest-physical and memfd layout, computed once from a [`GuestConfig`].
//!
//! Guest-physical address space:
//!
//! ```text
//! 0x0                    ring region: per virtqueue (rx0, tx0, rx1, tx1, ...)
//!                        desc table | avail ring | used ring [| TX indirect tables]
//!                        each part 4 KiB aligned
//! ring_region_size ..    hole (unbacked)
//! 0x1_0000_0000          buffer region: per pair RX chains, then TX slots,
//!                        then a 1 MiB scratch area at the end
//! ```
//!
//! Both regions live in ONE memfd: the buffer region at file offset 0, then an
//! unused 64 KiB gap, then the ring region. A device that ignores
//! `file_offset` therefore sees garbage for both regions.

use crate::config::GuestConfig;
use crate::error::Error;

/// Guest-physical base of the ring region.
pub const RING_REGION_GPA: u64 = 0;
/// Guest-physical base of the buffer region (a hole separates the two).
pub const BUFFER_REGION_GPA: u64 = 0x1_0000_0000;
/// Size of the scratch area at the end of the buffer region.
pub const SCRATCH_SIZE: u64 = 1 << 20;
/// Alignment of region sizes and file offsets (covers 4K/16K/64K pages).
const REGION_ALIGN: u64 = 64 << 10;
/// Unused gap in the memfd between the two regions.
const FILE_GAP: u64 = 64 << 10;
/// Alignment of each ring part.
const RING_ALIGN: u64 = 4096;
/// Alignment (and RX piece guard gap) of buffers.
const BUF_ALIGN: u64 = 64;
/// Size of one split-ring descriptor.
pub(crate) const DESC_SIZE: u64 = 16;

/// Guest-physical addresses of one split virtqueue's three parts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Where one virtqueue's structures live.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueLayout {
    pub rings: RingAddrs,
    /// First RX chain / TX slot buffer.
    pub buffers: u64,
    /// TX only: indirect table of slot 0 (0 when indirect is off).
    pub indirect: u64,
}

/// TX slot geometry (identical for all TX queues).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TxGeometry {
    /// Number of TX slots (packets in flight at most).
    pub slots: u16,
    /// Descriptors per slot in the main table (1, or 2 for split header).
    pub descs_per_slot: u16,
    /// Whether slots use an indirect table.
    pub indirect: bool,
    /// Whether the header gets its own descriptor.
    pub split: bool,
    /// Maximum header + frame bytes of a slot.
    pub capacity: u32,
    /// Distance between two slot buffers.
    pub slot_stride: u64,
    /// Entries per indirect table (1 or 2).
    pub indirect_entries: u16,
}

/// RX chain geometry (identical for all RX queues).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RxGeometry {
    /// Number of RX chains.
    pub chains: u16,
    /// Descriptors per chain.
    pub descs_per_chain: u16,
    /// Bytes per chain (header included).
    pub capacity: u32,
    /// Distance between two pieces of one chain (includes a guard gap, so
    /// the pieces are not contiguous).
    pub piece_stride: u64,
    /// Distance between two chains.
    pub chain_stride: u64,
}

impl RxGeometry {
    /// Length of piece `i` of a chain: the capacity split as evenly as
    /// possible, the first `capacity % k` pieces one byte longer.
    pub fn piece_len(&self, i: u16) -> u32 {
        let k = u32::from(self.descs_per_chain);
        self.capacity / k + u32::from(u32::from(i) < self.capacity % k)
    }
}

/// The complete memory layout.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    /// Indexed by virtqueue index (rx = 2*pair, tx = 2*pair+1).
    pub queues: Vec<QueueLayout>,
    pub tx: TxGeometry,
    pub rx: RxGeometry,
    pub ring_region_size: u64,
    pub ring_file_offset: u64,
    pub buffer_region_size: u64,
    pub buffer_file_offset: u64,
    pub file_size: u64,
    pub scratch_gpa: u64,
}

fn align_up(v: u64, a: u64) -> Result<u64, Error> {
    v.checked_add(a - 1)
        .map(|x| x & !(a - 1))
        .ok_or_else(|| Error::InvalidConfig("memory layout overflows".into()))
}

fn add(a: u64, b: u64) -> Result<u64, Error> {
    a.checked_add(b)
        .ok_or_else(|| Error::InvalidConfig("memory layout overflows".into()))
}

fn mul(a: u64, b: u64) -> Result<u64, Error> {
    a.checked_mul(b)
        .ok_or_else(|| Error::InvalidConfig("memory layout overflows".into()))
}

impl Layout {
    /// Computes the layout; `cfg` must already be validated.
    pub fn new(cfg: &GuestConfig) -> Result<Self, Error> {
        let size = cfg.queue_size;
        let usable = size - cfg.reserved_descs();
        let indirect = cfg.indirect_desc();
        let split = cfg.tx_split_header;
        let descs_per_slot = if split && !indirect { 2 } else { 1 };
        let tx = TxGeometry {
            slots: usable / descs_per_slot,
            descs_per_slot,
            indirect,
            split,
            capacity: cfg.tx_buffer_size,
            slot_stride: align_up(u64::from(cfg.tx_buffer_size), BUF_ALIGN)?,
            indirect_entries: if split { 2 } else { 1 },
        };
        let k = cfg.rx_descs_per_chain;
        let max_piece = u64::from(cfg.rx_buffer_size.div_ceil(u32::from(k)));
        let piece_stride = add(align_up(max_piece, BUF_ALIGN)?, BUF_ALIGN)?;
        let rx = RxGeometry {
            chains: usable / k,
            descs_per_chain: k,
            capacity: cfg.rx_buffer_size,
            piece_stride,
            chain_stride: mul(piece_stride, u64::from(k))?,
        };

        let n_queues = usize::from(cfg.queue_pairs) * 2;
        let mut queues = Vec::with_capacity(n_queues);
        let mut ring_off = RING_REGION_GPA;
        let mut buf_off = BUFFER_REGION_GPA;
        let qsz = u64::from(size);
        for q in 0..n_queues {
            let is_tx = q % 2 == 1;
            let desc = align_up(ring_off, RING_ALIGN)?;
            let avail = align_up(add(desc, DESC_SIZE * qsz)?, RING_ALIGN)?;
            let used = align_up(add(avail, 6 + 2 * qsz)?, RING_ALIGN)?;
            ring_off = add(used, 6 + 8 * qsz)?;
            let mut indirect_gpa = 0;
            if is_tx && indirect {
                indirect_gpa = align_up(ring_off, RING_ALIGN)?;
                let table = DESC_SIZE * u64::from(tx.indirect_entries);
                ring_off = add(indirect_gpa, mul(table, u64::from(tx.slots))?)?;
            }
            let buffers = align_up(buf_off, RING_ALIGN)?;
            buf_off = if is_tx {
                add(buffers, mul(tx.slot_stride, u64::from(tx.slots))?)?
            } else {
                add(buffers, mul(rx.chain_stride, u64::from(rx.chains))?)?
            };
            queues.push(QueueLayout {
                rings: RingAddrs { desc, avail, used },
                buffers,
                indirect: indirect_gpa,
            });
        }
        let ring_region_size = align_up(ring_off - RING_REGION_GPA, REGION_ALIGN)?;
        if add(RING_REGION_GPA, ring_region_size)? >= BUFFER_REGION_GPA {
            return Err(Error::InvalidConfig(
                "rings do not fit below the buffer region".into(),
            ));
        }
        let scratch_gpa = align_up(buf_off, RING_ALIGN)?;
        let buffer_region_size = align_up(
            add(scratch_gpa, SCRATCH_SIZE)? - BUFFER_REGION_GPA,
            REGION_ALIGN,
        )?;
        let buffer_file_offset = 0;
        let ring_file_offset = add(buffer_region_size, FILE_GAP)?;
        let file_size = add(ring_file_offset, ring_region_size)?;
        if i64::try_from(file_size).is_err() || usize::try_from(file_size).is_err() {
            return Err(Error::InvalidConfig("guest memory too large".into()));
        }
        Ok(Self {
            queues,
            tx,
            rx,
            ring_region_size,
            ring_file_offset,
            buffer_region_size,
            buffer_file_offset,
            file_size,
            scratch_gpa,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_is_disjoint_and_aligned() {
        let cfg = GuestConfig {
            queue_pairs: 2,
            ..GuestConfig::default()
        };
        let l = Layout::new(&cfg).unwrap();
        assert_eq!(l.queues.len(), 4);
        assert_eq!(l.tx.slots, 248);
        assert_eq!(l.rx.chains, 248);
        for q in &l.queues {
            assert_eq!(q.rings.desc % 4096, 0);
            assert!(q.rings.avail >= q.rings.desc + 16 * 256);
            assert!(q.rings.used >= q.rings.avail + 6 + 2 * 256);
            assert!(q.rings.used + 6 + 8 * 256 <= l.ring_region_size);
            assert!(q.buffers >= BUFFER_REGION_GPA);
        }
        assert!(l.scratch_gpa + SCRATCH_SIZE <= BUFFER_REGION_GPA + l.buffer_region_size);
        assert!(l.ring_file_offset >= l.buffer_region_size);
    }

    #[test]
    fn rx_pieces_sum_to_capacity() {
        let cfg = GuestConfig {
            rx_buffer_size: 1003,
            rx_descs_per_chain: 4,
            ..GuestConfig::default()
        };
        let l = Layout::new(&cfg).unwrap();
        let total: u32 = (0..4).map(|i| l.rx.piece_len(i)).sum();
        assert_eq!(total, 1003);
        assert!(u64::from(l.rx.piece_len(0)) < l.rx.piece_stride);
    }
}
