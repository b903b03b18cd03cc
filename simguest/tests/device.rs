//! Validates the simulated guest driver against an independent device
//! implementation: `vm-memory` maps the memfd regions exactly as a
//! vhost-user back-end would (via `regions()` and their file offsets), and
//! `virtio-queue` plays the device side of every virtqueue.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{BorrowedFd, RawFd};
use std::thread;
use std::time::{Duration, Instant};

use tapir_simguest::features::{
    VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use tapir_simguest::{
    DeviceError, Error, GuestConfig, SimGuest, VirtioNetHdr, VirtqueueInfo,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_LEN,
    VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

type Mem = GuestMemoryMmap<()>;

/// Borrows an fd owned by the `SimGuest` under test.
fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: every fd passed here belongs to a `SimGuest` that outlives the
    // test's use of the borrow.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Maps the guest's regions device-side, one mmap per region at its file
/// offset of a dup of the memfd.
fn device_mem(g: &SimGuest) -> Mem {
    let regions = g
        .regions()
        .iter()
        .map(|r| {
            let file = File::from(borrow(r.fd).try_clone_to_owned().unwrap());
            GuestRegionMmap::from_range(
                GuestAddress(r.guest_addr),
                usize::try_from(r.size).unwrap(),
                Some(FileOffset::new(file, r.file_offset)),
            )
            .unwrap()
        })
        .collect();
    GuestMemoryMmap::from_regions(regions).unwrap()
}

fn device_queue(mem: &Mem, info: &VirtqueueInfo, event_idx: bool) -> Queue {
    let mut q = Queue::new(info.size).unwrap();
    q.set_size(info.size);
    q.try_set_desc_table_address(GuestAddress(info.desc_table))
        .unwrap();
    q.try_set_avail_ring_address(GuestAddress(info.avail_ring))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(info.used_ring))
        .unwrap();
    q.set_event_idx(event_idx);
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

/// Non-blocking read of an eventfd counter (0 if not signalled).
fn read_efd(fd: RawFd) -> u64 {
    let mut b = [0u8; 8];
    match nix::unistd::read(borrow(fd), &mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

fn write_efd(fd: RawFd) {
    nix::unistd::write(borrow(fd), &1u64.to_ne_bytes()).unwrap();
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap() ^ seed)
        .collect()
}

/// Device side: pops one TX chain and returns (head, bytes).
fn device_pop_tx(q: &mut Queue, mem: &Mem) -> Option<(u16, Vec<u8>)> {
    let chain = q.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    let mut r = chain.reader(mem).unwrap();
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    Some((head, v))
}

/// Device side: pops one RX chain, writes `bytes`, returns (head, len).
fn device_fill_rx(q: &mut Queue, mem: &Mem, bytes: &[u8]) -> (u16, u32) {
    let chain = q.pop_descriptor_chain(mem).expect("no RX chain posted");
    let head = chain.head_index();
    let mut w = chain.writer(mem).unwrap();
    assert!(w.available_bytes() >= bytes.len());
    w.write_all(bytes).unwrap();
    (head, u32::try_from(bytes.len()).unwrap())
}

fn packet(hdr: &VirtioNetHdr, data: &[u8]) -> Vec<u8> {
    let mut v = hdr.to_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

#[test]
fn memory_regions_have_hole_and_share_one_memfd() {
    let g = SimGuest::new(GuestConfig::default()).unwrap();
    let r = g.regions();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].fd, r[1].fd);
    assert_ne!(r[0].file_offset, r[1].file_offset);
    assert!(r[0].guest_addr + r[0].size < r[1].guest_addr, "no hole");
    let gm = g.memory();
    assert_eq!(gm.hole(), (r[0].guest_addr + r[0].size, r[1].guest_addr));
    assert_eq!(gm.region_end(), r[1].guest_addr + r[1].size);
    assert!(!gm.is_mapped(gm.hole().0, 1));
    assert!(gm.read(gm.region_end() - 4, &mut [0; 8]).is_err());

    // Writes through GuestMem are visible in the device's mapping of both
    // regions (proves the file offsets are right).
    let mem = device_mem(&g);
    let a = gm.alloc(64, 64).unwrap();
    assert!(a >= r[1].guest_addr);
    gm.write(a, b"scratch").unwrap();
    let mut b = [0u8; 7];
    mem.read_slice(&mut b, GuestAddress(a)).unwrap();
    assert_eq!(&b, b"scratch");
    let ring = g.tx_queue(0).used_ring;
    mem.write_slice(b"ring", GuestAddress(ring + 100)).unwrap();
    let mut c = [0u8; 4];
    gm.read(ring + 100, &mut c).unwrap();
    assert_eq!(&c, b"ring");
    assert!(gm.alloc(2 << 20, 8).is_err());
}

#[test]
fn tx_round_trip() {
    for split in [false, true] {
        let cfg = GuestConfig {
            tx_split_header: split,
            ..GuestConfig::default()
        };
        let mut g = SimGuest::new(cfg).unwrap();
        let mem = device_mem(&g);
        let info = g.tx_queue(0);
        assert_eq!(info.index, 1);
        let mut q = device_queue(&mem, &info, true);
        let (_rx, mut tx) = g.take_pair(0);
        let cap = tx.capacity();
        assert_eq!(tx.free_slots(), cap);

        let hdrs: Vec<VirtioNetHdr> = (0..5u16)
            .map(|i| VirtioNetHdr {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
                gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
                hdr_len: 54,
                gso_size: 1448 + i,
                csum_start: 34,
                csum_offset: 16,
                num_buffers: 0,
            })
            .collect();
        let frames: Vec<Vec<u8>> = (0..5u8)
            .map(|i| frame(60 + 1000 * usize::from(i), i))
            .collect();
        for (h, f) in hdrs.iter().zip(&frames) {
            assert!(tx.push(h, f).unwrap());
        }
        // Not published yet.
        assert!(device_pop_tx(&mut q, &mem).is_none());
        assert_eq!(tx.in_flight(), 5);
        tx.flush();

        for (h, f) in hdrs.iter().zip(&frames) {
            let chain = q.pop_descriptor_chain(&mem).unwrap();
            let descs: Vec<_> = chain.clone().collect();
            if split {
                assert_eq!(descs.len(), 2);
                assert_eq!(descs[0].len(), 12);
            } else {
                assert_eq!(descs.len(), 1);
            }
            let head = chain.head_index();
            let mut v = Vec::new();
            chain.reader(&mem).unwrap().read_to_end(&mut v).unwrap();
            assert_eq!(v, packet(h, f));
            q.add_used(&mem, head, 0).unwrap();
        }
        assert_eq!(tx.reclaim(), 5);
        assert_eq!(tx.in_flight(), 0);
        assert_eq!(tx.free_slots(), cap);
        let s = tx.stats();
        assert_eq!(s.completed, 5);
        assert_eq!(s.device_errors, 0);

        // Too big, and ring full.
        let big = vec![0u8; tx.max_frame_len() + 1];
        assert!(matches!(
            tx.push(&VirtioNetHdr::default(), &big),
            Err(Error::FrameTooLarge { .. })
        ));
        for _ in 0..cap {
            assert!(tx.push(&VirtioNetHdr::default(), &[1, 2, 3]).unwrap());
        }
        assert!(!tx.push(&VirtioNetHdr::default(), &[1]).unwrap());
    }
}

#[test]
fn rx_round_trip_big_buffers_scattered() {
    let cfg = GuestConfig {
        features: VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
        rx_buffer_size: 65562,
        rx_descs_per_chain: 4,
        queue_size: 64,
        ..GuestConfig::default()
    };
    let mut g = SimGuest::new(cfg).unwrap();
    let mem = device_mem(&g);
    let info = g.rx_queue(0);
    assert_eq!(info.index, 0);
    let mut q = device_queue(&mem, &info, true);
    let (mut rx, _tx) = g.take_pair(0);
    assert_eq!(rx.refill(), rx.capacity());
    assert_eq!(rx.refill(), 0);

    let hdr = VirtioNetHdr {
        num_buffers: 1,
        ..VirtioNetHdr::default()
    };
    let data = frame(65550, 7);
    // The chain is four non-contiguous descriptors.
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    let descs: Vec<_> = chain.clone().collect();
    assert_eq!(descs.len(), 4);
    assert!(descs.iter().all(|d| d.is_write_only()));
    assert!(descs[0].addr().0 + u64::from(descs[0].len()) < descs[1].addr().0);
    let head = chain.head_index();
    let mut w = chain.writer(&mem).unwrap();
    w.write_all(&packet(&hdr, &data)).unwrap();
    let len = u32::try_from(VIRTIO_NET_HDR_LEN + data.len()).unwrap();
    q.add_used(&mem, head, len).unwrap();

    let mut nslices = 0;
    let n = rx
        .poll_with(|h, s| {
            assert_eq!(*h, hdr);
            nslices = s.len();
            assert_eq!(s.concat(), data);
        })
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(nslices, 4);
    assert_eq!(rx.free_chains(), 1);
    assert!(rx.poll().unwrap().is_none());

    // A small packet, through the copying API.
    let small = frame(60, 9);
    let (head, len) = device_fill_rx(&mut q, &mem, &packet(&hdr, &small));
    q.add_used(&mem, head, len).unwrap();
    let p = rx.poll().unwrap().unwrap();
    assert_eq!(p.data, small);
    assert_eq!(p.buffers, 1);
    assert_eq!(p.used_len, len);
    assert_eq!(rx.stats().packets, 2);
}

#[test]
fn mrg_rxbuf_packet_spans_three_chains() {
    let cfg = GuestConfig {
        rx_buffer_size: 256,
        queue_size: 16,
        raw_reserved_descs: 2,
        ..GuestConfig::default()
    };
    assert!(cfg.features & VIRTIO_NET_F_MRG_RXBUF != 0);
    let mut g = SimGuest::new(cfg).unwrap();
    let mem = device_mem(&g);
    let mut q = device_queue(&mem, &g.rx_queue(0), true);
    let (mut rx, _tx) = g.take_pair(0);
    rx.refill();

    let hdr = VirtioNetHdr {
        num_buffers: 3,
        ..VirtioNetHdr::default()
    };
    let data = frame(600, 3);
    let bytes = packet(&hdr, &data); // 612 = 256 + 256 + 100
    let mut used = Vec::new();
    for part in bytes.chunks(256) {
        used.push(device_fill_rx(&mut q, &mem, part));
    }
    // Two of three buffers used: the driver must wait for the rest.
    for &(head, len) in &used[..2] {
        q.add_used(&mem, head, len).unwrap();
    }
    assert!(q.needs_notification(&mem).unwrap());
    assert_eq!(rx.poll_with(|_, _| panic!("half a packet")).unwrap(), 0);
    // wait() arms the interrupt for the packet's last buffer instead of
    // returning at once for the two buffers already used.
    assert!(!rx.wait(Duration::from_millis(10)).unwrap());
    assert_eq!(rx.raw().used_event(), 2);
    q.add_used(&mem, used[2].0, used[2].1).unwrap();
    assert!(q.needs_notification(&mem).unwrap());
    assert!(rx.wait(Duration::from_secs(5)).unwrap());

    let mut got = Vec::new();
    let n = rx
        .poll_with(|h, s| {
            assert_eq!(h.num_buffers, 3);
            assert_eq!(s.len(), 3);
            got = s.concat();
        })
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(got, data);
    assert_eq!(rx.stats().completed, 3);
    assert_eq!(rx.free_chains(), 3);

    // And through poll(): another 2-buffer packet.
    rx.refill();
    let hdr2 = VirtioNetHdr {
        num_buffers: 2,
        ..VirtioNetHdr::default()
    };
    let data2 = frame(300, 5);
    let bytes2 = packet(&hdr2, &data2);
    for part in bytes2.chunks(256) {
        let (h, l) = device_fill_rx(&mut q, &mem, part);
        q.add_used(&mem, h, l).unwrap();
    }
    let p = rx.poll().unwrap().unwrap();
    assert_eq!(p.data, data2);
    assert_eq!(p.buffers, 2);
    assert_eq!(p.used_len, 312);
}

#[test]
fn event_idx_kick_suppression() {
    let mut g = SimGuest::new(GuestConfig::default()).unwrap();
    let mem = device_mem(&g);
    let info = g.tx_queue(0);
    let mut q = device_queue(&mem, &info, true);
    let (_rx, mut tx) = g.take_pair(0);
    let h = VirtioNetHdr::default();

    // avail_event = 0: crossing 0 -> 1 kicks, later publishes do not.
    assert!(tx.send(&h, &[1]).unwrap());
    assert_eq!(tx.stats().kicks, 1);
    assert_eq!(read_efd(info.kick_fd), 1);
    tx.send(&h, &[2]).unwrap();
    tx.send(&h, &[3]).unwrap();
    assert_eq!(tx.stats().kicks, 1);
    assert_eq!(read_efd(info.kick_fd), 0);

    // The device drains and re-enables notifications (avail_event = 3).
    while let Some((head, _)) = device_pop_tx(&mut q, &mem) {
        q.add_used(&mem, head, 0).unwrap();
    }
    assert!(!q.enable_notification(&mem).unwrap());
    tx.push(&h, &[4]).unwrap();
    tx.push(&h, &[5]).unwrap();
    assert!(tx.flush(), "avail idx crossed avail_event");
    assert_eq!(read_efd(info.kick_fd), 1);
    // Not re-armed by the device: no kick.
    tx.push(&h, &[6]).unwrap();
    assert!(!tx.flush());
    assert!(!tx.flush(), "nothing new, no kick");
    assert_eq!(tx.stats().kicks, 2);
    assert!(tx.stats().kicks_suppressed >= 2);
}

#[test]
fn event_idx_interrupt_arming() {
    let mut g = SimGuest::new(GuestConfig::default()).unwrap();
    let mem = device_mem(&g);
    let info = g.tx_queue(0);
    let mut q = device_queue(&mem, &info, true);
    let (_rx, mut tx) = g.take_pair(0);
    let h = VirtioNetHdr::default();
    for i in 0..4 {
        tx.push(&h, &[i]).unwrap();
    }
    tx.flush();
    let mut heads = Vec::new();
    while let Some((head, _)) = device_pop_tx(&mut q, &mem) {
        heads.push(head);
    }
    // used_event starts at 0: the first completion interrupts, the second
    // does not (the driver is polling).
    q.add_used(&mem, heads[0], 0).unwrap();
    assert!(q.needs_notification(&mem).unwrap());
    q.add_used(&mem, heads[1], 0).unwrap();
    assert!(!q.needs_notification(&mem).unwrap());
    assert_eq!(tx.reclaim(), 2);

    // wait() arms used_event = last seen used idx, then times out.
    let t = Instant::now();
    assert!(!tx.wait(Duration::from_millis(20)).unwrap());
    assert!(t.elapsed() >= Duration::from_millis(15));
    assert_eq!(tx.raw().used_event(), 2);
    q.add_used(&mem, heads[2], 0).unwrap();
    assert!(q.needs_notification(&mem).unwrap(), "armed by wait");
    // After the wait used_event is left behind: no further interrupts.
    q.add_used(&mem, heads[3], 0).unwrap();
    assert!(!q.needs_notification(&mem).unwrap());
    // Work available: wait returns at once, without blocking.
    let before = tx.stats().wait_blocks;
    assert!(tx.wait(Duration::from_secs(5)).unwrap());
    assert_eq!(tx.stats().wait_blocks, before);
    assert_eq!(tx.reclaim(), 2);
}

#[test]
fn no_event_idx_flags() {
    let cfg = GuestConfig {
        features: VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF,
        ..GuestConfig::default()
    };
    let mut g = SimGuest::new(cfg).unwrap();
    let mem = device_mem(&g);
    let info = g.tx_queue(0);
    let mut q = device_queue(&mem, &info, false);
    let (_rx, mut tx) = g.take_pair(0);
    let h = VirtioNetHdr::default();

    assert!(tx.send(&h, &[1]).unwrap());
    assert!(tx.send(&h, &[2]).unwrap());
    assert_eq!(tx.stats().kicks, 2, "kick every flush without NO_NOTIFY");
    q.disable_notification(&mem).unwrap(); // sets used.flags NO_NOTIFY
    tx.send(&h, &[3]).unwrap();
    assert_eq!(tx.stats().kicks, 2);
    q.enable_notification(&mem).unwrap();
    tx.send(&h, &[4]).unwrap();
    assert_eq!(tx.stats().kicks, 3);

    // Interrupts are suppressed outside wait(), enabled during it.
    assert_eq!(
        tx.raw().avail_flags() & VIRTQ_AVAIL_F_NO_INTERRUPT,
        VIRTQ_AVAIL_F_NO_INTERRUPT
    );
    let gm = g.memory();
    let avail = info.avail_ring;
    let call = info.call_fd;
    let waiter = thread::spawn(move || {
        let r = tx.wait(Duration::from_secs(10)).unwrap();
        (r, tx)
    });
    let t = Instant::now();
    while gm.read_u16(avail).unwrap() & VIRTQ_AVAIL_F_NO_INTERRUPT != 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "wait never armed");
        thread::yield_now();
    }
    write_efd(call);
    let (woken, mut tx) = waiter.join().unwrap();
    assert!(woken);
    assert_eq!(tx.stats().interrupts, 1);
    assert_eq!(
        tx.raw().avail_flags() & VIRTQ_AVAIL_F_NO_INTERRUPT,
        VIRTQ_AVAIL_F_NO_INTERRUPT
    );
}

