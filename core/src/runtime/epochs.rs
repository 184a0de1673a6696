//! Which samples a run delivers: each epoch's order (limit, shard, shuffle) and how many
//! epochs and samples a chain runs.

use rand::seq::SliceRandom;

use crate::error::RunError;
use crate::rng::{stage_key, StreamKey};
use crate::stage::{Batcher, Sink, Source, SourceOptions};

use super::{RunOptions, StageInfo};

/// Items one epoch yields after `limit` and sharding (without listing them).
pub fn epoch_len(len: u64, opts: &SourceOptions) -> u64 {
    let n = opts.limit.map_or(len, |l| l.min(len));
    match opts.shard {
        Some(s) if s.count > 0 => {
            if s.index >= n {
                0
            } else {
                (n - s.index).div_ceil(s.count)
            }
        }
        _ => n,
    }
}

/// The order of dataset indices for one epoch: limit, shard, then shuffle. Unshuffled orders
/// are generated lazily, so a huge `counter` costs no memory.
pub fn epoch_order(
    len: u64,
    opts: &SourceOptions,
    seed: u64,
    epoch: u32,
    source_id: &str,
) -> Box<dyn Iterator<Item = u64> + Send> {
    let n = opts.limit.map_or(len, |l| l.min(len));
    let (start, step) = match opts.shard {
        Some(s) if s.count > 0 => (s.index, s.count),
        _ => (0, 1),
    };
    let range = (start..n).step_by(usize::try_from(step).unwrap_or(usize::MAX));
    if !opts.shuffle {
        return Box::new(range);
    }
    let mut order: Vec<u64> = range.collect();
    let mut rng = StreamKey { seed, epoch, index: u64::MAX, view: 0, stage: stage_key(source_id) }.rng();
    order.shuffle(&mut rng);
    Box::new(order.into_iter())
}

/// One process's share of a data-parallel run: of each global batch of `world x block`
/// consecutive positions in an epoch's order, the block `rank` (the same samples, in the same
/// order, as rows `rank x block..` of the batch one process would train on). Only whole global
/// batches are shared (`drop_last`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    pub rank: u64,
    pub world: u64,
    /// This process's batch size.
    pub block: u64,
}

impl Share {
    fn global(&self) -> u64 {
        self.block * self.world
    }
    /// Positions an epoch of `len` shares (whole global batches).
    pub fn shared_len(&self, len: u64) -> u64 {
        len / self.global() * self.global()
    }
    /// Whether position `p` is this process's.
    pub fn owns(&self, p: u64) -> bool {
        (p / self.block) % self.world == self.rank
    }
    /// This process's positions among the first `p` of an epoch of `len`.
    pub fn owned_before(&self, p: u64, len: u64) -> u64 {
        let p = p.min(self.shared_len(len));
        let (full, rest) = (p / self.global(), p % self.global());
        full * self.block + rest.saturating_sub(self.rank * self.block).min(self.block)
    }
    /// Where the run stands once the global batch holding position `p` is trained: its end.
    pub fn batch_end(&self, p: u64) -> u64 {
        (p / self.global() + 1) * self.global()
    }
}

/// How many samples a run of the chain delivers, from which epoch.
pub(super) struct EpochPlan {
    /// Items in the source.
    pub(super) len: u64,
    pub(super) first_epoch: u32,
    /// Positions of `first_epoch`'s order consumed before (a resume from mid-epoch).
    pub(super) offset: u64,
    /// One past the last epoch.
    pub(super) epochs: u32,
    /// Samples the run delivers.
    pub(super) total: u64,
}

/// [`EpochPlan::total`] for one process of a data-parallel run.
pub(super) fn shared_total(plan: &EpochPlan, per_epoch: u64, share: &Share, max_samples: Option<u64>) -> u64 {
    let per = share.owned_before(u64::MAX, per_epoch);
    per.saturating_mul(u64::from(plan.epochs - plan.first_epoch))
        .saturating_sub(share.owned_before(plan.offset, per_epoch))
        .min(max_samples.unwrap_or(u64::MAX))
}

/// The run's epochs and sample count; refuses a run whose epochs give the sink no batch.
pub(super) fn epoch_plan(
    source: &dyn Source,
    batch: Option<&(StageInfo, Box<dyn Batcher>)>,
    sink: &dyn Sink,
    source_info: &StageInfo,
    sink_info: &StageInfo,
    opts: &RunOptions,
) -> Result<EpochPlan, RunError> {
    let len = source.len();
    let per_epoch = epoch_len(len, &source.options());
    let epochs = match (opts.epochs, opts.max_samples) {
        (Some(e), _) => e,
        (None, Some(m)) if per_epoch > 0 => u32::try_from(m.div_ceil(per_epoch)).unwrap_or(u32::MAX),
        (None, Some(_)) => 0,
        (None, None) => sink.epochs(),
    };
    if let Some((binfo, b)) = batch {
        if epochs > 0 && opts.max_samples.is_none() && b.batches(per_epoch) == Some(0) {
            return Err(RunError::Refused {
                stage: binfo.id.clone(),
                kind: binfo.kind.clone(),
                message: format!(
                    "{}, so '{}' ({}) would get nothing (source '{}': {len} items)",
                    b.explain_empty(per_epoch),
                    sink_info.id,
                    sink_info.kind,
                    source_info.id
                ),
            });
        }
    }
    // A resumed sink starts later; epochs keep their absolute numbers (they key the randomness).
    let first_epoch = sink.start_epoch().min(epochs);
    let offset = if first_epoch < epochs { sink.start_offset().min(per_epoch) } else { 0 };
    // Saturating: an open-ended run (the Python iterator) asks for u32::MAX epochs.
    let total = per_epoch
        .saturating_mul(u64::from(epochs - first_epoch))
        .saturating_sub(offset)
        .min(opts.max_samples.unwrap_or(u64::MAX));
    Ok(EpochPlan { len, first_epoch, offset, epochs, total })
}

#[cfg(test)]
mod share_tests {
    use super::Share;
    use proptest::prelude::*;

    proptest! {
        /// The ranks' shares partition the whole global batches of an epoch, rank r holding
        /// block r of each, and `owned_before` counts exactly the owned positions.
        #[test]
        fn shares_partition_the_whole_global_batches(block in 1u64..9, world in 2u64..5, len in 0u64..200, p in 0u64..220) {
            let shares: Vec<Share> = (0..world).map(|rank| Share { rank, world, block }).collect();
            let end = shares[0].shared_len(len);
            prop_assert!(end <= len && end.is_multiple_of(block * world) && len - end < block * world);
            for q in 0..end {
                let owners: Vec<u64> = shares.iter().filter(|s| s.owns(q)).map(|s| s.rank).collect();
                prop_assert_eq!(owners, vec![(q % (block * world)) / block]);
                prop_assert_eq!(shares[0].batch_end(q), (q / (block * world) + 1) * block * world);
            }
            let total: u64 = shares.iter().map(|s| s.owned_before(p, len)).sum();
            prop_assert_eq!(total, p.min(end));
            for s in &shares {
                let counted = (0..p.min(end)).filter(|q| s.owns(*q)).count() as u64;
                prop_assert_eq!(s.owned_before(p, len), counted);
            }
        }
    }
}
