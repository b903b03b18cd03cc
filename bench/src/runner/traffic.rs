//! The host side of a throughput cell: the frames each direction sends and the peers that
//! send (the AF_PACKET generator) or sink (the UDP sink) them.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use tapir_simguest::VirtioNetHdr;
use tapir_testkit::frames::{self, FlowSpec, VnetHdr};
use tapir_testkit::{GUEST_IP, GUEST_MAC, HOST_IP, TAP_NAME};

use super::Scenario;
use crate::peers::{
    GeneratorConfig, GeneratorReport, PacketGenerator, PeerHandle, RunControl, SeqMode, SinkReport,
    Template, UdpSink, UdpSinkConfig,
};

/// Largest frame the kernel keeps whole as one GSO super-frame.
const TSO_FRAME: usize = frames::MAX_GSO_FRAME;
const TSO_MSS: u16 = 1448;
const SINK_PORT: u16 = 9000;
/// An address on the TAP's subnet that nobody owns: TSO frames sent there are dropped by the
/// host's routing (forwarding is off) without being segmented or answered.
const BLACKHOLE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 200);

/// A unicast, locally administered MAC nobody on the TAP's link owns: the host takes frames
/// sent to it as `PACKET_OTHERHOST` and drops them before IP (`tx-drop`), after the TAP
/// counted them.
const UNOWNED_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0xde, 0xad];

/// Where the guest's TX frames go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TxSink {
    /// To the host: a UDP sink (up to 1500 bytes) or, for TSO frames, an address nobody
    /// owns (dropped by routing).
    Host,
    /// To a MAC nobody owns: dropped right after the TAP.
    Drop,
}

impl TxSink {
    fn of(scenario: Scenario) -> TxSink {
        match scenario {
            Scenario::TxDrop => TxSink::Drop,
            Scenario::Tx | Scenario::Rx | Scenario::Bidir => TxSink::Host,
        }
    }
}

fn frame_len(frame: usize) -> usize {
    frame.min(TSO_FRAME)
}

/// The frames a scenario sends, each with its vnet header (one per flow).
fn build_frames(
    scenario: Scenario,
    sink: TxSink,
    frame: usize,
    flows: usize,
    host_mac: [u8; 6],
) -> Result<Vec<(VnetHdr, Vec<u8>)>> {
    let mut out = Vec::with_capacity(flows);
    for i in 0..flows {
        let port = 10_000 + u16::try_from(i).unwrap_or(0);
        let (spec, tso) = match scenario {
            Scenario::Tx | Scenario::TxDrop => (
                FlowSpec {
                    src_mac: GUEST_MAC,
                    dst_mac: match sink {
                        TxSink::Host => host_mac,
                        TxSink::Drop => UNOWNED_MAC,
                    },
                    src_ip: GUEST_IP,
                    dst_ip: if frame > 1500 { BLACKHOLE_IP } else { HOST_IP },
                    src_port: port,
                    dst_port: SINK_PORT,
                },
                frame > 1500,
            ),
            Scenario::Rx | Scenario::Bidir => (
                FlowSpec {
                    src_mac: host_mac,
                    dst_mac: GUEST_MAC,
                    src_ip: HOST_IP,
                    dst_ip: GUEST_IP,
                    src_port: port,
                    dst_port: SINK_PORT,
                },
                frame > 1500,
            ),
        };
        let mut buf = vec![0u8; frame_len(frame)];
        let flow = u32::try_from(i).unwrap_or(0);
        if tso {
            let f = frames::build_tcp_tso(&mut buf, &spec, frame_len(frame), TSO_MSS, 1, flow, 0)?;
            buf.truncate(f.len);
            out.push((f.vnet, buf));
        } else {
            let n = frames::build_udp(&mut buf, &spec, frame_len(frame), flow, 0)?;
            buf.truncate(n);
            out.push((VnetHdr::default(), buf));
        }
    }
    Ok(out)
}

pub(super) fn to_guest_hdr(h: &VnetHdr) -> VirtioNetHdr {
    VirtioNetHdr::from_bytes(&h.to_bytes())
}

/// The frames of each direction a scenario runs.
pub(super) type DirFrames = Vec<(Scenario, Vec<(VnetHdr, Vec<u8>)>)>;

/// The frames of each direction of `scenario` and the host peers that send or sink them.
pub(super) fn start_traffic(
    scenario: Scenario,
    frame: usize,
    queues: usize,
    host_mac: [u8; 6],
) -> Result<(DirFrames, Vec<Peer>)> {
    let sink = TxSink::of(scenario);
    let dirs: DirFrames = scenario
        .directions()
        .iter()
        .map(|&d| {
            let frames = build_frames(d, sink, frame, queues.max(1) * 4, host_mac)?;
            Ok((d, frames))
        })
        .collect::<Result<_>>()?;
    let peers = dirs
        .iter()
        .map(|(d, f)| Peer::start(*d, sink, frame, f))
        .collect::<Result<Vec<_>>>()?;
    Ok((dirs, peers))
}

/// The host-side peer of a scenario.
pub(super) enum Peer {
    Sink(PeerHandle<SinkReport>),
    Generator(PeerHandle<GeneratorReport>),
    None,
}

impl Peer {
    fn start(
        scenario: Scenario,
        sink: TxSink,
        frame: usize,
        frames: &[(VnetHdr, Vec<u8>)],
    ) -> Result<Peer> {
        match scenario {
            Scenario::Tx | Scenario::TxDrop if sink == TxSink::Drop => Ok(Peer::None),
            Scenario::Tx | Scenario::TxDrop if frame <= 1500 => {
                let mut cfg = UdpSinkConfig::new(
                    SocketAddrV4::new(HOST_IP, SINK_PORT),
                    RunControl::new(Arc::new(AtomicBool::new(false))).with_cpu(0),
                );
                cfg.buf_size = 2048;
                Ok(Peer::Sink(UdpSink::bind(cfg)?.spawn()?))
            }
            Scenario::Tx | Scenario::TxDrop => Ok(Peer::None),
            Scenario::Rx | Scenario::Bidir => {
                let templates = frames
                    .iter()
                    .map(|(h, f)| Template {
                        vnet: *h,
                        frame: f.clone(),
                    })
                    .collect();
                let mut cfg = GeneratorConfig::new(
                    TAP_NAME,
                    templates,
                    RunControl::new(Arc::new(AtomicBool::new(false))).with_cpu(0),
                );
                cfg.vnet_hdr = frame > 1500;
                cfg.seq_mode = SeqMode::Off;
                Ok(Peer::Generator(PacketGenerator::new(cfg)?.spawn()?))
            }
        }
    }

    /// Stops the peer; returns (packets/s, CPU share).
    fn finish(self) -> Result<(f64, f64)> {
        match self {
            Peer::Sink(h) => {
                let r = h.stop_and_join()?;
                Ok((r.active_pps(), r.stats.cpu_utilization()))
            }
            Peer::Generator(h) => {
                let r = h.stop_and_join()?;
                Ok((r.stats.pps(), r.stats.cpu_utilization()))
            }
            Peer::None => Ok((0.0, 0.0)),
        }
    }
}

/// Stops the peers; their summed rate and their highest CPU share.
pub(super) fn finish_peers(peers: Vec<Peer>) -> Result<(f64, f64)> {
    let mut pps = 0.0;
    let mut cpu: f64 = 0.0;
    for p in peers {
        let (r, c) = p.finish()?;
        pps += r;
        cpu = cpu.max(c);
    }
    Ok((pps, cpu))
}