#[test]
fn wait_wakes_on_call_from_other_thread() {
    let mut g = SimGuest::new(GuestConfig::default()).unwrap();
    let call = g.rx_queue(0).call_fd;
    let (mut rx, _tx) = g.take_pair(0);
    rx.refill();
    assert!(!rx.wait(Duration::from_millis(1)).unwrap());
    let writer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        write_efd(call);
    });
    let t = Instant::now();
    assert!(rx.wait(Duration::from_secs(10)).unwrap());
    assert!(t.elapsed() < Duration::from_secs(5));
    writer.join().unwrap();
    assert_eq!(rx.stats().interrupts, 1);
    assert_eq!(rx.stats().waits, 2);
    drop(g); // drivers keep the memory alive on their own
    assert_eq!(rx.poll().unwrap(), None);
}

#[test]
fn bogus_used_entries_are_errors() {
    let cfg = GuestConfig {
        queue_size: 16,
        raw_reserved_descs: 2,
        rx_descs_per_chain: 2,
        ..GuestConfig::default()
    };
    let mut g = SimGuest::new(cfg).unwrap();
    let mem = device_mem(&g);
    let mut q = device_queue(&mem, &g.rx_queue(0), true);
    let (mut rx, _tx) = g.take_pair(0);

    // Nothing posted yet: id 0 is unknown.
    q.add_used(&mem, 0, 100).unwrap();
    assert!(matches!(
        rx.poll(),
        Err(Error::Device {
            queue: 0,
            kind: DeviceError::UnknownId { id: 0 }
        })
    ));
    rx.refill();
    // Odd id: the middle of a 2-descriptor chain, never a head.
    q.add_used(&mem, 3, 100).unwrap();
    assert!(matches!(
        rx.poll_with(|_, _| {}),
        Err(Error::Device {
            kind: DeviceError::UnknownId { id: 3 },
            ..
        })
    ));
    // Length beyond the chain.
    let (head, _) = device_fill_rx(&mut q, &mem, &packet(&VirtioNetHdr::default(), &[1]));
    q.add_used(&mem, head, 4096).unwrap();
    assert!(matches!(
        rx.poll(),
        Err(Error::Device {
            kind: DeviceError::LenTooLarge { len: 4096, .. },
            ..
        })
    ));
    // num_buffers = 0 with MRG_RXBUF.
    let (head, len) = device_fill_rx(&mut q, &mem, &packet(&VirtioNetHdr::default(), &[1]));
    q.add_used(&mem, head, len).unwrap();
    assert!(matches!(
        rx.poll(),
        Err(Error::Device {
            kind: DeviceError::ZeroBuffers,
            ..
        })
    ));
    assert_eq!(rx.stats().device_errors, 4);

    // The driver stays usable: a good packet still arrives.
    let hdr = VirtioNetHdr {
        num_buffers: 1,
        ..VirtioNetHdr::default()
    };
    let (head, len) = device_fill_rx(&mut q, &mem, &packet(&hdr, &[9, 8, 7]));
    q.add_used(&mem, head, len).unwrap();
    assert_eq!(rx.poll().unwrap().unwrap().data, vec![9, 8, 7]);
}

