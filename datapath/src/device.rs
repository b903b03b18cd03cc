//! A running virtio-net device: one worker thread per queue pair, the embedding API a VMM uses.
//! This file is the lifecycle (start, pause, quiesce, resume, stop); `config` is what a VMM
//! describes the device with, `gate` is where paused workers wait.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::engine::{self, EngineError, EngineKind, Leftovers};
use crate::fd_check;
use crate::features;
use crate::memory::GuestMemory;
use tapir_state::RingPositions;

use crate::pair::{PairPositions, PairSettings, QueuePair, StopRequest};

use crate::stats::{Counters, QueuePairStats};
use crate::tap::TapQueue;
use crate::virtqueue::Virtqueue;

mod config;
mod gate;
mod handback;

pub use config::{DeviceConfig, DeviceError, PairResources, QueuePairSpec};
pub use gate::Decider;
use gate::{Decision, Gate};
use handback::{Exiting, Handback};

/// A queue pair and the TAP queue its worker moves its frames through.
type PairWithTap = (QueuePair, TapQueue);

struct Worker {
    index: u16,
    /// Set first, so that a worker in the middle of a batch stops at its next chain.
    stop_request: StopRequest,
    /// Then signalled, to wake a worker that sleeps.
    stop: EventFd,
    stats: Arc<QueuePairStats>,
    /// Where the worker leaves its pair when it ends.
    handback: Arc<Handback>,
    thread: JoinHandle<()>,
}

/// A running device.
pub struct Device {
    memory: GuestMemory,
    config: DeviceConfig,
    resources: Arc<Vec<PairResources>>,
    workers: Vec<Worker>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("features", &format_args!("{:#x}", self.config.features))
            .field("engine", &self.config.engine)
            .field("queue_pairs", &self.workers.len())
            .finish()
    }
}

/// A device whose engines are set up but whose workers wait before touching any ring.
#[derive(Debug)]
pub struct PausedDevice {
    device: Device,
    gate: Arc<Gate>,
}

impl PausedDevice {
    /// Tells the parked workers that the decision is imminent: they wake up now and wait
    /// spinning (for a few milliseconds at most), so that [`go_at`](Self::go_at) starts them
    /// without a sleep/wake-up (the successor calls this as it sends READY).
    pub fn arm(&self) {
        self.gate.arm();
    }

    /// Lets the workers run where the rings were when the device was started.
    pub fn go(self) -> Device {
        self.gate.decide(Decision::Go(None));
        self.device
    }

    /// Lets the workers run from these positions (one entry per queue pair; validate them
    /// first with [`PairPositions::check`]: a worker that cannot take its position stops).
    pub fn go_at(self, positions: Vec<PairPositions>) -> Device {
        self.gate.decide(Decision::Go(Some(Arc::new(positions))));
        self.device
    }

    /// Lets the first worker at the start gate decide on its own thread ([`Decider`]) and,
    /// if it returns positions, run at them at once; the other workers follow the same
    /// decision. Returns when it was made: the running device, or, when the decider said no
    /// (or panicked), the pairs untouched, as [`abort`](Self::abort) returns them.
    pub fn go_when_decided(self, decider: Decider) -> Decided {
        self.gate.decide_by(decider, self.device.workers.len());
        match self.gate.decided() {
            Decision::Go(_) => Decided::Running(self.device),
            Decision::Abort => Decided::Aborted(self.device.stop()),
        }
    }

    /// Ends the workers without servicing anything; returns the pairs untouched.
    pub fn abort(self) -> Result<Vec<QuiescedPair>, DeviceError> {
        self.gate.decide(Decision::Abort);
        self.device.stop()
    }

    /// The device's per-pair stats.
    pub fn worker_stats(&self) -> Vec<Arc<QueuePairStats>> {
        self.device.worker_stats()
    }
}

