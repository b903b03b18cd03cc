//! The one feature matrix datapath scenarios run over: engine x ring features (MRG_RXBUF,
//! EVENT_IDX) x queue pairs x checksum offloads. A scenario names the part of it that applies
//! to it ([`Matrix`]); every cell runs in its own network namespace, its label naming the cell.

use super::{engines, feat, guest, in_netns, EngineKind, GuestConfig, CSUM, EVIDX, MRG};

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

/// The offloads of a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offloads {
    /// Checksum offloads both ways (`CSUM`, `GUEST_CSUM`).
    Csum,
    /// None: every frame carries its full checksum.
    None,
}

/// Every ring combination.
pub const RINGS: [Ring; 4] = [Ring::MrgEvidx, Ring::Mrg, Ring::Evidx, Ring::Plain];

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
        let offloads = match self.offloads {
            Offloads::Csum => CSUM,
            Offloads::None => 0,
        };
        ring | offloads
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
        let mut cells = Vec::new();
        for engine in engines() {
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
