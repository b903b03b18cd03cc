use super::*;

fn state() -> SessionState {
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
        vrings: vec![
            VringState {
                size: 256,
                addrs: Some(VringAddrs::default()),
                base: 7,
                held: vec![3, 4],
                kick: Some(3),
                call: Some(4),
                err: None,
                enabled: true,
                started: true,
            },
            VringState {
                size: 256,
                addrs: None,
                base: 0,
                held: vec![],
                kick: None,
                call: None,
                err: None,
                enabled: false,
                started: false,
            },
        ],
        log: None,
        running_pairs: vec![0],
        connection: Some(0),
        generation: 3,
        taps: vec![1],
        endpoint: EndpointState {
            path: "/run/tapir.sock".into(),
            client: false,
            listener: Some(5),
            handoff: Some(("/run/tapir.handoff".into(), 6)),
        },
        requests: 42,
        report: ReportState::default(),
        carried: Vec::new(),
    }
}

fn encode(s: &SessionState) -> Vec<u8> {
    super::encode(s).unwrap()
}

#[test]
fn a_session_round_trips() {
    let s = state();
    assert_eq!(decode(&encode(&s), 7).unwrap(), s);
}

#[test]
fn a_version_1_blob_still_decodes() {
    let s = state();
    let mut v1 = LEGACY_MAGIC.to_vec();
    v1.extend_from_slice(&LEGACY_VERSION.to_le_bytes());
    v1.extend_from_slice(&postcard::to_allocvec(&s).unwrap());
    assert_eq!(decode(&v1, 7).unwrap(), s);
    let mut v9 = v1.clone();
    v9[4] = 9;
    assert!(matches!(decode(&v9, 7), Err(SessionStateError::Header)));
}

#[test]
fn a_flipped_payload_byte_fails_the_checksum() {
    let blob = encode(&state());
    for i in [tapir_state::HEADER_LEN, blob.len() - 1] {
        let mut bad = blob.clone();
        bad[i] ^= 0x01;
        assert!(
            matches!(
                decode(&bad, 7),
                Err(SessionStateError::Frame(
                    tapir_state::StateError::Checksum { .. }
                ))
            ),
            "byte {i}"
        );
    }
}

#[test]
fn truncated_foreign_or_inconsistent_blobs_are_refused() {
    let blob = encode(&state());
    for cut in [0, 3, 6, blob.len() / 2, blob.len() - 1] {
        assert!(decode(&blob[..cut], 7).is_err(), "cut at {cut}");
    }
    let mut other = blob.clone();
    other[4] ^= 0xff;
    assert!(matches!(
        decode(&other, 7),
        Err(SessionStateError::Frame(
            tapir_state::StateError::BadMagic { .. }
        ))
    ));
    // Fewer fds than the blob refers to.
    assert!(decode(&blob, 6).is_err());
    // An fd used twice.
    let mut s = state();
    s.taps = vec![0];
    assert!(decode(&encode(&s), 7).is_err());
    // A held head beyond its ring.
    let mut s = state();
    s.vrings[0].held = vec![300];
    assert!(decode(&encode(&s), 7).is_err());
    // A running pair listed twice.
    let mut s = state();
    s.running_pairs = vec![0, 0];
    assert!(decode(&encode(&s), 7).is_err());
    // A held head listed twice (it would be used twice).
    let mut s = state();
    s.vrings[0].held = vec![3, 3];
    assert!(decode(&encode(&s), 7).is_err());
    // Vrings that do not match the queue pairs.
    let mut s = state();
    s.queue_pairs = 2;
    assert!(decode(&encode(&s), 7).is_err());
}

#[test]
fn report_endpoints_ride_in_version_3_and_only_then() {
    let plain = encode(&state());
    assert_eq!(
        plain[8..10],
        VERSION.to_le_bytes(),
        "no endpoints: version 2"
    );
    let mut s = state();
    s.report = ReportState {
        control: Some(("/run/tapir.control".into(), 7)),
        metrics: Some(8),
    };
    let blob = encode(&s);
    assert_eq!(blob[8..10], VERSION_WITH_REPORT.to_le_bytes());
    assert_eq!(decode(&blob, 9).unwrap(), s);
    // Their fds are claimed like the others: missing or shared ones are refused.
    assert!(decode(&blob, 8).is_err());
    let mut shared = s.clone();
    shared.report.metrics = Some(5);
    assert!(decode(&encode(&shared), 9).is_err());
}

