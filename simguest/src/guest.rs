//! [`SimGuest`]: creates the guest memory, the virtqueues and their
//! eventfds, and hands out the per-pair RX/TX drivers.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::config::GuestConfig;
use crate::error::Error;
use crate::layout::{Layout, DESC_SIZE};
use crate::memory::{Area, GuestMem, Mapping, MemoryRegionInfo};
use crate::ring::RawQueue;
use crate::rx::RxDriver;
use crate::tx::TxDriver;

/// What a vhost-user front-end would send for one virtqueue
/// (`SET_VRING_NUM/ADDR/KICK/CALL`). Addresses are guest-physical; the fds
/// are borrowed from the [`SimGuest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtqueueInfo {
    /// Virtqueue index (rx = 2*pair, tx = 2*pair+1).
    pub index: u16,
    /// Queue size.
    pub size: u16,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Kick eventfd (driver → device), `EFD_NONBLOCK | EFD_CLOEXEC`.
    pub kick_fd: RawFd,
    /// Call eventfd (device → driver), `EFD_NONBLOCK | EFD_CLOEXEC`.
    pub call_fd: RawFd,
}

/// Kick and call eventfds of one virtqueue.
#[derive(Debug)]
struct QueueFds {
    kick: Arc<EventFd>,
    call: Arc<EventFd>,
}

/// A simulated virtio-net guest: memory, virtqueues and drivers.
#[derive(Debug)]
pub struct SimGuest {
    cfg: GuestConfig,
    map: Arc<Mapping>,
    layout: Layout,
    fds: Vec<QueueFds>,
    pairs: Vec<Option<(RxDriver, TxDriver)>>,
}

impl SimGuest {
    /// Creates the memfd-backed memory, all virtqueues and their drivers.
    pub fn new(cfg: GuestConfig) -> Result<SimGuest, Error> {
        cfg.validate()?;
        let layout = Layout::new(&cfg)?;
        let map = Arc::new(Mapping::new(&layout)?);
        let flags = EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC;
        let fds = (0..layout.queues.len())
            .map(|_| {
                Ok(QueueFds {
                    kick: Arc::new(EventFd::from_flags(flags)?),
                    call: Arc::new(EventFd::from_flags(flags)?),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let mut pairs = Vec::with_capacity(usize::from(cfg.queue_pairs));
        for pair in 0..cfg.queue_pairs {
            pairs.push(Some(Self::make_pair(&cfg, &layout, &map, &fds, pair)?));
        }
        Ok(SimGuest {
            cfg,
            map,
            layout,
            fds,
            pairs,
        })
    }

    fn make_pair(
        cfg: &GuestConfig,
        layout: &Layout,
        map: &Arc<Mapping>,
        fds: &[QueueFds],
        pair: u16,
    ) -> Result<(RxDriver, TxDriver), Error> {
        let raw = |q: u16| {
            let f = &fds[usize::from(q)];
            RawQueue::new(
                Arc::clone(map),
                q,
                cfg.queue_size,
                layout.queues[usize::from(q)].rings,
                (Arc::clone(&f.kick), Arc::clone(&f.call)),
                cfg.reserved_descs(),
                cfg.event_idx(),
            )
        };
        let (rxq, txq) = (2 * pair, 2 * pair + 1);
        let rx_l = &layout.queues[usize::from(rxq)];
        let rx_area = Area::new(
            map,
            rx_l.buffers,
            layout.rx.chain_stride * u64::from(layout.rx.chains),
        )?;
        let rx = RxDriver::new(raw(rxq)?, layout.rx, rx_area, cfg.mrg_rxbuf());

        let tx_l = &layout.queues[usize::from(txq)];
        let slots = u64::from(layout.tx.slots);
        let tx_area = Area::new(map, tx_l.buffers, layout.tx.slot_stride * slots)?;
        let tables = if layout.tx.indirect {
            let len = DESC_SIZE * u64::from(layout.tx.indirect_entries) * slots;
            Some(Area::new(map, tx_l.indirect, len)?)
        } else {
            None
        };
        let tx = TxDriver::new(raw(txq)?, layout.tx, tx_area, tables);
        Ok((rx, tx))
    }

    /// The configuration the guest was created with.
    #[must_use]
    pub fn config(&self) -> &GuestConfig {
        &self.cfg
    }

    /// The acked feature bits (`config.features | VERSION_1`).
    #[must_use]
    pub fn features(&self) -> u64 {
        self.cfg.acked_features()
    }

    /// Number of queue pairs.
    #[must_use]
    pub fn queue_pairs(&self) -> u16 {
        self.cfg.queue_pairs
    }

    /// The guest memory regions: rings at gpa 0, buffers (and scratch) at
    /// gpa `0x1_0000_0000`, both in the same memfd at different offsets.
    #[must_use]
    pub fn regions(&self) -> Vec<MemoryRegionInfo> {
        self.memory().regions()
    }

    fn queue_info(&self, q: u16) -> VirtqueueInfo {
        let l = &self.layout.queues[usize::from(q)];
        let f = &self.fds[usize::from(q)];
        VirtqueueInfo {
            index: q,
            size: self.cfg.queue_size,
            desc_table: l.rings.desc,
            avail_ring: l.rings.avail,
            used_ring: l.rings.used,
            kick_fd: f.kick.as_raw_fd(),
            call_fd: f.call.as_raw_fd(),
        }
    }

    fn check_pair(&self, pair: u16) {
        assert!(
            pair < self.cfg.queue_pairs,
            "queue pair {pair} does not exist ({} pairs)",
            self.cfg.queue_pairs
        );
    }

    /// The RX virtqueue of `pair` (index `2*pair`). Panics if `pair` does
    /// not exist.
    #[must_use]
    pub fn rx_queue(&self, pair: u16) -> VirtqueueInfo {
        self.check_pair(pair);
        self.queue_info(2 * pair)
    }

    /// The TX virtqueue of `pair` (index `2*pair+1`). Panics if `pair` does
    /// not exist.
    #[must_use]
    pub fn tx_queue(&self, pair: u16) -> VirtqueueInfo {
        self.check_pair(pair);
        self.queue_info(2 * pair + 1)
    }

    /// All virtqueues in index order (rx0, tx0, rx1, tx1, ...).
    #[must_use]
    pub fn queues(&self) -> Vec<VirtqueueInfo> {
        (0..self.cfg.queue_pairs * 2)
            .map(|q| self.queue_info(q))
            .collect()
    }

    /// Takes the drivers of `pair`. Panics if it does not exist or was
    /// already taken; see [`try_take_pair`](Self::try_take_pair).
    pub fn take_pair(&mut self, pair: u16) -> (RxDriver, TxDriver) {
        match self.try_take_pair(pair) {
            Ok(p) => p,
            Err(e) => panic!("take_pair({pair}): {e}"),
        }
    }

    /// Takes the drivers of `pair`, or fails if it does not exist or was
    /// already taken.
    pub fn try_take_pair(&mut self, pair: u16) -> Result<(RxDriver, TxDriver), Error> {
        self.pairs
            .get_mut(usize::from(pair))
            .ok_or(Error::NoSuchPair(pair))?
            .take()
            .ok_or(Error::PairTaken(pair))
    }

    /// A handle for raw guest memory access.
    #[must_use]
    pub fn memory(&self) -> GuestMem {
        GuestMem {
            map: Arc::clone(&self.map),
        }
    }
}