#[test]
fn indirect_descriptors_when_negotiated() {
    for split in [false, true] {
        let cfg = GuestConfig {
            features: GuestConfig::default().features | VIRTIO_RING_F_INDIRECT_DESC,
            tx_split_header: split,
            ..GuestConfig::default()
        };
        let mut g = SimGuest::new(cfg).unwrap();
        let mem = device_mem(&g);
        let mut q = device_queue(&mem, &g.tx_queue(0), true);
        let (_rx, mut tx) = g.take_pair(0);
        let h = VirtioNetHdr {
            gso_size: 77,
            ..VirtioNetHdr::default()
        };
        let f = frame(1500, 1);
        tx.send(&h, &f).unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let head = chain.head_index();
        let d = tx.raw().read_desc(head);
        assert_eq!(d.flags & VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_INDIRECT);
        let entries = if split { 2 } else { 1 };
        assert_eq!(d.len, 16 * entries);
        let inner: Vec<_> = chain.clone().collect();
        assert_eq!(inner.len(), usize::try_from(entries).unwrap());
        let mut v = Vec::new();
        chain.reader(&mem).unwrap().read_to_end(&mut v).unwrap();
        assert_eq!(v, packet(&h, &f));
        q.add_used(&mem, head, 0).unwrap();
        assert_eq!(tx.reclaim(), 1);
    }
}

