//! The test rig: inside a network namespace, a multiqueue TAP with a host address, a simulated
//! guest, and a tapir device between them. The integration tests and `tapir bench` both drive
//! the datapath through it.

use std::net::Ipv4Addr;

use tapir_datapath::EngineConfig;
use tapir_datapath::{Device, DeviceConfig, EngineKind, QueuePairSpec, QuiescedPair, Tap};
use tapir_simguest::{GuestConfig, RxDriver, SimGuest, TxDriver};

use crate::frames::FlowSpec;
use crate::memory::{guest_memory, queue_config, FixtureError};
use crate::netns;

/// The TAP's name inside the rig's namespace.
pub const TAP_NAME: &str = "tapir0";
/// The host side's address on the TAP.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The simulated guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The simulated guest's MAC.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x02];

/// The features a Linux guest negotiates by default, plus EVENT_IDX and MRG_RXBUF: checksum
/// offloads and TSO both ways.
#[must_use]
pub fn linux_guest_features() -> u64 {
    use tapir_simguest::features as f;
    f::VIRTIO_F_VERSION_1
        | f::VIRTIO_RING_F_EVENT_IDX
        | f::VIRTIO_NET_F_MRG_RXBUF
        | f::VIRTIO_NET_F_CSUM
        | f::VIRTIO_NET_F_GUEST_CSUM
        | f::VIRTIO_NET_F_HOST_TSO4
        | f::VIRTIO_NET_F_HOST_TSO6
        | f::VIRTIO_NET_F_GUEST_TSO4
        | f::VIRTIO_NET_F_GUEST_TSO6
}