/// What [`PausedDevice::go_when_decided`] ended in.
#[derive(Debug)]
pub enum Decided {
    /// The decider gave positions: the workers run.
    Running(Device),
    /// It did not: the workers ended without servicing anything; the pairs, untouched.
    Aborted(Result<Vec<QuiescedPair>, DeviceError>),
}

/// A device whose workers are stopped with nothing in flight.
#[derive(Debug)]
pub struct QuiescedDevice {
    /// The configuration it ran with.
    pub config: DeviceConfig,
    /// Its guest memory.
    pub memory: GuestMemory,
    /// Its queue pairs (rings, TAP queues, eventfds, RX chains held).
    pub pairs: Vec<QuiescedPair>,
    /// Ring addresses and fd duplicates of each pair.
    pub resources: Arc<Vec<PairResources>>,
}

impl QuiescedDevice {
    /// Restarts the workers where they stopped (the rollback of a failed handoff). The RX
    /// chains held at quiesce time are posted first.
    pub fn resume(self) -> Result<Device, DeviceError> {
        let pairs = self.pairs.into_iter().map(|p| (p.pair, p.tap)).collect();
        Device::spawn(self.config, self.memory, pairs, self.resources, None)
    }
}

/// A queue pair after its worker stopped: nothing in flight, ready to be snapshotted.
#[derive(Debug)]
pub struct QuiescedPair {
    /// The pair, its rings, fds and counters.
    pub pair: QueuePair,
    /// Its TAP queue.
    pub tap: TapQueue,
    /// The stopped engine's ring and buffers, freed with the pair (after a blackout).
    _leftovers: Leftovers,
    /// The worker thread, exiting: joined with the pair (after a blackout).
    _thread: Exiting,
}

impl QuiescedPair {
    /// Where the RX queue stopped.
    pub fn rx_positions(&self) -> RingPositions {
        self.pair.rx.positions()
    }
    /// Where the TX queue stopped.
    pub fn tx_positions(&self) -> RingPositions {
        self.pair.tx.positions()
    }
    /// Where the pair resumes: both queues' positions, the RX heads held, the frames that
    /// wait for guest buffers (what a handoff's snapshot and switch carry).
    pub fn positions(&self) -> PairPositions {
        PairPositions {
            rx: self.rx_positions(),
            tx: self.tx_positions(),
            rx_in_flight: self.rx_in_flight(),
            rx_carried: self.rx_carried(),
        }
    }
    /// RX heads popped but not used, in ring order (a successor re-posts them first).
    pub fn rx_in_flight(&self) -> Vec<u16> {
        self.pair.spare_rx().collect()
    }
    /// Frames read from the TAP that waited for guest buffers at the stop, oldest first
    /// (vnet header included): a successor delivers them first.
    pub fn rx_carried(&self) -> Vec<Vec<u8>> {
        self.pair.rx_carried().map(<[u8]>::to_vec).collect()
    }
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), DeviceError> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let os = |e: nix::errno::Errno| DeviceError::Os {
        what: "fcntl on an eventfd",
        source: e.into(),
    };
    let flags = OFlag::from_bits_retain(fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(os)?);
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(os)?;
    Ok(())
}

impl Device {
    /// Starts one worker per queue pair and returns once every engine is set up.
    pub fn start(
        cfg: DeviceConfig,
        memory: GuestMemory,
        pairs: Vec<QueuePairSpec>,
    ) -> Result<Device, DeviceError> {
        let unsupported = cfg.features & !features::SUPPORTED;
        if unsupported != 0 || cfg.features & features::F_VERSION_1 == 0 {
            return Err(DeviceError::UnsupportedFeatures(cfg.features));
        }
        let (pairs, resources) = Device::build_pairs(&cfg, &memory, pairs)?;
        Device::spawn(cfg, memory, pairs, Arc::new(resources), None)
    }

