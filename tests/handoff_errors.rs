//! The handoff's refusals: bad state blobs (from the CLI and in flight to a successor), peers
//! running as another user; and the embedding API's snapshot/restore without the protocol.

use std::net::UdpSocket;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tapir_datapath::EngineKind;
use tapir_migrate::{
    hand_off, protocol, restore, snapshot_of, take_over, Channel, ChannelError, DeviceSource,
    Listener, MigrateError, Outcome, SuccessorOptions, Timeouts,
};
use tapir_simguest::{TxDriver, VirtioNetHdr};
use tapir_testkit::frames::{build_udp, verify_payload};
use tapir_testkit::netns::run_in_new_netns;
use tapir_testkit::{Rig, RigConfig, HOST_IP};

const EXE: &str = env!("CARGO_BIN_EXE_tapir");

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tapir-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Guest -> host datagrams still flow: `n` datagrams, each received and verified.
fn traffic_flows(rig: &Rig, tx: &mut TxDriver, sock: &UdpSocket, first_seq: u64, n: u64) {
    let flow = rig.guest_to_host(5000, 9000);
    let mut buf = vec![0u8; 512];
    for seq in first_seq..first_seq + n {
        let len = build_udp(&mut buf, &flow, 200, 7, seq).unwrap();
        assert!(tx.send(&VirtioNetHdr::default(), &buf[..len]).unwrap());
        let mut r = [0u8; 2048];
        let (got, _) = sock.recv_from(&mut r).expect("datagram to the host");
        assert_eq!(verify_payload(&r[..got]).unwrap(), (7, seq));
        tx.reclaim();
    }
}

