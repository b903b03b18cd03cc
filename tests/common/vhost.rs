//! The vhost-user frontend side shared by the tests that drive `tapir serve` with the rust-vmm
//! `vhost` frontend and the simulated guest.

use std::os::fd::FromRawFd;

use std::time::{Duration, Instant};

use tapir_simguest::{GuestConfig, SimGuest, VirtioNetHdr};

use super::{frames, rx_recv, tx_drain, tx_send, GUEST_IP, GUEST_MAC, HOST_IP};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// A duplicate of one of the simulated guest's eventfds, owned by the caller.
pub fn eventfd_of(raw: i32) -> EventFd {
    // SAFETY: `raw` is an eventfd the SimGuest owns for its lifetime; we duplicate it and own
    // the duplicate.
    let dup = unsafe { libc::dup(raw) };
    assert!(dup >= 0);
    // SAFETY: `dup` is a fresh fd nothing else owns.
    unsafe { EventFd::from_raw_fd(dup) }
}

/// Sets up every vring of `guest` (size, addresses, base 0, call and kick eventfds) and
/// enables it.
pub fn set_up_vrings(fe: &mut Frontend, guest: &SimGuest) {
    for q in guest.queues() {
        let i = usize::from(q.index);
        fe.set_vring_num(i, q.size).unwrap();
        fe.set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: q.size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: q.desc_table,
                used_ring_addr: q.used_ring,
                avail_ring_addr: q.avail_ring,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(i, 0).unwrap();
        fe.set_vring_call(i, &eventfd_of(q.call_fd)).unwrap();
        fe.set_vring_kick(i, &eventfd_of(q.kick_fd)).unwrap();
        fe.set_vring_enable(i, true).unwrap();
    }
}

/// A simulated guest with one queue pair.
pub fn one_pair_guest() -> SimGuest {
    SimGuest::new(GuestConfig {
        queue_pairs: 1,
        ..GuestConfig::default()
    })
    .unwrap()
}

/// The guest's ARP request for the host's MAC (an Ethernet frame).
pub fn arp_request() -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    let n = frames::build_arp(
        &mut buf,
        frames::ArpOp::Request,
        GUEST_MAC,
        GUEST_IP,
        [0; 6],
        HOST_IP,
    )
    .unwrap();
    buf.truncate(n);
    buf
}

/// The guest asks the host for its MAC (ARP through TX) and gets the answer (through RX).
pub fn arp_round_trip(guest: &mut SimGuest, ctx: &str) {
    let (mut rx, mut tx) = guest.take_pair(0);
    arp_round_trip_on(&mut rx, &mut tx, ctx);
}

/// [`arp_round_trip`] on a pair the caller took.
pub fn arp_round_trip_on(
    rx: &mut tapir_simguest::RxDriver,
    tx: &mut tapir_simguest::TxDriver,
    ctx: &str,
) {
    let request = arp_request();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tx_send(tx, &VirtioNetHdr::default(), &request, ctx);
        tx_drain(tx, ctx);
        if let Some(p) = rx_recv(rx, Duration::from_millis(500), ctx) {
            if let Some(a) = frames::parse_arp(&p.data) {
                if a.op == frames::ArpOp::Reply && a.sender_ip == HOST_IP {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{ctx}: no ARP reply through tapir serve"
        );
    }
}

/// Negotiates and attaches the simulated guest: memory table (user address = guest address),
/// every vring, enabled. Returns the acked features.
pub fn attach(fe: &mut Frontend, guest: &SimGuest, extra_features: u64) -> u64 {
    let offered = fe.get_features().unwrap();
    assert!(offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
    let acked = (guest.features() & offered)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | extra_features;
    fe.set_features(acked).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    assert!(proto.contains(want), "protocol features {proto:?}");
    fe.set_protocol_features(want).unwrap();
    // Ask for an ack of every request (REPLY_ACK), so refusals come back as errors.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(
        fe.get_queue_num().unwrap(),
        2 * u64::from(guest.queue_pairs())
    );
    fe.set_owner().unwrap();
    let regions: Vec<VhostUserMemoryRegionInfo> = guest
        .regions()
        .iter()
        .map(|r| VhostUserMemoryRegionInfo {
            guest_phys_addr: r.guest_addr,
            memory_size: r.size,
            userspace_addr: r.guest_addr,
            mmap_offset: r.file_offset,
            mmap_handle: r.fd,
        })
        .collect();
    fe.set_mem_table(&regions)
        .unwrap_or_else(|e| panic!("SET_MEM_TABLE {:?}: {e}", guest.regions()));
    set_up_vrings(fe, guest);
    acked
}
