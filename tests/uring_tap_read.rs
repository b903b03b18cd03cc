//! What the io_uring engine's RX wait relies on, checked on this kernel with a real TAP: a
//! read submitted without `RWF_NOWAIT` on an empty, `O_NONBLOCK` TAP queue does not fail with
//! `EAGAIN`; io_uring arms its own poll and completes the read with the frame once one
//! arrives (the frame delivered in the wake-up's task work, with no second submission).

use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};
use tapir_testkit::{netns, raw_tap};

#[test]
fn a_read_without_nowait_waits_on_an_empty_nonblocking_tap() {
    netns::run_in_new_netns(|| {
        let tap = raw_tap::open_tap("tapw0").expect("a TAP");
        netns::disable_ipv6().expect("no IPv6 chatter");
        netns::link_up("tapw0").expect("link up");
        netns::add_addr("tapw0", "10.77.0.1/24").expect("address");
        netns::add_neigh("10.77.0.2", "02:00:00:00:77:02", "tapw0").expect("neighbour");
        let mut ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(8)
            .expect("a ring");
        let mut buf = vec![0u8; 2048];
        let read = opcode::Read::new(
            types::Fd(tap.as_raw_fd()),
            buf.as_mut_ptr(),
            u32::try_from(buf.len()).unwrap(),
        )
        .build()
        .user_data(7);
        // SAFETY: `buf` outlives the read (the test waits for its completion below).
        unsafe { ring.submission().push(&read) }.expect("room");
        ring.submit().expect("submit");
        // Nothing on the TAP: no completion (an EAGAIN would be one).
        let ts = types::Timespec::new().nsec(100_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = ring.submitter().submit_with_args(1, &args);
        assert!(
            ring.completion()
                .next()
                .map(|c: io_uring::cqueue::Entry| c.result())
                .is_none(),
            "the read completed on an empty TAP"
        );
        // A datagram to the neighbour leaves through the TAP: the read completes with it.
        let sock = std::net::UdpSocket::bind("10.77.0.1:0").expect("socket");
        sock.send_to(&[0x5a; 64], "10.77.0.2:9").expect("send");
        let ts = types::Timespec::new().sec(2);
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = ring.submitter().submit_with_args(1, &args);
        let cqe = ring.completion().next().expect("the read completed");
        assert_eq!(cqe.user_data(), 7);
        // vnet header (12) + Ethernet (14) + IPv4 (20) + UDP (8) + 64.
        assert_eq!(cqe.result(), 12 + 14 + 20 + 8 + 64, "the frame's length");
    })
    .expect("a namespace");
}