#[test]
fn report_listeners_that_are_not_what_the_blob_says_are_refused() {
    use std::os::fd::OwnedFd;
    let dir = std::env::temp_dir().join(format!("tapir-handoff-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("control.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let tcp = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let bare = |s: &mut SessionState| {
        s.connection = None;
        s.running_pairs.clear();
        s.taps.clear();
        s.regions.clear();
        s.vrings.iter_mut().for_each(|v| {
            v.kick = None;
            v.call = None;
        });
        s.endpoint.listener = None;
        s.endpoint.handoff = None;
    };
    let check = |report: ReportState, fds: Vec<OwnedFd>| {
        let mut s = state();
        bare(&mut s);
        s.report = report;
        check_fds(&s, &fds)
    };
    let path_s = path.display().to_string();
    let ok = check(
        ReportState {
            control: Some((path_s.clone(), 0)),
            metrics: Some(1),
        },
        vec![
            listener.try_clone().unwrap().into(),
            tcp.try_clone().unwrap().into(),
        ],
    );
    assert!(ok.is_ok(), "{ok:?}");
    // Bound elsewhere than the blob says: the successor would delete that path.
    let elsewhere = check(
        ReportState {
            control: Some(("/etc/passwd".into(), 0)),
            metrics: None,
        },
        vec![listener.try_clone().unwrap().into()],
    );
    assert!(elsewhere.is_err());
    // A metrics "listener" that is a Unix socket, or a TCP socket off loopback.
    let unix = check(
        ReportState {
            control: None,
            metrics: Some(0),
        },
        vec![listener.try_clone().unwrap().into()],
    );
    assert!(unix.is_err());
    // Bound to every address, in a network namespace of its own (nothing can reach it).
    let wide = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap()
    })
    .join()
    .unwrap();
    let off_loopback = check(
        ReportState {
            control: None,
            metrics: Some(0),
        },
        vec![wide.into()],
    );
    let e = off_loopback.unwrap_err().to_string();
    assert!(e.contains("loopback"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A frame as the TAP hands it over: the vnet header, then `len` bytes.
fn frame(len: usize, fill: u8) -> CarriedFrame {
    CarriedFrame::try_from(vec![fill; 12 + len]).unwrap()
}

/// The state of a session whose rings are stopped (nothing runs) with frames kept.
fn stopped_with_carried() -> SessionState {
    let mut s = state();
    s.running_pairs.clear();
    s.carried = vec![CarriedFrames::try_from(vec![frame(1042, 1), frame(60, 2)]).unwrap()];
    s
}

#[test]
fn carried_frames_ride_in_version_4_and_only_then() {
    let s = stopped_with_carried();
    let blob = encode(&s);
    assert_eq!(blob[8..10], VERSION_WITH_CARRIED.to_le_bytes());
    let back = decode(&blob, 7).unwrap();
    assert_eq!(back, s);
    assert_eq!(back.carried, s.carried, "serde(skip) fields compared too");
    // With report endpoints as well: both ride.
    let mut both = s.clone();
    both.report.metrics = Some(7);
    assert_eq!(decode(&encode(&both), 8).unwrap().carried, s.carried);
    // None kept: an earlier version, which an earlier successor still reads.
    let mut none = s.clone();
    none.carried.clear();
    assert_eq!(encode(&none)[8..10], VERSION.to_le_bytes());
}

#[test]
fn a_flipped_bit_in_a_blob_with_carried_frames_is_refused() {
    let blob = encode(&stopped_with_carried());
    for bit in [0, 8 * (blob.len() / 2) + 3, 8 * blob.len() - 1] {
        let mut bad = blob.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let e = decode(&bad, 7).unwrap_err();
        assert!(
            matches!(
                &e,
                SessionStateError::Frame(tapir_state::StateError::Checksum { .. })
                    | SessionStateError::Frame(tapir_state::StateError::BadMagic { .. })
            ),
            "bit {bit}: {e}"
        );
        assert!(e.to_string().starts_with("session blob: "), "{e}");
    }
}

#[test]
fn carried_frames_that_do_not_add_up_are_refused() {
    // One list per queue pair, or none.
    let mut s = stopped_with_carried();
    s.carried.push(CarriedFrames::default());
    assert!(matches!(
        decode(&encode(&s), 7),
        Err(SessionStateError::Invalid(_))
    ));
    // A pair the handed-on device runs carries its frames in the device snapshot.
    let mut s = stopped_with_carried();
    s.running_pairs = vec![0];
    assert!(matches!(
        decode(&encode(&s), 7),
        Err(SessionStateError::Invalid(_))
    ));
    // A frame shorter than a vnet header, in a blob made by hand (the types refuse it).
    let s = stopped_with_carried();
    let mut payload = postcard::to_allocvec(&s).unwrap();
    payload.extend(postcard::to_allocvec(&s.report).unwrap());
    payload.extend(postcard::to_allocvec(&vec![vec![vec![0u8; 4]]]).unwrap());
    let blob = tapir_state::seal(MAGIC, VERSION_WITH_CARRIED, &payload);
    assert!(matches!(
        decode(&blob, 7),
        Err(SessionStateError::Decode(_))
    ));
    // Bytes after the last part.
    let mut payload = postcard::to_allocvec(&s).unwrap();
    payload.extend(postcard::to_allocvec(&s.report).unwrap());
    payload.extend(postcard::to_allocvec(&s.carried).unwrap());
    payload.push(0);
    let blob = tapir_state::seal(MAGIC, VERSION_WITH_CARRIED, &payload);
    assert!(matches!(
        decode(&blob, 7),
        Err(SessionStateError::Invalid(_))
    ));
}