    fn build_pairs(
        cfg: &DeviceConfig,
        memory: &GuestMemory,
        pairs: Vec<QueuePairSpec>,
    ) -> Result<(Vec<PairWithTap>, Vec<PairResources>), DeviceError> {
        let first = pairs.first().ok_or(DeviceError::NoQueuePairs)?;
        let resources = pairs
            .iter()
            .map(PairResources::of)
            .collect::<Result<Vec<_>, _>>()?;
        let offloads = first.tap.set_offload_from_features(cfg.features)?;
        tracing::info!(offloads, features = cfg.features, "TAP offloads set");
        let event_idx = cfg.features & features::F_EVENT_IDX != 0;
        let settings = PairSettings {
            features: cfg.features,
            mtu: cfg.mtu,
        };
        let mut built = Vec::with_capacity(pairs.len());
        for (i, spec) in pairs.into_iter().enumerate() {
            let index = u16::try_from(i).map_err(|_| DeviceError::NoQueuePairs)?;
            // Kick and call fds must be eventfds: a pipe or socket could block a worker's
            // call write or report end-of-file on every kick poll. All four are made
            // non-blocking: the datapath never blocks on a guest's or frontend's fd.
            for (fd, what) in [
                (&spec.rx.kick, "RX kick fd"),
                (&spec.rx.call, "RX call fd"),
                (&spec.tx.kick, "TX kick fd"),
                (&spec.tx.call, "TX call fd"),
            ] {
                fd_check::expect_eventfd(fd.as_fd(), &format!("{what} of queue pair {index}"))?;
                set_nonblocking(fd)?;
            }
            let rx = Virtqueue::new(2 * index, spec.rx, event_idx, memory)?;
            let tx = Virtqueue::new(2 * index + 1, spec.tx, event_idx, memory)?;
            let mut pair = QueuePair::new(
                index,
                memory.clone(),
                rx,
                tx,
                settings,
                Arc::new(QueuePairStats::default()),
            );
            pair.restore_rx_in_flight(&spec.rx_in_flight)?;
            pair.set_carried(spec.rx_carried);
            built.push((pair, spec.tap));
        }
        Ok((built, resources))
    }

    /// Like [`Device::start`], but the workers stop after setting up their engines, before
    /// touching a ring: [`PausedDevice::go`] lets them run, [`PausedDevice::abort`] ends them
    /// without servicing anything. A handoff successor starts this way, so that everything
    /// that can fail has failed before it says it is running.
    pub fn start_paused(
        cfg: DeviceConfig,
        memory: GuestMemory,
        pairs: Vec<QueuePairSpec>,
    ) -> Result<PausedDevice, DeviceError> {
        let gate = Arc::new(Gate::new(cfg.engine_config.realtime_priority.is_some()));
        let (pairs, resources) = Device::build_pairs(&cfg, &memory, pairs)?;
        let device = Device::spawn(cfg, memory, pairs, Arc::new(resources), Some(gate.clone()))?;
        Ok(PausedDevice { device, gate })
    }