#[test]
fn raw_chains_in_reserved_descriptors() {
    let mut g = SimGuest::new(GuestConfig::default()).unwrap();
    let mem = device_mem(&g);
    let mut q = device_queue(&mem, &g.tx_queue(0), true);
    let gm = g.memory();
    let (_rx, mut tx) = g.take_pair(0);
    let h = VirtioNetHdr::default();
    tx.push(&h, &[1, 1]).unwrap();

    let raw = tx.raw();
    let free = raw.free_desc_indices();
    assert_eq!(free.len(), 8);
    let (d0, d1) = (free[0], free[1]);
    let a = gm.alloc(32, 16).unwrap();
    gm.write(a, &[0xaa; 32]).unwrap();
    raw.write_desc(d0, a, 16, VIRTQ_DESC_F_NEXT, d1);
    raw.write_desc(d1, a + 16, 16, 0, 0);
    raw.push_avail(d0);
    tx.push(&h, &[2, 2]).unwrap();
    tx.flush();

    let (h1, b1) = device_pop_tx(&mut q, &mem).unwrap();
    assert_eq!(&b1[12..], &[1, 1]);
    let (h2, b2) = device_pop_tx(&mut q, &mem).unwrap();
    assert_eq!(h2, d0);
    assert_eq!(b2, vec![0xaa; 32]);
    let (h3, b3) = device_pop_tx(&mut q, &mem).unwrap();
    assert_eq!(&b3[12..], &[2, 2]);
    for head in [h1, h2, h3] {
        q.add_used(&mem, head, 7).unwrap();
    }
    assert_eq!(tx.reclaim(), 2);
    assert_eq!(tx.take_foreign_used(), vec![(u32::from(d0), 7)]);
    assert_eq!(tx.stats().foreign_used, 1);
    assert_eq!(tx.stats().device_errors, 0);
    assert_eq!(tx.in_flight(), 0);

    // A used entry naming a slot that is not in flight is a device bug.
    q.add_used(&mem, h1, 0).unwrap();
    assert!(matches!(
        tx.try_reclaim(),
        Err(Error::Device {
            kind: DeviceError::UnknownId { .. },
            ..
        })
    ));
}

