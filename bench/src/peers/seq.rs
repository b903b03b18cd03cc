//! Per-flow sequence tracking: gaps (lost), duplicates and reordering.

const SEQ_WINDOW_WORDS: usize = 64;
pub(super) const SEQ_WINDOW: u64 = 64 * 64;

#[derive(Debug, Clone)]
struct FlowSeq {
    flow: u32,
    next: u64,
    started: bool,
    stats: FlowSeqStats,
    /// Bit `s % SEQ_WINDOW` is set iff seq `s` in `[next - SEQ_WINDOW, next)`
    /// was received.
    seen: Box<[u64; SEQ_WINDOW_WORDS]>,
}

impl FlowSeq {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "reduced modulo SEQ_WINDOW first"
    )]
    fn bit(s: u64) -> (usize, u64) {
        let b = (s % SEQ_WINDOW) as usize;
        (b / 64, 1u64 << (b % 64))
    }
}

/// Per-flow sequence statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FlowSeqStats {
    /// The flow id.
    pub flow: u32,
    /// Packets recorded.
    pub received: u64,
    /// Sequence numbers skipped and not (yet) seen late: currently missing
    /// below `next_expected`.
    pub lost: u64,
    /// Sequence numbers seen more than once.
    pub duplicates: u64,
    /// Sequence numbers that arrived late (after a higher one) and filled a gap.
    pub reordered: u64,
    /// Late arrivals too old for the window (duplicate or reordered, unknown).
    pub too_old: u64,
    /// One past the highest sequence number seen.
    pub next_expected: u64,
}

/// Totals over all flows of a [`SeqTracker`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SeqSummary {
    /// Number of flows seen.
    pub flows: usize,
    /// Packets recorded.
    pub received: u64,
    /// Missing sequence numbers (gaps not filled later).
    pub lost: u64,
    /// Duplicates.
    pub duplicates: u64,
    /// Late arrivals that filled a gap.
    pub reordered: u64,
    /// Late arrivals outside the window.
    pub too_old: u64,
}

/// What [`SeqTracker::record`] concluded about one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqEvent {
    /// The expected next sequence number.
    InOrder,
    /// Ahead of the expected one; this many were skipped.
    Gap(u64),
    /// Already seen.
    Duplicate,
    /// Late but new: filled an earlier gap.
    Reordered,
    /// Late, older than the tracking window.
    TooOld,
}

/// Tracks per-flow sequence numbers: gaps (lost), duplicates and reordering,
/// with a 4096-entry window per flow for telling late arrivals from duplicates.
///
/// Flows are created on first sight (a small allocation, not per packet).
#[derive(Debug, Clone)]
pub struct SeqTracker {
    flows: Vec<FlowSeq>,
    last: usize,
    first_seq: Option<u64>,
}

impl Default for SeqTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl SeqTracker {
    /// Every flow is expected to start at sequence number 0.
    #[must_use]
    pub fn new() -> Self {
        Self::starting_at(0)
    }

    /// Every flow is expected to start at `first`.
    #[must_use]
    pub fn starting_at(first: u64) -> Self {
        Self {
            flows: Vec::new(),
            last: 0,
            first_seq: Some(first),
        }
    }

    /// The first sequence number seen on a flow becomes its baseline (earlier
    /// losses are not counted).
    #[must_use]
    pub fn baseline_on_first() -> Self {
        Self {
            flows: Vec::new(),
            last: 0,
            first_seq: None,
        }
    }

    fn flow_mut(&mut self, flow: u32) -> &mut FlowSeq {
        if self.flows.get(self.last).is_none_or(|f| f.flow != flow) {
            self.last = if let Some(i) = self.flows.iter().position(|f| f.flow == flow) {
                i
            } else {
                self.flows.push(FlowSeq {
                    flow,
                    next: self.first_seq.unwrap_or(0),
                    started: self.first_seq.is_some(),
                    stats: FlowSeqStats {
                        flow,
                        ..FlowSeqStats::default()
                    },
                    seen: Box::new([0; SEQ_WINDOW_WORDS]),
                });
                self.flows.len() - 1
            };
        }
        &mut self.flows[self.last]
    }

    /// Records one packet.
    pub fn record(&mut self, flow: u32, seq: u64) -> SeqEvent {
        let f = self.flow_mut(flow);
        if !f.started {
            f.started = true;
            f.next = seq;
        }
        f.stats.received += 1;
        let ev = if seq >= f.next {
            let gap = seq - f.next;
            if gap >= SEQ_WINDOW {
                f.seen.fill(0);
            } else {
                for s in f.next..seq {
                    let (w, m) = FlowSeq::bit(s);
                    f.seen[w] &= !m;
                }
            }
            let (w, m) = FlowSeq::bit(seq);
            f.seen[w] |= m;
            f.next = seq + 1;
            f.stats.lost += gap;
            if gap == 0 {
                SeqEvent::InOrder
            } else {
                SeqEvent::Gap(gap)
            }
        } else if f.next - seq > SEQ_WINDOW {
            f.stats.too_old += 1;
            SeqEvent::TooOld
        } else {
            let (w, m) = FlowSeq::bit(seq);
            if f.seen[w] & m != 0 {
                f.stats.duplicates += 1;
                SeqEvent::Duplicate
            } else {
                f.seen[w] |= m;
                f.stats.reordered += 1;
                f.stats.lost = f.stats.lost.saturating_sub(1);
                SeqEvent::Reordered
            }
        };
        f.stats.next_expected = f.next;
        ev
    }

    /// Statistics of one flow.
    #[cfg(test)]
    #[must_use]
    pub fn flow(&self, flow: u32) -> Option<FlowSeqStats> {
        self.flows.iter().find(|f| f.flow == flow).map(|f| f.stats)
    }

    /// Statistics of all flows, in order of first appearance.
    pub fn flows(&self) -> impl Iterator<Item = FlowSeqStats> + '_ {
        self.flows.iter().map(|f| f.stats)
    }

    /// Totals over all flows.
    #[must_use]
    pub fn summary(&self) -> SeqSummary {
        let mut s = SeqSummary {
            flows: self.flows.len(),
            ..SeqSummary::default()
        };
        for f in &self.flows {
            s.received += f.stats.received;
            s.lost += f.stats.lost;
            s.duplicates += f.stats.duplicates;
            s.reordered += f.stats.reordered;
            s.too_old += f.stats.too_old;
        }
        s
    }
}
