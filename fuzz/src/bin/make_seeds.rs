//! Writes the committed seed corpora: `cargo run --release --bin make_seeds -- corpus`.
//! A few hand-made inputs per target, in each target's input format (see its doc comment).

use std::path::Path;

use tapir_fuzz::Output;

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let dir = Path::new(&dir);
    for (target, seeds) in all() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).expect("mkdir");
        for (name, bytes) in seeds {
            std::fs::write(d.join(name), bytes).expect("write seed");
        }
    }
}

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("chain_walk", chain_walk()),
        ("give_back", give_back()),
        ("vhost_wire", vhost_wire()),
        ("session", session()),
        ("memory_table", memory_table()),
        ("dirty_log", dirty_log()),
        ("state_decode", state_decode()),
        ("handoff_source", handoff_source()),
        ("handoff_successor", handoff_successor()),
        ("rx_pair", rx_pair()),
        ("tx_pair", tx_pair()),
    ]
}

fn give_back() -> Seeds {
    // size 16 (exponent 3), next_avail, next_used, flags, held, then the avail ring.
    let seed = |next_avail: u16, next_used: u16, held: &[u16], ring: &[u16]| {
        let mut o = Output::default();
        o.u8(3).u16(next_avail).u16(next_used).u8(0);
        o.u8(u8::try_from(held.len()).unwrap());
        for &h in held {
            o.u16(h);
        }
        o.u16(0).u16(next_avail);
        for &h in ring {
            o.u16(h);
        }
        o.data
    };
    vec![
        ("all_rewound", seed(3, 0, &[0, 1, 2], &[0, 1, 2])),
        ("one_below_the_tail", seed(3, 0, &[0, 2], &[0, 1, 2])),
        ("duplicate_heads", seed(4, 0, &[5, 5, 5], &[5, 6, 5, 5])),
        (
            "wrapped_indices",
            seed(
                1,
                65535,
                &[7, 3],
                &[3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
            ),
        ),
    ]
}

/// A vhost-user header: request, flags (version 1), body size.
fn header(request: u32, size: u32) -> Vec<u8> {
    let mut o = Output::default();
    o.u32(request).u32(1).u32(size);
    o.data
}

fn vhost_wire() -> Seeds {
    let piece = |o: &mut Output, nfds: u8, bytes: &[u8]| {
        o.u8(nfds).blob(bytes);
    };
    let mut s = Seeds::new();
    let mut o = Output::default();
    piece(&mut o, 0, &header(1, 0));
    s.push(("get_features", o.data));
    let mut o = Output::default();
    let mut msg = header(5, 8 + 32);
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    for v in [0u64, 0x10000, 0x7f00_0000_0000, 0] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    piece(&mut o, 1, &msg);
    s.push(("mem_table_one_fd", o.data));
    let mut o = Output::default();
    piece(&mut o, 40, &header(12, 8));
    piece(&mut o, 0, &0u64.to_le_bytes());
    s.push(("too_many_fds", o.data));
    let mut o = Output::default();
    let h = header(2, 8);
    piece(&mut o, 0, &h[..5]);
    piece(&mut o, 2, &h[5..]);
    piece(&mut o, 0, &[1, 2, 3, 4, 5, 6, 7, 8]);
    s.push(("split_header", o.data));
    let mut o = Output::default();
    piece(&mut o, 0, &header(1, 0x10000));
    s.push(("oversized_body", o.data));
    s
}

/// One session request: code, flags, fd kinds, then the body's fields.
fn req(o: &mut Output, code: u8, fds: &[u8]) {
    o.u8(code).u8(0).u8(u8::try_from(fds.len()).unwrap());
    for &k in fds {
        o.u8(k);
    }
}

fn session() -> Seeds {
    // Fields in the order fuzz_targets/session.rs reads them.
    let vring = |o: &mut Output, i: u8, desc: u8, used: u8, avail: u8| {
        req(o, 8, &[]);
        o.u8(i).u8(0).u8(8); // SET_VRING_NUM 1 << 8
        req(o, 9, &[]);
        o.u8(i).u8(0);
        for a in [desc, used, avail] {
            o.u8(2).u8(a); // USER_BASE + 0x1000 * a
        }
        o.u16(0);
        req(o, 10, &[]);
        o.u8(i).u8(0).u16(0); // SET_VRING_BASE 0
        req(o, 13, &[1]);
        o.u8(i).u8(0); // SET_VRING_CALL with an eventfd
        req(o, 12, &[1]);
        o.u8(i).u8(0); // SET_VRING_KICK with an eventfd
        req(o, 18, &[]);
        o.u8(i).u8(0).u8(1); // SET_VRING_ENABLE 1
    };
    let setup = |o: &mut Output, engine: u8| {
        o.u8(engine);
        req(o, 1, &[]); // GET_FEATURES
        req(o, 2, &[]);
        o.u8(0); // SET_FEATURES: all offered
        req(o, 16, &[]);
        o.u8(0); // SET_PROTOCOL_FEATURES: all offered
        req(o, 5, &[0]);
        o.u8(1); // SET_MEM_TABLE, one region: guest 0, 64 KiB, USER_BASE, offset 0
        o.u8(0).u8(0).u8(0).u8(0);
    };
    let mut s = Seeds::new();
    for (name, engine) in [("pair_running_uring", 0u8), ("pair_running_classic", 1)] {
        let mut o = Output::default();
        setup(&mut o, engine);
        vring(&mut o, 0, 1, 3, 2);
        vring(&mut o, 1, 5, 7, 6);
        req(&mut o, 11, &[]);
        o.u8(0).u8(0).u16(0); // GET_VRING_BASE 0
        s.push((name, o.data));
    }
    let mut o = Output::default();
    setup(&mut o, 0);
    req(&mut o, 6, &[2]);
    o.u8(2).u8(0); // SET_LOG_BASE: 4 KiB at 0, of a 4 KiB memfd
    req(&mut o, 37, &[0]);
    o.u8(1).u8(1).u8(0).u8(1).u8(1).u8(0); // ADD_MEM_REG
    req(&mut o, 38, &[]);
    o.u8(1).u8(1).u8(0).u8(1).u8(1).u8(0); // REM_MEM_REG
    req(&mut o, 4, &[]); // RESET_OWNER
    s.push(("log_and_regions", o.data));
    s
}

fn memory_table() -> Seeds {
    // A region: four value choices (index into the target's typical values) and an fd kind.
    let region = |o: &mut Output, g: u8, size: u8, user: u8, off: u8, fd: u8| {
        o.u8(g).u8(size).u8(user).u8(off).u8(fd);
    };
    let mut s = Seeds::new();
    let mut o = Output::default();
    o.u8(0).u8(2);
    region(&mut o, 0, 0, 0, 0, 0);
    region(&mut o, 1, 0, 1, 0, 0);
    o.u8(3).u8(1).u8(1); // va_to_gpa(region 0's user + 0xfff)
    o.u8(4); // map
    s.push(("replace_translate_map", o.data));
    let mut o = Output::default();
    o.u8(1);
    region(&mut o, 0, 1, 0, 0, 1);
    o.u8(1);
    region(&mut o, 0, 1, 0, 0, 1);
    o.u8(2).u8(0); // remove region 0
    o.u8(4);
    s.push(("add_twice_remove", o.data));
    let mut o = Output::default();
    o.u8(1);
    region(&mut o, 2, 2, 2, 2, 2); // an eventfd region
    o.u8(4);
    s.push(("eventfd_region", o.data));
    s
}

fn dirty_log() -> Seeds {
    let mut s = Seeds::new();
    let mut o = Output::default();
    o.u8(0).u8(0).u8(0); // a 4 KiB log at 0 of a 4 KiB file
    o.u8(0).u8(0).u8(3); // one region at 0, 4 pages
    o.u8(0).u8(0).u16(5); // mark page 5
    o.u8(1); // mark_all
    o.u8(2).u8(0).u16(0x1ff0).u16(0x20); // dirty across a page boundary, flush
    s.push(("mark_all_flush", o.data));
    let mut o = Output::default();
    o.u8(1).u8(1).u8(1); // an 8 KiB file, 4 KiB log at 4 KiB
    o.u8(1).u8(1).u8(2).u8(1).u8(2).u8(1); // two regions
    o.u8(0).u8(2).u64(u64::MAX);
    o.u8(1);
    s.push(("two_regions_high_mark", o.data));
    s
}

fn session_state() -> tapir_vhost_user::handoff::SessionState {
    use tapir_vhost_user::handoff::{EndpointState, RegionState, SessionState, VringState};
    let vring = |kick: Option<u16>| VringState {
        size: 256,
        addrs: None,
        base: 0,
        held: vec![],
        kick,
        call: None,
        err: None,
        enabled: kick.is_some(),
        started: kick.is_some(),
    };
    SessionState {
        queue_pairs: 1,
        mac: [0x52, 0x54, 0, 0, 0, 1],
        features: 1 << 32,
        protocol_features: 0xb,
        regions: vec![RegionState {
            guest_addr: 0,
            size: 1 << 20,
            user_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
            fd: 2,
        }],
        vrings: vec![vring(Some(3)), vring(None)],
        log: None,
        running_pairs: vec![0],
        connection: Some(0),
        generation: 3,
        taps: vec![1],
        endpoint: EndpointState {
            path: "/run/tapir.sock".into(),
            client: false,
            listener: Some(4),
            handoff: None,
        },
        requests: 42,
        report: Default::default(),
        carried: Vec::new(),
    }
}

fn state_decode() -> Seeds {
    let blob = tapir_state::try_encode(&tapir_state::example_snapshot()).expect("valid");
    let small = tapir_state::try_encode(&tapir_fuzz::small_snapshot(16)).expect("valid");
    let session = tapir_vhost_user::handoff::encode(&session_state()).expect("encodes");
    let with = |mode: u8, extra: &[u8], b: &[u8]| {
        let mut v = vec![mode];
        v.extend_from_slice(extra);
        v.extend_from_slice(b);
        v
    };
    vec![
        ("snapshot_example", with(0, &[], &blob)),
        ("snapshot_small", with(0, &[], &small)),
        (
            "payload_example",
            with(1, &[], &blob[tapir_state::HEADER_LEN..]),
        ),
        (
            "payload_small",
            with(1, &[], &small[tapir_state::HEADER_LEN..]),
        ),
        ("session_blob", with(2, &[5], &session)),
        ("session_payload", with(3, &[5], &session[6..])),
    ]
}

fn handoff_source() -> Seeds {
    // Messages: kind choice, payload choice (0: the right one), fd count.
    let script = |mode: u8, msgs: &[(u8, u8, u8)]| {
        let mut o = Output::default();
        o.u8(mode);
        for &(k, p, f) in msgs {
            o.u8(k).u8(p).u8(f);
        }
        o.data
    };
    vec![
        (
            "commit",
            script(0, &[(0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0)]),
        ),
        (
            "abort_after_switch",
            script(0, &[(0, 0, 0), (1, 0, 0), (4, 0, 0)]),
        ),
        ("no_running", script(0, &[(0, 0, 0), (1, 0, 0), (2, 0, 0)])),
        (
            "fds_from_the_peer",
            script(0, &[(0, 0, 2), (1, 0, 3), (2, 0, 1), (3, 0, 0)]),
        ),
        ("state_only_commit", script(1, &[(0, 0, 0), (3, 0, 0)])),
        ("bad_hello", {
            let mut o = Output::default();
            o.u8(0).u8(0).u8(1).u8(6).bytes(&[9, 0, 1, 0, 0, 0]).u8(0);
            o.data
        }),
    ]
}

fn handoff_successor() -> Seeds {
    let takeover = |engine: u8, size_exp: u8| {
        let mut o = Output::default();
        o.u8(engine);
        // Each: kind choice, raw (0: built), the payload's fields, the fd choice.
        o.u8(0).u8(0).u8(size_exp).u8(0).u8(0); // PREPARE: layout, no changes, no fds
        o.u8(1).u8(0).u8(0).u8(0); // FDS from 0: the six manifest fds
        o.u8(2).u8(0).u8(1).u8(0); // EXTENSION with one fd (a memfd)
        o.u8(3).u8(0).u8(size_exp).u8(0).u8(0); // SWITCH: the same layout
        o.u8(4).u8(0).u8(0); // GO
        o.data
    };
    let mut s = vec![
        ("takeover_uring", takeover(0, 4)),
        ("takeover_classic", takeover(1, 4)),
    ];
    let mut o = Output::default();
    o.u8(0).u8(5).u8(1).u8(3).bytes(b"abc").u8(2).u8(1).u8(1);
    s.push(("state_only", o.data));
    let mut o = Output::default();
    o.u8(0);
    o.u8(0).u8(0).u8(4).u8(1).u64(1 << 40).u8(0); // a region longer than its fd
    o.u8(1).u8(0).u8(0).u8(0);
    o.u8(2).u8(0).u8(0);
    o.u8(3).u8(0).u8(4).u8(1).u64(1 << 40).u8(0);
    o.u8(4).u8(0).u8(0);
    s.push(("long_region", o.data));
    s
}

/// A guest patch for rx_pair/tx_pair: address / 4, blob.
fn patch(o: &mut Output, addr: u64, bytes: &[u8]) {
    o.u16(u16::try_from(addr / 4).unwrap()).blob(bytes);
}

fn descs(base: u64, n: u16, len: u32, flags: u16) -> Vec<u8> {
    let mut o = Output::default();
    for i in 0..n {
        desc(&mut o, base + u64::from(i) * 0x800, len, flags, 0);
    }
    o.data
}

fn avail(idx: u16, heads: &[u16]) -> Vec<u8> {
    let mut o = Output::default();
    o.u16(0).u16(idx);
    for &h in heads {
        o.u16(h);
    }
    o.data
}

fn rx_pair() -> Seeds {
    let mut s = Seeds::new();
    for (name, bits, len) in [("rx_plain", 0u8, 1000u16), ("rx_mrg_evidx_big", 3, 5000)] {
        let mut o = Output::default();
        o.u8(3).u8(bits).u16(0);
        o.u8(2);
        patch(&mut o, 0, &descs(0x8000, 8, 0x800, WRITE));
        patch(&mut o, 0x1000, &avail(8, &[0, 1, 2, 3, 4, 5, 6, 7]));
        o.u8(0).u8(2).u16(len).bytes(&[0; 12]); // deliver
        o.u8(1); // prepare
        o.u8(2).u8(0).u8(1).bytes(&[0; 12]); // write 1514 + complete
        o.u8(7).u8(1); // the guest posts again
        patch(
            &mut o,
            0x1000,
            &avail(16, &[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7]),
        );
        o.u8(3).u8(6); // retry, interrupts
        s.push((name, o.data));
    }
    s
}

fn tx_pair() -> Seeds {
    let mut s = Seeds::new();
    let mut o = Output::default();
    o.u8(3).u8(2);
    o.u8(2);
    patch(&mut o, 0x3000, &descs(0x8000, 8, 72, 0));
    patch(&mut o, 0x4000, &avail(4, &[0, 1, 2, 3]));
    o.u8(0).u8(0).u8(2); // two pops, a send
    o.u8(1).u8(1).u8(0); // complete the second in full
    o.u8(1).u8(0).u8(2); // the first with EAGAIN
    o.u8(3).u8(4);
    s.push(("tx_out_of_order", o.data));
    s
}

/// A descriptor in its guest layout.
fn desc(o: &mut Output, addr: u64, len: u32, flags: u16, next: u16) {
    o.u64(addr).u32(len).u16(flags).u16(next);
}

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

fn chain_walk() -> Seeds {
    let hdr = |o: &mut Output, head: u16, flags: u8| {
        o.u16(head).u8(flags).u8(0).u64(0);
    };
    let mut s = Seeds::new();
    let mut o = Output::default();
    hdr(&mut o, 0, 0);
    desc(&mut o, 0x4000, 12, NEXT, 1);
    desc(&mut o, 0x5000, 1500, 0, 0);
    s.push(("two_tx", o.data));
    let mut o = Output::default();
    hdr(&mut o, 0, 1);
    desc(&mut o, 0x2000, 32, INDIRECT, 0);
    o.bytes(&vec![0u8; 0x1000 - 16]);
    desc(&mut o, 0x4000, 12, WRITE | NEXT, 1);
    desc(&mut o, 0x20000, 1500, WRITE, 0);
    s.push(("indirect_rx", o.data));
    let mut o = Output::default();
    hdr(&mut o, 0, 0);
    desc(&mut o, 0xfff0, 0x20, 0, 0);
    s.push(("across_hole", o.data));
    let mut o = Output::default();
    hdr(&mut o, 0, 4);
    desc(&mut o, 0x4000, 10, NEXT, 1);
    desc(&mut o, 0x4000, 10, NEXT, 0);
    s.push(("loop", o.data));
    s
}
