//! The one feature matrix datapath scenarios run over: engine x ring features (MRG_RXBUF,
//! EVENT_IDX) x queue pairs x offloads. A scenario names the part of it that applies to it
//! ([`Matrix`]: [`Matrix::FULL`] narrowed, or [`Matrix::LINUX`] widened, along the dimensions
//! that matter to it); every cell runs in its own network namespace, its label naming the cell.
//! A scenario that only makes sense in part of the matrix says why in one line where it picks.

use super::{engines, feat, guest, in_netns, EngineKind, GuestConfig, CSUM, EVIDX, MRG};

/// TCP segmentation offloads both ways.
const TSO: u64 = feat::VIRTIO_NET_F_HOST_TSO4
    | feat::VIRTIO_NET_F_HOST_TSO6
    | feat::VIRTIO_NET_F_GUEST_TSO4
    | feat::VIRTIO_NET_F_GUEST_TSO6;

/// The ring features of a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// MRG_RXBUF and EVENT_IDX (what Linux acks).
    MrgEvidx,
    /// MRG_RXBUF only.
    Mrg,
    /// EVENT_IDX only.
    Evidx,
    /// Neither.
    Plain,
}

impl Ring {
    /// Whether the ring acks EVENT_IDX.
    pub fn event_idx(self) -> bool {
        matches!(self, Ring::MrgEvidx | Ring::Evidx)
    }
}

/// UDP segmentation towards the guest, both IP versions.
const USO: u64 = feat::VIRTIO_NET_F_GUEST_USO4 | feat::VIRTIO_NET_F_GUEST_USO6;

/// The offloads of a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offloads {
    /// Checksum offloads both ways (`CSUM`, `GUEST_CSUM`).
    Csum,
    /// Checksums and TCP segmentation both ways (`HOST_TSO4/6`, `GUEST_TSO4/6`): with
    /// [`Ring::MrgEvidx`], what a Linux guest acks (`tapir_testkit::linux_guest_features`).
    Tso,
    /// Checksums and UDP segmentation towards the guest (`GUEST_USO4/6`): the TAP carries
    /// USO frames exactly when the kernel takes USO (`tapir_testkit::capability::tap_uso`).
    Uso,
    /// Checksums and `GUEST_USO4` without `GUEST_USO6`: the kernel takes the two together or
    /// not at all, so tapir leaves USO off the TAP and the host segments in software.
    Uso4Only,
    /// None: every frame carries its full checksum.
    None,
}

impl Offloads {
    /// The virtio features a guest with these offloads acks.
    pub fn acks(self) -> u64 {
        match self {
            Offloads::Csum => CSUM,
            Offloads::Tso => CSUM | TSO,
            Offloads::Uso => CSUM | USO,
            Offloads::Uso4Only => CSUM | feat::VIRTIO_NET_F_GUEST_USO4,
            Offloads::None => 0,
        }
    }
}

/// Every ring combination.
pub const RINGS: [Ring; 4] = [Ring::MrgEvidx, Ring::Mrg, Ring::Evidx, Ring::Plain];
/// The rings with EVENT_IDX.
pub const EVIDX_RINGS: [Ring; 2] = [Ring::MrgEvidx, Ring::Evidx];
/// The rings without EVENT_IDX.
pub const NO_EVIDX_RINGS: [Ring; 2] = [Ring::Mrg, Ring::Plain];
/// The rings with MRG_RXBUF.
pub const MRG_RINGS: [Ring; 2] = [Ring::MrgEvidx, Ring::Mrg];
/// The rings without MRG_RXBUF (a frame must fit one chain).
pub const NO_MRG_RINGS: [Ring; 2] = [Ring::Evidx, Ring::Plain];
/// EVENT_IDX on and off, MRG_RXBUF along with it: for a TX-side scenario, where MRG_RXBUF
/// (an RX feature) changes nothing.
pub const EVIDX_ON_OFF: [Ring; 2] = [Ring::MrgEvidx, Ring::Plain];

/// One cell.
#[derive(Clone, Copy, Debug)]
pub struct Cell {
    pub engine: EngineKind,
    pub ring: Ring,
    pub pairs: u16,
    pub offloads: Offloads,
}