#[test]
fn index_wraparound_over_many_packets() {
    let cfg = GuestConfig {
        queue_size: 16,
        raw_reserved_descs: 2,
        rx_buffer_size: 128,
        ..GuestConfig::default()
    };
    let mut g = SimGuest::new(cfg).unwrap();
    let mem = device_mem(&g);
    let mut txq = device_queue(&mem, &g.tx_queue(0), true);
    let mut rxq = device_queue(&mem, &g.rx_queue(0), true);
    let (mut rx, mut tx) = g.take_pair(0);
    let hdr = VirtioNetHdr {
        num_buffers: 1,
        ..VirtioNetHdr::default()
    };
    let total = 70_000u32;
    let mut sent = 0u32;
    let mut received = 0u32;
    rx.refill();
    while received < total {
        while sent < total && tx.push(&hdr, &sent.to_le_bytes()).unwrap() {
            sent += 1;
        }
        tx.flush();
        // Loopback device: TX chain -> RX chain.
        while let Some((head, bytes)) = device_pop_tx(&mut txq, &mem) {
            let (rh, len) = device_fill_rx(&mut rxq, &mem, &bytes);
            rxq.add_used(&mem, rh, len).unwrap();
            txq.add_used(&mem, head, 0).unwrap();
        }
        tx.reclaim();
        rx.poll_with(|_, s| {
            assert_eq!(s.concat(), received.to_le_bytes());
            received += 1;
        })
        .unwrap();
        rx.refill();
    }
    assert_eq!(tx.stats().completed, u64::from(total));
    assert_eq!(rx.stats().packets, u64::from(total));
    assert_eq!(rx.stats().device_errors + tx.stats().device_errors, 0);
}