    /// Starts a worker for each (set-up) pair.
    fn spawn(
        cfg: DeviceConfig,
        memory: GuestMemory,
        pairs: Vec<PairWithTap>,
        resources: Arc<Vec<PairResources>>,
        gate: Option<Arc<Gate>>,
    ) -> Result<Device, DeviceError> {
        let mut device = Device {
            memory,
            config: cfg.clone(),
            resources,
            workers: Vec::with_capacity(pairs.len()),
        };
        let (ready_tx, ready_rx) = mpsc::channel::<u16>();
        for (i, (mut pair, tap)) in pairs.into_iter().enumerate() {
            let index = pair.index;
            let stats = pair.stats.clone();
            let stop_request = pair.new_stop_request();
            let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| DeviceError::Os {
                    what: "eventfd",
                    source: e.into(),
                })?;
            let stop_fd: OwnedFd =
                stop.as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| DeviceError::Os {
                        what: "dup",
                        source,
                    })?;
            let cpu = cfg.cpu_affinity.get(i).copied().flatten();
            let realtime = cfg.engine_config.realtime_priority;
            let mut engine = engine::new_engine(cfg.engine, cfg.engine_config);
            let ready = ready_tx.clone();
            let gate = gate.clone();
            let handback = Arc::new(Handback::default());
            let worker_handback = handback.clone();
            let thread = std::thread::Builder::new()
                .name(format!("tapir-qp{index}"))
                .spawn(move || {
                    pair.stats.set_tid(nix::unistd::gettid().as_raw());
                    if let Some(cpu) = cpu {
                        pin_to_cpu(cpu);
                    }
                    if let Some(prio) = realtime {
                        // Realtime while parked and through the resume (a woken worker
                        // preempts ordinary threads at once), ordinary from the first used
                        // entry on: a SCHED_FIFO worker that stays busy under load on a
                        // 2-CPU machine starves the traffic's own threads (issue 10).
                        set_realtime(prio);
                        pair.on_first_service(set_ordinary);
                    }
                    let span = tracing::info_span!("worker", pair = index, engine = %engine.kind());
                    let _enter = span.enter();
                    let mut signal_ready = |pair: &mut QueuePair| {
                        let _ = ready.send(index);
                        let Some(gate) = &gate else { return true };
                        let decision = gate.wait();
                        pair.stats.mark_resumed();
                        match decision {
                            Decision::Abort => false,
                            Decision::Go(None) => true,
                            Decision::Go(Some(positions)) => match positions.get(usize::from(index)) {
                                Some(p) => match pair.reposition(p) {
                                    Ok(()) => true,
                                    Err(e) => {
                                        tracing::error!(error = %e, "cannot resume at the given ring positions");
                                        false
                                    }
                                },
                                None => true,
                            },
                        }
                    };
                    let kind = engine.kind();
                    // A worker that fails for any reason, a panic that slipped through
                    // included, breaks its pair only: the device, the other pairs and the
                    // process carry on, and stop still returns the pair.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        engine.run(&mut pair, &tap, &stop_fd, &mut signal_ready)
                    }))
                    .unwrap_or_else(|p| {
                        Err(EngineError::Panicked {
                            engine: kind,
                            message: engine::panic_message(p.as_ref()),
                        })
                    });
                    // The start-up channel closes here, not when the parked thread exits: a
                    // worker that failed its set-up without signalling is seen at once.
                    drop(ready);
                    pair.settle_rx_order();
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "worker failed");
                        pair.mark_broken(&e.to_string());
                    }
                    // Parked here until the stopper is done with the pair (after a handoff's
                    // blackout): the engine's drop and the thread's exit happen then.
                    worker_handback.put_and_park((pair, tap, result));
                })
                .map_err(|source| DeviceError::Os {
                    what: "spawning a worker",
                    source,
                })?;
            device.workers.push(Worker {
                index,
                stop_request,
                stop,
                stats,
                handback,
                thread,
            });
        }
        drop(ready_tx);
        // Wait until every engine is set up; a worker that fails its set-up drops its sender
        // without sending, and its error comes out of stop().
        let mut ready = 0;
        while ready < device.workers.len() {
            if ready_rx.recv().is_err() {
                let (_, err) = device.stop_inner();
                return Err(err.unwrap_or(DeviceError::WorkerPanicked(0)));
            }
            ready += 1;
        }
        Ok(device)
    }

    /// Makes the worker of queue pair `pair` fail (tests only: the way to see what a failing
    /// worker leaves behind).
    #[doc(hidden)]
    pub fn inject_fault(&self, pair: u16, fault: crate::engine::WorkerFault) {
        if let Some(w) = self.workers.iter().find(|w| w.index == pair) {
            let _ = w.stop.write(fault.stop_value());
        }
    }

    /// Ring addresses and fds of each queue pair, for a successor.
    pub fn resources(&self) -> &[PairResources] {
        &self.resources
    }

    /// The configuration the device runs with.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// The guest memory the device works on (for dirty logs).
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The engine the workers run.
    pub fn engine(&self) -> EngineKind {
        self.config.engine
    }

    /// Latest counters of each queue pair.
    pub fn counters(&self) -> Vec<Counters> {
        self.workers
            .iter()
            .map(|w| w.stats.counters.snapshot())
            .collect()
    }

    /// Each worker's published stats (counters, thread id, CPU time).
    pub fn worker_stats(&self) -> Vec<Arc<QueuePairStats>> {
        self.workers.iter().map(|w| w.stats.clone()).collect()
    }

    /// Quiesces every worker (see [`engine::Engine`]) and returns the pairs, nothing in flight.
    pub fn stop(self) -> Result<Vec<QuiescedPair>, DeviceError> {
        Ok(self.quiesce()?.pairs)
    }

    /// Quiesces every worker: afterwards nothing is in flight, every TX chain the workers
    /// popped is in the used ring, and the RX chains they hold are listed in order. The
    /// device can then be snapshotted for a successor, or resumed ([`QuiescedDevice::resume`]).
    ///
    /// A pair whose worker failed comes back broken ([`QueuePair::is_broken`]; its ring
    /// positions and held chains are not to be trusted): that is not an error of the device.
    /// Only a pair that could not be recovered at all is.
    pub fn quiesce(mut self) -> Result<QuiescedDevice, DeviceError> {
        let (pairs, err) = self.stop_inner();
        if let Some(e @ DeviceError::WorkerPanicked(_)) = err {
            return Err(e);
        }
        Ok(QuiescedDevice {
            config: self.config.clone(),
            memory: self.memory.clone(),
            resources: self.resources.clone(),
            pairs,
        })
    }

    /// Stops and joins every worker: the pairs (broken ones included) and the first
    /// failure (an engine's error, or a pair lost with its thread).
    fn stop_inner(&mut self) -> (Vec<QuiescedPair>, Option<DeviceError>) {
        for w in &self.workers {
            w.stop_request.request();
            let _ = w.stop.write(1);
        }
        let mut pairs = Vec::with_capacity(self.workers.len());
        let mut first_err = None;
        for w in self.workers.drain(..) {
            let (end, thread) = w.handback.wait(w.thread);
            match end {
                Some((pair, tap, Ok(leftovers))) => pairs.push(QuiescedPair {
                    pair,
                    tap,
                    _leftovers: leftovers,
                    _thread: thread,
                }),
                Some((pair, tap, Err(source))) => {
                    first_err.get_or_insert(DeviceError::Engine {
                        pair: w.index,
                        source,
                    });
                    pairs.push(QuiescedPair {
                        pair,
                        tap,
                        _leftovers: Leftovers(None),
                        _thread: thread,
                    });
                }
                None => {
                    // Cannot happen (the worker catches panics), but if it did the pair is
                    // gone with its thread.
                    first_err.get_or_insert(DeviceError::WorkerPanicked(w.index));
                }
            }
        }
        (pairs, first_err)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if !self.workers.is_empty() {
            let _ = self.stop_inner();
        }
    }
}

fn set_realtime(priority: u8) {
    let param = libc::sched_param {
        sched_priority: libc::c_int::from(priority.clamp(1, 99)),
    };
    // SAFETY: plain syscall on the calling thread with a valid parameter struct.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        tracing::warn!(priority, error = %std::io::Error::last_os_error(), "could not make the worker SCHED_FIFO");
    }
}

/// Back to ordinary scheduling (`SCHED_OTHER`), for the calling thread.
fn set_ordinary() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread with a valid parameter struct.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not return the worker to SCHED_OTHER");
    }
}

fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
            tracing::warn!(cpu, error = %e, "could not pin worker");
        }
    }
}