impl Cell {
    /// The virtio features the cell's guest acks (VERSION_1 aside).
    pub fn features(&self) -> u64 {
        let ring = match self.ring {
            Ring::MrgEvidx => MRG | EVIDX,
            Ring::Mrg => MRG,
            Ring::Evidx => EVIDX,
            Ring::Plain => 0,
        };
        ring | self.offloads.acks()
    }

    /// The cell's guest, other settings default.
    pub fn guest(&self) -> GuestConfig {
        guest(self.pairs, self.features())
    }

    /// Whether the guest acked MRG_RXBUF.
    pub fn mrg(&self) -> bool {
        self.features() & feat::VIRTIO_NET_F_MRG_RXBUF != 0
    }

    /// `engine ring pairs offloads`, for labels and assertion messages.
    pub fn name(&self) -> String {
        format!(
            "{} {:?} {}qp {:?}",
            self.engine, self.ring, self.pairs, self.offloads
        )
    }
}

/// The part of the matrix a scenario runs over (every engine, always).
#[derive(Clone, Copy, Debug)]
pub struct Matrix {
    pub rings: &'static [Ring],
    pub pairs: &'static [u16],
    pub offloads: &'static [Offloads],
}

impl Matrix {
    /// All of it: every ring combination, 1 and 2 pairs, with and without checksum offloads.
    pub const FULL: Matrix = Matrix {
        rings: &RINGS,
        pairs: &[1, 2],
        offloads: &[Offloads::Csum, Offloads::None],
    };

    /// One cell per engine: what a Linux guest acks of the ring features (MRG_RXBUF and
    /// EVENT_IDX), one queue pair, checksum offloads. The base a scenario widens from.
    pub const LINUX: Matrix = Matrix {
        rings: &[Ring::MrgEvidx],
        pairs: &[1],
        offloads: &[Offloads::Csum],
    };

    /// This matrix with the ring features `rings` only.
    pub const fn rings(self, rings: &'static [Ring]) -> Matrix {
        Matrix { rings, ..self }
    }

    /// This matrix on `pairs` only.
    pub const fn pairs(self, pairs: &'static [u16]) -> Matrix {
        Matrix { pairs, ..self }
    }

    /// This matrix with `offloads` only.
    pub const fn offloads(self, offloads: &'static [Offloads]) -> Matrix {
        Matrix { offloads, ..self }
    }

    /// Every cell, engines outermost.
    pub fn cells(&self) -> Vec<Cell> {
        self.cells_of(&engines())
    }

    /// The cells of `engines` only.
    fn cells_of(&self, engines: &[EngineKind]) -> Vec<Cell> {
        let mut cells = Vec::new();
        for &engine in engines {
            for &ring in self.rings {
                for &pairs in self.pairs {
                    for &offloads in self.offloads {
                        cells.push(Cell {
                            engine,
                            ring,
                            pairs,
                            offloads,
                        });
                    }
                }
            }
        }
        cells
    }
}

/// Runs `f(cell)` for every cell of `matrix`, each in its own namespace.
pub fn for_each_cell(matrix: Matrix, mut f: impl FnMut(Cell) + Send) {
    for cell in matrix.cells() {
        in_netns(&cell.name(), || f(cell));
    }
}

/// Runs `f(cell, name, case)` for every cell of `matrix` and every named case of a
/// scenario's own (a fault, a budget, a broken field), each in its own namespace.
pub fn for_each_cell_and<C: Clone + Send + Sync>(
    matrix: Matrix,
    cases: &[(&str, C)],
    mut f: impl FnMut(Cell, &str, C) + Send,
) {
    for cell in matrix.cells() {
        for (name, c) in cases {
            let label = format!("{}, {name}", cell.name());
            in_netns(&label, || f(cell, name, c.clone()));
        }
    }
}

/// [`for_each_cell`] on one engine's cells: for a scenario split into a test per engine,
/// so that a known failure on one engine can be `#[ignore]`d without hiding the other.
pub fn for_each_cell_of(engine: EngineKind, matrix: Matrix, mut f: impl FnMut(Cell) + Send) {
    for cell in matrix.cells_of(&[engine]) {
        in_netns(&cell.name(), || f(cell));
    }
}