#[test]
fn pairs_and_threads() {
    let cfg = GuestConfig {
        queue_pairs: 2,
        ..GuestConfig::default()
    };
    let mut g = SimGuest::new(cfg).unwrap();
    assert_eq!(g.rx_queue(1).index, 2);
    assert_eq!(g.tx_queue(1).index, 3);
    assert_eq!(g.queues().len(), 4);
    let fds: Vec<RawFd> = g
        .queues()
        .iter()
        .flat_map(|q| [q.kick_fd, q.call_fd])
        .collect();
    let mut sorted = fds.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 8, "one eventfd pair per queue");
    let (rx, tx) = g.take_pair(1);
    assert!(matches!(g.try_take_pair(1), Err(Error::PairTaken(1))));
    assert!(matches!(g.try_take_pair(2), Err(Error::NoSuchPair(2))));
    let h = thread::spawn(move || {
        let mut tx = tx;
        tx.send(&VirtioNetHdr::default(), &[0; 64]).unwrap();
        (rx, tx)
    });
    let (_rx, tx) = h.join().unwrap();
    assert_eq!(tx.in_flight(), 1);
}

#[test]
#[should_panic(expected = "already taken")]
fn take_pair_twice_panics() {
    let mut g = SimGuest::new(GuestConfig::default()).unwrap();
    let _a = g.take_pair(0);
    let _b = g.take_pair(0);
}