#[test]
fn state_inspect_prints_json_and_refuses_bad_blobs() {
    let dir = tmp("inspect");
    let good = tapir_state::try_encode(&tapir_state::example_snapshot()).unwrap();
    let path = dir.join("good.state");
    std::fs::write(&path, &good).unwrap();
    let out = Command::new(EXE)
        .args(["state", "inspect"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json.to_string().contains("queue_pairs"), "{json}");

    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    let mut future = good.clone();
    future[8] = 0xff;
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("corrupted", flipped, "checksum"),
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        (
            "wrong-magic",
            [b"NOTTAPIR".as_slice(), &good[8..]].concat(),
            "magic",
        ),
        ("future-version", future, "newer than this build"),
    ];
    for (name, blob, expect) in cases {
        let p = dir.join(format!("{name}.state"));
        std::fs::write(&p, blob).unwrap();
        let out = Command::new(EXE)
            .args(["state", "inspect"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(!out.status.success(), "{name}: accepted");
        assert!(err.contains(expect), "{name}: {err}");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Mutates a message payload in flight.
type Damage = fn(&mut Vec<u8>);

/// Relays one handoff between a source and a successor channel, damaging the SWITCH blob.
fn relay(source: Channel, successor: Channel, damage: Damage) {
    let forward = |from: &Channel, to: &Channel, damage: Option<Damage>| -> bool {
        let Ok(mut m) = from.recv(Some(Duration::from_secs(10))) else {
            return false;
        };
        if let (Some(d), protocol::SWITCH) = (damage, m.kind) {
            d(&mut m.payload);
        }
        let fds: Vec<BorrowedFd<'_>> = m.fds.iter().map(OwnedFd::as_fd).collect();
        to.send(m.kind, &m.payload, &fds).is_ok()
    };
    std::thread::scope(|s| {
        s.spawn(|| while forward(&successor, &source, None) {});
        while forward(&source, &successor, Some(damage)) {}
    });
}

#[test]
fn damaged_switch_blobs_are_refused_and_the_source_resumes() {
    // The blob after the 8-byte quiesce time in the SWITCH payload.
    let damages: [(&str, Damage, &str); 4] = [
        ("corrupted", |p| *p.last_mut().unwrap() ^= 1, "checksum"),
        ("truncated", |p| p.truncate(p.len() - 7), "truncated"),
        ("wrong magic", |p| p[8] = b'X', "magic"),
        ("future version", |p| p[16] = 0x7f, "newer than this build"),
    ];
    for engine in [EngineKind::Uring, EngineKind::Classic] {
        run_in_new_netns(move || {
            let mut rig = Rig::start(&RigConfig::new(engine, 1)).unwrap();
            let sock = UdpSocket::bind((HOST_IP, 9000)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let (_rx, mut tx) = rig.take(0);
            let mut source = DeviceSource::new(rig.device.take().unwrap(), 0);
            let mut seq = 0;
            for (name, damage, expect) in damages {
                let (src_end, relay_src) = Channel::pair().unwrap();
                let (relay_succ, succ_end) = Channel::pair().unwrap();
                let result = std::thread::scope(|s| {
                    s.spawn(move || relay(relay_src, relay_succ, damage));
                    let succ =
                        s.spawn(move || take_over(&succ_end, &SuccessorOptions::new(engine)));
                    let outcome = hand_off(&mut source, &src_end, Timeouts::default()).unwrap();
                    drop(src_end);
                    (outcome, succ.join().unwrap())
                });
                match result {
                    (Outcome::RolledBack(_), Err(MigrateError::State(e))) => {
                        assert!(e.to_string().contains(expect), "{engine} {name}: {e}");
                    }
                    (o, s) => panic!(
                        "{engine} {name}: source {o:?}, successor {:?}",
                        s.map(|t| t.generation)
                    ),
                }
                // The source resumed: traffic flows again, nothing lost.
                rig.device = source.into_running();
                assert!(
                    rig.device.is_some(),
                    "{engine} {name}: source did not resume"
                );
                traffic_flows(&rig, &mut tx, &sock, seq, 20);
                seq += 20;
                source = DeviceSource::new(rig.device.take().unwrap(), 0);
            }
            rig.device = source.into_running();
            rig.shutdown().unwrap();
        })
        .unwrap();
    }
}

#[test]
fn peers_running_as_another_user_are_refused() {
    let dir = tmp("creds");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.join("handoff.sock");
    let listener = Listener::bind(&sock).unwrap();
    let target = sock.clone();
    let nobody = move |listen: &Path| {
        Command::new(EXE)
            .args(["datapath", "--take-over"])
            .arg(&target)
            .arg("--listen")
            .arg(listen)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    // Mode 0600: another user cannot even connect.
    let out = nobody(&dir.join("a.sock"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connect"),
        "{out:?}"
    );
    assert!(matches!(
        listener.accept(Some(Duration::from_millis(200))),
        Err(ChannelError::Timeout(_))
    ));
    // Even where the socket file lets it in, SO_PEERCRED refuses it.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let child = std::thread::spawn({
        let dir = dir.clone();
        let nobody = nobody.clone();
        move || nobody(&dir.join("b.sock"))
    });
    match listener.accept(Some(Duration::from_secs(10))) {
        Err(ChannelError::ForeignPeer { uid, .. }) => assert_eq!(uid, 65534),
        other => panic!("a peer running as uid 65534 was not refused: {other:?}"),
    }
    let out = child.join().unwrap();
    assert!(
        !out.status.success(),
        "the refused successor must fail: {out:?}"
    );
    drop(listener);
    std::fs::remove_dir_all(dir).ok();
}

/// The embedding API: quiesce, snapshot with fds, restore in this process, resume: the
/// rings continue where they stopped.
#[test]
fn embedded_snapshot_and_restore() {
    for engine in [EngineKind::Uring, EngineKind::Classic] {
        run_in_new_netns(move || {
            let mut rig = Rig::start(&RigConfig::new(engine, 1)).unwrap();
            let sock = UdpSocket::bind((HOST_IP, 9000)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let (_rx, mut tx) = rig.take(0);
            traffic_flows(&rig, &mut tx, &sock, 0, 30);
            let quiesced = rig.device.take().unwrap().quiesce().unwrap();
            let (snapshot, fds) = snapshot_of(&quiesced, 1);
            let blob = tapir_state::try_encode(&snapshot).unwrap();
            let fds: Vec<OwnedFd> = fds
                .iter()
                .map(|f| f.try_clone_to_owned().unwrap())
                .collect();
            drop(quiesced);
            let decoded = tapir_state::decode(&blob).unwrap();
            assert_eq!(decoded.queue_pairs[0].tx.next_used, 30);
            let device = restore(decoded, fds, &SuccessorOptions::new(engine)).unwrap();
            rig.device = Some(device);
            traffic_flows(&rig, &mut tx, &sock, 30, 30);
            rig.shutdown().unwrap();
        })
        .unwrap();
    }
}
