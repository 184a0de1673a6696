//! What the trainer exchanges with the other ranks each step: the projections of the global
//! batch (gathered) and the parameter gradients (summed).
//!
//! Every rank evaluates the whole global loss on the gathered projections; the gather keeps
//! only the rank's own rows on the autodiff tape, so each rank's backward gives the part of the
//! gradient its own samples carry, and the SUM of the ranks' gradients is the gradient of the
//! global loss (docs/research/collective.md, section 3): no collective in the gather's backward.

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

use super::{PeerError, PeerHandle};

/// The projections of the whole global batch from each rank's `z` (2n x D: its n first views,
/// then their n second views). Rank r's rows land at `r*n..` and `N + r*n..` (N = world x n), so
/// row i's positive is still row (i + N) mod 2N, as on one device with the whole batch. The
/// values are the sum over ranks (exact: every other rank adds zeros); the gradient reaches only
/// this rank's rows.
pub fn gather_views<B: AutodiffBackend>(
    z: Tensor<B, 2>,
    peer: &PeerHandle,
) -> Result<Tensor<B, 2>, PeerError> {
    let (r, w) = (peer.rank(), peer.world());
    if w == 1 {
        return Ok(z);
    }
    let [n2, d] = z.dims();
    let n = n2 / 2;
    let device = z.device();
    let zeros = |rows: usize| Tensor::<B, 2>::zeros([rows, d], &device);
    let mut parts = Vec::with_capacity(6);
    for half in [z.clone().slice([0..n, 0..d]), z.slice([n..n2, 0..d])] {
        if r > 0 {
            parts.push(zeros(r * n));
        }
        parts.push(half);
        if r + 1 < w {
            parts.push(zeros((w - r - 1) * n));
        }
    }
    let local = Tensor::cat(parts, 0);
    let inner = local.clone().inner();
    let mut buf =
        inner.clone().into_data().convert::<f32>().into_vec::<f32>().map_err(|e| PeerError::Engine {
            rank: r,
            world: w,
            what: "gathering the projections".into(),
            message: format!("{e:?}"),
            others: super::others(r, w),
        })?;
    peer.all_reduce_sum(&mut buf)?;
    let all = Tensor::<B::InnerBackend, 2>::from_data(TensorData::new(buf, [2 * n * w, d]), &inner.device());
    Ok(local + Tensor::from_inner(all - inner))
}

/// Where each float parameter's gradient sits in the packed buffer, in the model's visit order
/// (the same on every rank; burn's `ParamId`s are random per process, so they cannot pair
/// gradients across ranks).
struct Pack<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    buf: Vec<f32>,
    /// Each parameter: its id, dims, and whether this rank had a gradient for it.
    slots: Vec<(ParamId, Vec<usize>, bool)>,
    failed: Option<String>,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Pack<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let dims = param.val().dims().to_vec();
        match self.grads.remove::<B::InnerBackend, D>(param.id) {
            Some(g) => match g.into_data().convert::<f32>().into_vec::<f32>() {
                Ok(v) => {
                    self.buf.extend_from_slice(&v);
                    self.slots.push((param.id, dims, true));
                }
                Err(e) => self.failed = Some(format!("{e:?}")),
            },
            None => {
                self.buf.extend(std::iter::repeat_n(0.0, dims.iter().product()));
                self.slots.push((param.id, dims, false));
            }
        }
    }
}

struct Unpack<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    buf: &'a [f32],
    at: usize,
    slots: std::slice::Iter<'a, (ParamId, Vec<usize>, bool)>,
    device: B::Device,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unpack<'_, B> {
    fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<B, D>>) {
        let Some((id, dims, present)) = self.slots.next() else { return };
        let len: usize = dims.iter().product();
        let part = &self.buf[self.at..self.at + len];
        self.at += len;
        if *present {
            let t = Tensor::<B::InnerBackend, D>::from_data(
                TensorData::new(part.to_vec(), dims.clone()),
                &self.device,
            );
            self.grads.register::<B::InnerBackend, D>(*id, t);
        }
    }
}

/// Sums the gradients of all ranks in place (one collective call with every parameter).
pub fn all_reduce_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    peer: &PeerHandle,
    device: &B::Device,
) -> Result<(), PeerError> {
    if peer.world() == 1 {
        return Ok(());
    }
    let mut pack =
        Pack::<B> { grads, buf: Vec::new(), slots: Vec::new(), failed: None, _b: std::marker::PhantomData };
    model.visit(&mut pack);
    let Pack { grads, mut buf, slots, failed, .. } = pack;
    if let Some(message) = failed {
        let (rank, world) = (peer.rank(), peer.world());
        let others = super::others(rank, world);
        return Err(PeerError::Engine { rank, world, what: "packing the gradients".into(), message, others });
    }
    // One more slot: whether this rank was interrupted (all ranks stop after the same step).
    buf.push(if super::interrupted_here() { 1.0 } else { 0.0 });
    peer.all_reduce_sum(&mut buf)?;
    if buf.pop().is_some_and(|v| v > 0.0) {
        super::agree_stop();
    }
    let mut unpack = Unpack::<B> { grads, buf: &buf, at: 0, slots: slots.iter(), device: device.clone() };
    model.visit(&mut unpack);
    Ok(())
}