#[test]
fn tiny_queues_work() {
    for size in [1u16, 2, 4, 8] {
        let cfg = GuestConfig {
            queue_size: size,
            ..GuestConfig::default()
        };
        let mut g = SimGuest::new(cfg).unwrap();
        let mem = device_mem(&g);
        let mut q = device_queue(&mem, &g.tx_queue(0), true);
        let (mut rx, mut tx) = g.take_pair(0);
        assert_eq!(tx.raw().free_desc_indices().len(), usize::from(size / 4));
        assert_eq!(tx.capacity(), usize::from(size - size / 4));
        assert_eq!(rx.refill(), usize::from(size - size / 4));
        for round in 0..3u8 {
            while tx.push(&VirtioNetHdr::default(), &[round]).unwrap() {}
            tx.flush();
            while let Some((head, _)) = device_pop_tx(&mut q, &mem) {
                q.add_used(&mem, head, 0).unwrap();
            }
            assert_eq!(tx.reclaim(), tx.capacity());
        }
    }
}

#[test]
fn invalid_configs_are_rejected() {
    for cfg in [
        GuestConfig {
            queue_size: 100,
            ..GuestConfig::default()
        },
        GuestConfig {
            queue_pairs: 0,
            ..GuestConfig::default()
        },
        GuestConfig {
            rx_buffer_size: 8,
            ..GuestConfig::default()
        },
        GuestConfig {
            queue_size: 8,
            rx_descs_per_chain: 7,
            ..GuestConfig::default()
        },
    ] {
        assert!(matches!(SimGuest::new(cfg), Err(Error::InvalidConfig(_))));
    }
}