/// Errors of building a rig.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    /// Namespace or interface configuration.
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    /// The TAP.
    #[error(transparent)]
    Tap(#[from] tapir_datapath::TapError),
    /// The simulated guest.
    #[error("simulated guest: {0}")]
    Guest(#[from] tapir_simguest::Error),
    /// Guest memory, the guest's fds.
    #[error(transparent)]
    Fixture(#[from] FixtureError),
    /// The device.
    #[error(transparent)]
    Device(#[from] tapir_datapath::DeviceError),
    /// The TAP of a previous run did not go away.
    #[error("TAP {TAP_NAME} still exists 5 s after its last fd was closed")]
    TapLingers,
}

/// How to build a rig.
#[derive(Clone, Debug)]
pub struct RigConfig {
    /// The engine under test.
    pub engine: EngineKind,
    /// The simulated guest (queue pairs, queue size, features, buffer sizes).
    pub guest: GuestConfig,
    /// Engine tunables.
    pub engine_config: EngineConfig,
    /// Pin worker `i` to CPU `cpu_affinity[i]`.
    pub cpu_affinity: Vec<Option<usize>>,
    /// Link MTU.
    pub mtu: u16,
}

impl RigConfig {
    /// A rig for `engine` with the simulated guest's defaults and `queue_pairs` pairs.
    pub fn new(engine: EngineKind, queue_pairs: u16) -> RigConfig {
        RigConfig {
            engine,
            guest: GuestConfig {
                queue_pairs,
                ..GuestConfig::default()
            },
            engine_config: EngineConfig::default(),
            cpu_affinity: Vec::new(),
            mtu: 1500,
        }
    }
}

/// Creates the TAP (`queues` queues) and gives it the host address, a static neighbour entry
/// for the guest and no IPv6 (no router solicitations in the guest's RX ring). Must run inside
/// a namespace the caller made.
pub fn host_tap(queues: usize, mtu: u16) -> Result<Tap, RigError> {
    let tap = Tap::open(TAP_NAME, queues)?;
    configure_host_tap(mtu)?;
    Ok(tap)
}

/// Gives the TAP (opened here or by a backend process in this namespace) the host address,
/// the MTU, a static neighbour entry for the guest and no IPv6, and brings it up.
pub fn configure_host_tap(mtu: u16) -> Result<(), RigError> {
    netns::sysctl_write(&format!("net/ipv6/conf/{TAP_NAME}/disable_ipv6"), "1").ok();
    netns::set_mtu(TAP_NAME, u32::from(mtu))?;
    netns::link_up(TAP_NAME)?;
    netns::add_addr(TAP_NAME, &format!("{HOST_IP}/24"))?;
    netns::add_neigh(
        &GUEST_IP.to_string(),
        &netns::format_mac(GUEST_MAC),
        TAP_NAME,
    )?;
    Ok(())
}

/// Waits (up to 5 s) until the TAP is gone. A TAP disappears when its last queue fd closes, and
/// an io_uring that had it registered drops its reference asynchronously after the ring closes.
pub fn wait_tap_gone() -> Result<(), RigError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while netns::iface_index(TAP_NAME).is_ok() {
        if std::time::Instant::now() > deadline {
            return Err(RigError::TapLingers);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Ok(())
}

/// A running rig.
pub struct Rig {
    /// The device (None after [`Rig::stop`]).
    pub device: Option<Device>,
    /// The simulated guest.
    pub guest: SimGuest,
    /// Each queue pair's drivers, taken by the test.
    pub drivers: Vec<Option<(RxDriver, TxDriver)>>,
    /// The TAP's MAC (the host side).
    pub host_mac: [u8; 6],
}

impl Rig {
    /// Builds the TAP, the guest and the device. Must run inside a namespace the caller made.
    pub fn start(cfg: &RigConfig) -> Result<Rig, RigError> {
        let pairs = cfg.guest.queue_pairs;
        let tap = host_tap(usize::from(pairs), cfg.mtu)?;
        let host_mac = netns::iface_mac(TAP_NAME)?;
        let mut guest = SimGuest::new(cfg.guest.clone())?;
        let memory = guest_memory(&guest)?;
        let mut specs = Vec::new();
        for (i, tap_queue) in tap.into_queues().into_iter().enumerate() {
            let i = u16::try_from(i).unwrap_or(u16::MAX);
            specs.push(QueuePairSpec {
                rx: queue_config(&guest.rx_queue(i))?,
                tx: queue_config(&guest.tx_queue(i))?,
                tap: tap_queue,
                rx_in_flight: Vec::new(),
                rx_carried: Vec::new(),
            });
        }
        let device = Device::start(
            DeviceConfig {
                features: guest.features(),
                mtu: cfg.mtu,
                mac: GUEST_MAC,
                engine: cfg.engine,
                engine_config: cfg.engine_config,
                cpu_affinity: cfg.cpu_affinity.clone(),
            },
            memory,
            specs,
        )?;
        let drivers = (0..pairs).map(|i| Some(guest.take_pair(i))).collect();
        Ok(Rig {
            device: Some(device),
            guest,
            drivers,
            host_mac,
        })
    }

    /// Takes queue pair `i`'s drivers (once).
    pub fn take(&mut self, i: usize) -> (RxDriver, TxDriver) {
        self.drivers[i].take().expect("drivers taken twice")
    }

    /// The device.
    pub fn device(&self) -> &Device {
        self.device.as_ref().expect("device stopped")
    }

    /// A UDP flow from the guest to `HOST_IP:dst_port`.
    pub fn guest_to_host(&self, src_port: u16, dst_port: u16) -> FlowSpec {
        FlowSpec {
            src_mac: GUEST_MAC,
            dst_mac: self.host_mac,
            src_ip: GUEST_IP,
            dst_ip: HOST_IP,
            src_port,
            dst_port,
        }
    }

    /// Stops the device (quiescing it) and returns its pairs (which hold the TAP queues).
    pub fn stop(&mut self) -> Result<Vec<QuiescedPair>, RigError> {
        match self.device.take() {
            Some(d) => Ok(d.stop()?),
            None => Ok(Vec::new()),
        }
    }

    /// Stops the device, closes the TAP and waits until it is gone, so that the next rig in
    /// the same namespace can create it again.
    pub fn shutdown(mut self) -> Result<(), RigError> {
        let pairs = self.stop()?;
        drop(pairs);
        drop(self);
        wait_tap_gone()
    }
}
