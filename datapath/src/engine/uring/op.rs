//! What an SQE was for, as its user data says: one `Op` per operation, decoded once per
//! completion.

use crate::pair::Direction;

/// What an SQE was for, carried in its user data: the operation in the high 32 bits, a slot
/// (TAP reads and writes) or a direction in the low 32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    /// A TAP write of TX slot `n`.
    Tx(usize),
    /// A TAP read into RX slot `n`.
    Rx(usize),
    /// The read pending on a queue's kick eventfd.
    Kick(Direction),
    /// The read pending on the stop eventfd.
    Stop,
    /// A write to a queue's call eventfd (an interrupt).
    Call(Direction),
    /// The cancel of everything pending, at quiesce.
    Cancel,
    /// The poll (or timeout) that lets RX post reads again.
    RxRetry,
    /// The zero timeout a worker enters the kernel with once before its start gate.
    WarmUp,
}

const OP_TX: u64 = 1;
const OP_RX: u64 = 2;
const OP_KICK: u64 = 3;
const OP_STOP: u64 = 4;
const OP_CALL: u64 = 5;
const OP_CANCEL: u64 = 6;
const OP_RX_RETRY: u64 = 7;
const OP_WARM_UP: u64 = 8;

fn dir_code(dir: Direction) -> u64 {
    match dir {
        Direction::Rx => 0,
        Direction::Tx => 1,
    }
}

impl Op {
    pub(super) fn user_data(self) -> u64 {
        let (op, low) = match self {
            Op::Tx(slot) => (OP_TX, slot as u64),
            Op::Rx(slot) => (OP_RX, slot as u64),
            Op::Kick(dir) => (OP_KICK, dir_code(dir)),
            Op::Stop => (OP_STOP, 0),
            Op::Call(dir) => (OP_CALL, dir_code(dir)),
            Op::Cancel => (OP_CANCEL, 0),
            Op::RxRetry => (OP_RX_RETRY, 0),
            Op::WarmUp => (OP_WARM_UP, 0),
        };
        (op << 32) | (low & 0xffff_ffff)
    }

    /// The operation a completion belongs to; None for user data this engine never sets.
    pub(super) fn from_user_data(data: u64) -> Option<Op> {
        let low = data & 0xffff_ffff;
        let dir = match low {
            0 => Some(Direction::Rx),
            1 => Some(Direction::Tx),
            _ => None,
        };
        let slot = usize::try_from(low).ok();
        match data >> 32 {
            OP_TX => slot.map(Op::Tx),
            OP_RX => slot.map(Op::Rx),
            OP_KICK => dir.map(Op::Kick),
            OP_STOP => Some(Op::Stop),
            OP_CALL => dir.map(Op::Call),
            OP_CANCEL => Some(Op::Cancel),
            OP_RX_RETRY => Some(Op::RxRetry),
            OP_WARM_UP => Some(Op::WarmUp),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_round_trips_through_its_user_data() {
        for op in [
            Op::Tx(0),
            Op::Tx(255),
            Op::Rx(7),
            Op::Kick(Direction::Rx),
            Op::Kick(Direction::Tx),
            Op::Stop,
            Op::Call(Direction::Rx),
            Op::Call(Direction::Tx),
            Op::Cancel,
            Op::RxRetry,
            Op::WarmUp,
        ] {
            assert_eq!(Op::from_user_data(op.user_data()), Some(op), "{op:?}");
        }
        assert_eq!(Op::from_user_data(0), None);
        assert_eq!(Op::from_user_data(99 << 32), None);
    }
}
