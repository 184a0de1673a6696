//! BatchNorm fused with the residual add and the ReLU that follow it in a ResNet:
//! `y = relu?(gamma * (x - mean) / sqrt(var + eps) + beta + residual?)`, over dimension 1 of an
//! N x C x ... tensor.
//!
//! Training (`Autodiff<Flex>`): batch statistics, one autodiff op whose backward gives the
//! gradients of x, gamma, beta and the residual. Two parallel passes each way: per-channel sums
//! (channels split across threads), then the elementwise pass (images split across threads).
//! Evaluation (`Flex`): the running statistics, one parallel pass.
//!
//! Sums are accumulated in f64 in 8 fixed lanes, per channel in image order, so the result does
//! not depend on the thread count.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::FlexTensor;
use rayon::prelude::*;
use simclr_core::multiversion;
use std::mem::MaybeUninit;

use super::bn_sums::{channel_sums, grad_sums, masked};
use super::{back, cast, flex, AdFlex};
use crate::dist::PeerHandle;
use burn::backend::Flex;

thread_local! {
    /// The peers BatchNorm shares its statistics with (global BN), set around a forward pass.
    static GLOBAL_BN: std::cell::RefCell<Option<PeerHandle>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` (a forward pass) with training-mode BatchNorm computing its statistics over all of
/// `peer`'s ranks: per-channel sums and the count all-reduced in the forward pass, and the
/// input gradient's sums in the backward pass (the parameters' own gradients stay local: the
/// trainer sums them over the ranks with the others).
pub fn with_global_stats<R>(peer: Option<PeerHandle>, f: impl FnOnce() -> R) -> R {
    /// Restores the previous peer even if `f` panics (the trainer catches panics).
    struct Restore(Option<PeerHandle>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let old = self.0.take();
            GLOBAL_BN.with(|g| *g.borrow_mut() = old);
        }
    }
    let _restore = Restore(GLOBAL_BN.with(|g| g.replace(peer)));
    f()
}

/// The inputs of one BatchNorm call.
pub struct BnInputs<B: Backend, const D: usize> {
    pub x: Tensor<B, D>,
    pub gamma: Tensor<B, 1>,
    /// Absent where the official code has `center=False` (the head's last layer).
    pub beta: Option<Tensor<B, 1>>,
    /// Added after the normalization (a ResNet block's shortcut).
    pub residual: Option<Tensor<B, D>>,
    /// ReLU at the end.
    pub relu: bool,
}

/// What training-mode BatchNorm returns: the output and the batch mean and (biased) variance
/// per channel, for the running statistics.
pub struct BnTrained<B: Backend, const D: usize> {
    pub y: Tensor<B, D>,
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    /// Values per channel the statistics are over (every rank's with global BN).
    pub count: f64,
}

/// Training-mode BatchNorm on the CPU backend; the inputs back when `B` is another backend.
pub fn train<B: Backend, const D: usize>(
    inputs: BnInputs<B, D>,
    eps: f64,
) -> Result<BnTrained<B, D>, BnInputs<B, D>> {
    if inputs.x.dtype() != burn::tensor::DType::F32 {
        return Err(inputs);
    }
    let mut slot = Some(inputs);
    if let Some(i) = cast::<_, BnInputs<AdFlex, D>>(&mut slot) {
        let out = train_autodiff(i, eps);
        return Ok(BnTrained {
            y: back::<AdFlex, B, D>(out.y),
            mean: out.mean,
            var: out.var,
            count: out.count,
        });
    }
    match slot {
        Some(i) => Err(i),
        None => unreachable!("the inputs are taken only by a cast that returns"),
    }
}

/// Evaluation-mode BatchNorm (running statistics) on the plain CPU backend; the inputs back
/// otherwise.
pub fn eval<B: Backend, const D: usize>(
    inputs: BnInputs<B, D>,
    running_mean: &[f32],
    running_var: &[f32],
    eps: f64,
) -> Result<Tensor<B, D>, BnInputs<B, D>> {
    if inputs.x.dtype() != burn::tensor::DType::F32 {
        return Err(inputs);
    }
    let mut slot = Some(inputs);
    if let Some(i) = cast::<_, BnInputs<Flex, D>>(&mut slot) {
        return Ok(back::<Flex, B, D>(eval_flex(i, running_mean, running_var, eps)));
    }
    match slot {
        Some(i) => Err(i),
        None => unreachable!("the inputs are taken only by a cast that returns"),
    }
}

/// The shape as N x C x R (R = the product of the trailing dimensions, 1 for a 2-D input).
#[derive(Clone, Copy, Debug)]
struct Geo {
    n: usize,
    c: usize,
    r: usize,
}

impl Geo {
    fn of(dims: &[usize]) -> Self {
        Self { n: dims[0], c: dims.get(1).copied().unwrap_or(1), r: dims.iter().skip(2).product() }
    }
    /// Values per channel.
    fn count(&self) -> usize {
        self.n * self.r
    }
}

fn values(t: &Tensor<Flex, 1>) -> Vec<f32> {
    t.clone().into_data().convert::<f32>().into_vec::<f32>().unwrap_or_default()
}

fn contiguous(t: FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn eval_flex<const D: usize>(i: BnInputs<Flex, D>, rm: &[f32], rv: &[f32], eps: f64) -> Tensor<Flex, D> {
    let dims = i.x.dims();
    let geo = Geo::of(&dims);
    let gamma = values(&i.gamma);
    let beta = i.beta.as_ref().map_or_else(|| vec![0.0; geo.c], values);
    let a: Vec<f32> =
        (0..geo.c).map(|c| (f64::from(gamma[c]) / (f64::from(rv[c]) + eps).sqrt()) as f32).collect();
    let x = contiguous(i.x.into_primitive().tensor());
    let res = i.residual.map(|r| contiguous(r.into_primitive().tensor()));
    let y = normalize(x.storage(), res.as_ref().map(|r| r.storage()), geo, rm, &a, &beta, i.relu);
    Tensor::from_primitive(TensorPrimitive::Float(flex(y, dims)))
}

/// Per-channel constants of the training forward pass.
struct Stats {
    mean: Vec<f64>,
    invstd: Vec<f64>,
    var: Vec<f64>,
    /// Values per channel the statistics are over (all ranks' with global BN).
    count: f64,
}

fn batch_stats(x: &[f32], geo: Geo, eps: f64, peer: Option<&PeerHandle>) -> Stats {
    let mut sums: Vec<(f64, f64)> =
        (0..geo.c).into_par_iter().map(|ch| channel_sums(x, geo.n, geo.c, geo.r, ch)).collect();
    let mut m = geo.count() as f64;
    if let Some(p) = peer {
        let mut flat: Vec<f64> = sums.iter().flat_map(|(a, b)| [*a, *b]).chain([m]).collect();
        p.sum_f64_or_record(&mut flat);
        sums = flat.chunks_exact(2).map(|v| (v[0], v[1])).collect();
        m = flat[2 * geo.c];
    }
    let m = m.max(1.0);
    let mut s = Stats { mean: Vec::new(), invstd: Vec::new(), var: Vec::new(), count: m };
    for (sum, sq) in sums {
        let mean = sum / m;
        let var = (sq / m - mean * mean).max(0.0);
        s.mean.push(mean);
        s.var.push(var);
        s.invstd.push(1.0 / (var + eps).sqrt());
    }
    s
}

fn train_autodiff<const D: usize>(i: BnInputs<AdFlex, D>, eps: f64) -> BnTrained<AdFlex, D> {
    let dims = i.x.dims();
    let geo = Geo::of(&dims);
    let device = i.x.device();
    let beta = i.beta.unwrap_or_else(|| Tensor::zeros([geo.c], &device));
    let x = i.x.into_primitive().tensor();
    let gamma = i.gamma.into_primitive().tensor();
    let beta = beta.into_primitive().tensor();
    let res = i.residual.map(|r| r.into_primitive().tensor());

    let xs = contiguous(x.primitive.clone());
    let gv: Vec<f32> = gamma.primitive.to_contiguous().storage::<f32>().to_vec();
    let bv: Vec<f32> = beta.primitive.to_contiguous().storage::<f32>().to_vec();
    let peer = GLOBAL_BN.with(|g| g.borrow().clone()).filter(|p| p.world() > 1);
    let stats = batch_stats(xs.storage(), geo, eps, peer.as_ref());
    let mean32: Vec<f32> = stats.mean.iter().map(|v| *v as f32).collect();
    let a: Vec<f32> = (0..geo.c).map(|c| (f64::from(gv[c]) * stats.invstd[c]) as f32).collect();
    let rs = res.as_ref().map(|r| contiguous(r.primitive.clone()));
    let y =
        flex(normalize(xs.storage(), rs.as_ref().map(|r| r.storage()), geo, &mean32, &a, &bv, i.relu), dims);
    let state = BnState {
        x: xs,
        y: i.relu.then(|| y.clone()),
        gamma: gv,
        mean: stats.mean.clone(),
        invstd: stats.invstd.clone(),
        geo,
        count: stats.count,
        peer,
    };
    let out = match res {
        Some(r) => {
            let nodes = [x.node.clone(), gamma.node.clone(), beta.node.clone(), r.node.clone()];
            match BnBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(state, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        }
        None => {
            let nodes = [x.node.clone(), gamma.node.clone(), beta.node.clone()];
            match BnBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(state, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        }
    };
    BnTrained {
        y: Tensor::from_primitive(TensorPrimitive::Float(out)),
        mean: mean32,
        var: stats.var.iter().map(|v| *v as f32).collect(),
        count: stats.count,
    }
}

#[derive(Debug)]
struct BnBackward;

/// What the backward pass needs: the input, the output when a ReLU masks the gradient, and the
/// per-channel constants.
#[derive(Clone, Debug)]
struct BnState {
    x: FlexTensor,
    y: Option<FlexTensor>,
    gamma: Vec<f32>,
    mean: Vec<f64>,
    invstd: Vec<f64>,
    geo: Geo,
    /// Values per channel of the forward statistics.
    count: f64,
    /// Global BN: the input gradient's sums are all-reduced too.
    peer: Option<PeerHandle>,
}

/// Parents: x, gamma, beta and (N = 4) the residual.
impl<const N: usize> Backward<Flex, N> for BnBackward {
    type State = BnState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let s = ops.state;
        let geo = s.geo;
        let dims = s.x.layout().shape().to_vec();
        let xd: &[f32] = s.x.storage();
        let yd: Option<&[f32]> = s.y.as_ref().map(|y| y.storage());
        let dyd: &[f32] = dy.storage();
        let m = s.count;
        // Per channel: sum of g and of g * (x - mean), g = dy masked by the ReLU.
        let sums: Vec<(f64, f64)> = (0..geo.c)
            .into_par_iter()
            .map(|ch| grad_sums(dyd, yd.unwrap_or(&[]), xd, geo.n, geo.c, geo.r, ch, s.mean[ch]))
            .collect();
        let parents = ops.parents;
        let want = |k: usize| parents.get(k).and_then(|p| p.as_ref());
        let register = |grads: &mut Gradients, k: usize, t: FlexTensor| {
            if let Some(node) = want(k) {
                grads.register::<Flex>(node.id, t);
            }
        };
        let c = geo.c;
        let dgamma: Vec<f32> = (0..c).map(|ch| (sums[ch].1 * s.invstd[ch]) as f32).collect();
        let dbeta: Vec<f32> = sums.iter().map(|v| v.0 as f32).collect();
        // Global BN: x's gradient needs the sums over every rank (gamma's and beta's stay
        // local, the trainer sums those over the ranks).
        let sums = match &s.peer {
            Some(p) => {
                let mut flat: Vec<f64> = sums.iter().flat_map(|(a, b)| [*a, *b]).collect();
                p.sum_f64_or_record(&mut flat);
                flat.chunks_exact(2).map(|v| (v[0], v[1])).collect()
            }
            None => sums,
        };
        let want_x = want(0).is_some();
        let want_res = N == 4 && want(3).is_some();
        if want_x || want_res {
            // dx = a g - (k1 (x - mean) + k0), a = gamma invstd, k0 = a sum(g) / M,
            // k1 = a invstd^2 sum(g (x - mean)) / M.
            let mut a = vec![0f32; c];
            let mut k0 = vec![0f32; c];
            let mut k1 = vec![0f32; c];
            let mut mean = vec![0f32; c];
            for ch in 0..c {
                let ac = f64::from(s.gamma[ch]) * s.invstd[ch];
                a[ch] = ac as f32;
                k0[ch] = (ac * sums[ch].0 / m) as f32;
                k1[ch] = (ac * s.invstd[ch] * s.invstd[ch] * sums[ch].1 / m) as f32;
                mean[ch] = s.mean[ch] as f32;
            }
            let len = dyd.len();
            // Gradients x or the residual already have (their other uses) are added to in the
            // parallel pass below, not by burn on one thread.
            let (base_x, base_res) = (
                want(0).and_then(|n| super::take_grad!(grads, n, len)),
                want(3).filter(|_| want_res).and_then(|n| super::take_grad!(grads, n, len)),
            );
            // Written whole, never zeroed first (the bases, if any, are read beside them).
            let mut dx = if want_x { super::uninit(len) } else { Vec::new() };
            let mut dres = if want_res { super::uninit(len) } else { Vec::new() };
            let (bx, bres) = (base_x.as_deref().unwrap_or(&[]), base_res.as_deref().unwrap_or(&[]));
            let per = c * geo.r;
            let consts = Consts { a: &a, k0: &k0, k1: &k1, mean: &mean, r: geo.r };
            let run = |i: usize, dxo: &mut [MaybeUninit<f32>], dro: &mut [MaybeUninit<f32>]| {
                let span = i * per..(i + 1) * per;
                let y = yd.map(|y| &y[span.clone()]);
                let bases = [part(bx, &span), part(bres, &span)];
                input_grad(&dyd[span.clone()], y, &xd[span.clone()], bases, dxo, dro, &consts);
            };
            match (want_x, want_res) {
                (true, true) => dx
                    .par_chunks_mut(per)
                    .zip(dres.par_chunks_mut(per))
                    .enumerate()
                    .for_each(|(i, (a, b))| run(i, a, b)),
                (true, false) => dx.par_chunks_mut(per).enumerate().for_each(|(i, a)| run(i, a, &mut [])),
                (false, _) => dres.par_chunks_mut(per).enumerate().for_each(|(i, b)| run(i, &mut [], b)),
            }
            // SAFETY: `input_grad` writes every cell of each image's non-empty outputs, and the
            // images cover the buffers (the batchnorm tests check, NaN-filled in debug).
            let (dx, dres) = unsafe { (super::assume_init(dx), super::assume_init(dres)) };
            if want_x {
                register(grads, 0, flex(dx, &dims));
            }
            if want_res {
                register(grads, 3, flex(dres, &dims));
            }
        }
        register(grads, 1, flex(dgamma, [c]));
        register(grads, 2, flex(dbeta, [c]));
    }
}

/// Per-channel constants of the input gradient.
struct Consts<'a> {
    a: &'a [f32],
    k0: &'a [f32],
    k1: &'a [f32],
    mean: &'a [f32],
    r: usize,
}

/// `v[span]`, or nothing where `v` is empty (an absent buffer).
fn part<'a>(v: &'a [f32], span: &std::ops::Range<usize>) -> &'a [f32] {
    if v.is_empty() {
        v
    } else {
        &v[span.clone()]
    }
}

/// One image's input gradient (`dx`, if not empty) and residual gradient (`dres`, if not
/// empty), channel by channel (or, for a 2-D input, all channels in one pass); each is added
/// to its base (`bases`: x's, the residual's) where that is not empty.
fn input_grad(
    dy: &[f32],
    y: Option<&[f32]>,
    x: &[f32],
    bases: [&[f32]; 2],
    dx: &mut [MaybeUninit<f32>],
    dres: &mut [MaybeUninit<f32>],
    k: &Consts,
) {
    let r = k.r;
    let [bx, bres] = bases;
    if r == 1 {
        return input_grad_row(dy, y.unwrap_or(&[]), x, bx, bres, dx, dres, k.a, k.k0, k.k1, k.mean);
    }
    for ch in 0..k.a.len() {
        let span = ch * r..(ch + 1) * r;
        let dxc = if dx.is_empty() { &mut [][..] } else { &mut dx[span.clone()] };
        let drc = if dres.is_empty() { &mut [][..] } else { &mut dres[span.clone()] };
        input_grad_channel(
            &dy[span.clone()],
            y.map_or(&[][..], |y| &y[span.clone()]),
            &x[span.clone()],
            part(bx, &span),
            part(bres, &span),
            dxc,
            drc,
            [k.a[ch], k.k0[ch], k.k1[ch], k.mean[ch]],
        );
    }
}

multiversion! {
    /// One channel of [`input_grad`].
    #[allow(clippy::too_many_arguments)]
    fn input_grad_channel(dy: &[f32], y: &[f32], x: &[f32], bx: &[f32], bres: &[f32], dx: &mut [MaybeUninit<f32>], dres: &mut [MaybeUninit<f32>], k: [f32; 4]) {
        let [a, k0, k1, mean] = k;
        if !dx.is_empty() {
            let n = dx.len();
            let (dy, x) = (&dy[..n], &x[..n]);
            if bx.is_empty() {
                for j in 0..n {
                    dx[j] = MaybeUninit::new(a * masked(dy[j], y, j) - (k1 * (x[j] - mean) + k0));
                }
            } else {
                let bx = &bx[..n];
                for j in 0..n {
                    dx[j] = MaybeUninit::new(bx[j] + (a * masked(dy[j], y, j) - (k1 * (x[j] - mean) + k0)));
                }
            }
        }
        if !dres.is_empty() {
            let n = dres.len();
            let dy = &dy[..n];
            if bres.is_empty() {
                for j in 0..n {
                    dres[j] = MaybeUninit::new(masked(dy[j], y, j));
                }
            } else {
                let bres = &bres[..n];
                for j in 0..n {
                    dres[j] = MaybeUninit::new(bres[j] + masked(dy[j], y, j));
                }
            }
        }
    }
}

multiversion! {
    /// [`input_grad_channel`] for one row of a 2-D input: channel j is element j.
    #[allow(clippy::too_many_arguments)]
    fn input_grad_row(dy: &[f32], y: &[f32], x: &[f32], bx: &[f32], bres: &[f32], dx: &mut [MaybeUninit<f32>], dres: &mut [MaybeUninit<f32>], a: &[f32], k0: &[f32], k1: &[f32], mean: &[f32]) {
        for j in 0..dx.len() {
            let v = a[j] * masked(dy[j], y, j) - (k1[j] * (x[j] - mean[j]) + k0[j]);
            dx[j] = MaybeUninit::new(if bx.is_empty() { v } else { bx[j] + v });
        }
        for j in 0..dres.len() {
            let v = masked(dy[j], y, j);
            dres[j] = MaybeUninit::new(if bres.is_empty() { v } else { bres[j] + v });
        }
    }
}

/// `relu?((x - mean) a + b + res?)` for every image, in parallel over images.
fn normalize(
    x: &[f32],
    res: Option<&[f32]>,
    geo: Geo,
    mean: &[f32],
    a: &[f32],
    b: &[f32],
    relu: bool,
) -> Vec<f32> {
    let per = geo.c * geo.r;
    if per == 0 {
        return super::zeros(x.len());
    }
    let r = geo.r;
    let fill = |y: &mut [MaybeUninit<f32>]| {
        y.par_chunks_mut(per).enumerate().for_each(|(i, out)| {
            let span = i * per..(i + 1) * per;
            let (x, res) = (&x[span.clone()], res.map_or(&[][..], |r| &r[span]));
            if r == 1 {
                return normalize_row(x, res, out, mean, a, b, relu);
            }
            for ch in 0..geo.c {
                let cs = ch * r..(ch + 1) * r;
                let res = if res.is_empty() { res } else { &res[cs.clone()] };
                normalize_channel(&x[cs.clone()], res, &mut out[cs], mean[ch], a[ch], b[ch], relu);
            }
        })
    };
    // SAFETY: x.len() is a whole number of images of `per` values; each chunk's channels (or
    // its row) cover it, and the normalize functions write every cell of their `out`.
    unsafe { super::filled(x.len(), fill) }
}

/// One normalized value: `(x - mean) a + b (+ res) (ReLU)`.
#[inline(always)]
fn norm(x: f32, mean: f32, a: f32, b: f32) -> f32 {
    (x - mean) * a + b
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn normalize_channel(x: &[f32], res: &[f32], out: &mut [MaybeUninit<f32>], mean: f32, a: f32, b: f32, relu: bool) {
        match (res.is_empty(), relu) {
            (true, false) => for j in 0..x.len() { out[j] = MaybeUninit::new(norm(x[j], mean, a, b)) },
            (true, true) => for j in 0..x.len() { out[j] = MaybeUninit::new(norm(x[j], mean, a, b).max(0.0)) },
            (false, false) => for j in 0..x.len() { out[j] = MaybeUninit::new(norm(x[j], mean, a, b) + res[j]) },
            (false, true) => for j in 0..x.len() { out[j] = MaybeUninit::new((norm(x[j], mean, a, b) + res[j]).max(0.0)) },
        }
    }
}

multiversion! {
    /// [`normalize_channel`] for one row of a 2-D input: channel j is element j.
    #[allow(clippy::too_many_arguments)]
    fn normalize_row(x: &[f32], res: &[f32], out: &mut [MaybeUninit<f32>], mean: &[f32], a: &[f32], b: &[f32], relu: bool) {
        match (res.is_empty(), relu) {
            (true, false) => for j in 0..x.len() { out[j] = MaybeUninit::new(norm(x[j], mean[j], a[j], b[j])) },
            (true, true) => for j in 0..x.len() { out[j] = MaybeUninit::new(norm(x[j], mean[j], a[j], b[j]).max(0.0)) },
            (false, false) => for j in 0..x.len() { out[j] = MaybeUninit::new(norm(x[j], mean[j], a[j], b[j]) + res[j]) },
            (false, true) => for j in 0..x.len() { out[j] = MaybeUninit::new((norm(x[j], mean[j], a[j], b[j]) + res[j]).max(0.0)) },
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;

    use super::*;
    use crate::model::{BatchNorm, BN_EPS};

    fn random<const D: usize>(dims: [usize; D], seed: u64) -> TensorData {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = dims.iter().product::<usize>();
        TensorData::new((0..n).map(|_| rng.random_range(-2.0f32..3.0)).collect::<Vec<f32>>(), dims)
    }

    fn vec<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap_or_default()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 2e-4 * scale, "{what}[{i}]: fused {x} vs tensor ops {y}");
        }
    }

    /// Output, every gradient and the running statistics, fused or with tensor ops.
    fn run<const D: usize>(
        dims: [usize; D],
        beta: bool,
        residual: bool,
        relu: bool,
        fused: bool,
        shared: bool,
    ) -> Vec<Vec<f32>> {
        let device = Default::default();
        let c = dims[1];
        let mut bn = BatchNorm::<AdFlex>::new(c, beta, &device);
        bn.weight = burn::module::Param::from_tensor(Tensor::from_data(random([c], 5), &device));
        let x = Tensor::<AdFlex, D>::from_data(random(dims, 1), &device).require_grad();
        let r = Tensor::<AdFlex, D>::from_data(random(dims, 2), &device).require_grad();
        let y = if fused {
            bn.forward_act(x.clone(), residual.then(|| r.clone()), relu)
        } else {
            let count = (dims[0] * dims[2..].iter().product::<usize>()) as f64;
            let mut y = bn.forward_tensor_ops(x.clone(), true, count);
            if residual {
                y = y + r.clone();
            }
            if relu {
                y = burn::tensor::activation::relu(y);
            }
            y
        };
        let weights = Tensor::<AdFlex, D>::from_data(random(dims, 4), &device);
        // With `shared`, x and the residual are used twice: their gradients from BatchNorm add
        // to the others (else BatchNorm writes them whole).
        let loss = (y.clone() * weights).sum();
        let loss =
            if shared { loss + (x.clone() * x.clone()).sum() + (r.clone() * r.clone()).sum() } else { loss };
        let grads = loss.backward();
        let mut out = vec![vec(y.inner()), vec(x.grad(&grads).expect("x grad"))];
        out.push(vec(bn.weight.val().grad(&grads).expect("gamma grad")));
        if let Some(b) = &bn.bias {
            out.push(vec(b.val().grad(&grads).expect("beta grad")));
        }
        if residual {
            out.push(vec(r.grad(&grads).expect("residual grad")));
        }
        out.push(vec(bn.running_mean.value().inner()));
        out.push(vec(bn.running_var.value().inner()));
        out
    }

    #[test]
    fn fused_batch_norm_matches_tensor_ops_forward_and_backward() {
        let before = super::super::ACCUMULATED.with(|n| n.get());
        for (beta, residual, relu, shared) in [
            (true, false, false, true),
            (true, false, true, true),
            (true, true, true, true),
            (false, false, false, true),
            (true, true, false, true),
            (true, true, true, false),
            (true, false, false, false),
        ] {
            let case = format!("beta {beta} residual {residual} relu {relu} shared {shared}");
            let run = |dims: &[usize], fused: bool| match *dims {
                [a, b, c, d] => run([a, b, c, d], beta, residual, relu, fused, shared),
                [a, b] => run([a, b], beta, residual, relu, fused, shared),
                _ => unreachable!("2-D and 4-D cases only"),
            };
            for (what, (f, t)) in [
                ("4-D", (run(&[3, 5, 4, 6], true), run(&[3, 5, 4, 6], false))),
                ("4-D odd", (run(&[2, 3, 3, 3], true), run(&[2, 3, 3, 3], false))),
            ] {
                assert_eq!(f.len(), t.len());
                for (k, (a, b)) in f.iter().zip(&t).enumerate() {
                    close(a, b, &format!("{what} {case} output {k}"));
                }
            }
            let (f, t) = (run(&[6, 7], true), run(&[6, 7], false));
            for (k, (a, b)) in f.iter().zip(&t).enumerate() {
                close(a, b, &format!("2-D {case} output {k}"));
            }
        }
        assert!(super::super::ACCUMULATED.with(|n| n.get()) > before, "no gradient was accumulated in place");
    }

    #[test]
    fn evaluation_mode_matches_tensor_ops() {
        let device = Default::default();
        let bn = BatchNorm::<Flex>::new(4, true, &device);
        bn.running_mean.update(Tensor::from_data(random([4], 7), &device));
        bn.running_var.update(Tensor::from_data(TensorData::new(vec![0.5f32, 2.0, 1.0, 3.0], [4]), &device));
        let x = Tensor::<Flex, 4>::from_data(random([3, 4, 5, 5], 8), &device);
        let r = Tensor::<Flex, 4>::from_data(random([3, 4, 5, 5], 9), &device);
        let fused = vec(bn.forward_act(x.clone(), Some(r.clone()), true));
        let plain = vec(burn::tensor::activation::relu(bn.forward_tensor_ops(x, false, 75.0) + r));
        close(&fused, &plain, "eval");
    }

    #[test]
    fn same_bits_whatever_the_thread_count() {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
            pool.install(|| run([9, 6, 5, 7], true, true, true, true, true))
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn eps_keeps_a_constant_channel_finite() {
        let device = Default::default();
        let bn = BatchNorm::<AdFlex>::new(2, true, &device);
        let x = Tensor::<AdFlex, 4>::ones([2, 2, 3, 3], &device).require_grad();
        let y = bn.forward_act(x.clone(), None, false);
        let grads = y.clone().sum().backward();
        assert!(vec(y.inner()).iter().all(|v| v.is_finite() && v.abs() < 1e-3));
        assert!(vec(x.grad(&grads).expect("grad")).iter().all(|v| v.is_finite()));
        let _ = BN_EPS;
    }
}
