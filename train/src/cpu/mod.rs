//! Fast paths for burn's CPU backend (`Flex`, and `Autodiff<Flex>` when training): the
//! convolution ([`conv`]) and BatchNorm fused with its residual add and ReLU ([`batchnorm`]),
//! each registered as one burn autodiff op with a hand-written backward pass.
//!
//! Why: flex runs every elementwise op on one thread and materializes every intermediate, so a
//! BatchNorm written with tensor ops was ~10 single-threaded passes over the activations
//! forward and ~20 backward; here it is 2 parallel passes each way.
//!
//! Dispatch: the model is generic over `Backend`; stable Rust has no specialization, so each op
//! checks at run time (by type, through `Any`) whether the backend is `Flex` or
//! `Autodiff<Flex>`; any other backend (CUDA, wgpu) takes burn's own ops.
//!
//! Every op is deterministic whatever the thread count: work is split by shapes (channels,
//! images, fixed groups), never by the number of threads, and every sum runs in a fixed order.

pub mod batchnorm;
mod bn_sums;
pub mod conv;
mod conv_grad;
pub(crate) mod gemm;
mod geometry;
mod im2col;
pub(crate) mod optim;

use std::any::Any;

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor};
use burn_flex::{FlexTensor, Layout};
use burn_std::Bytes;

/// The training backend on the CPU.
pub type AdFlex = Autodiff<Flex>;

/// Moves a value out of `slot` as type `U` if `T` is `U`.
pub(crate) fn cast<T: 'static, U: 'static>(slot: &mut Option<T>) -> Option<U> {
    (slot as &mut dyn Any).downcast_mut::<Option<U>>().and_then(Option::take)
}

/// `y` back as the caller's tensor type; `A` is `B` (the caller found out by a [`cast`]).
pub(crate) fn back<A: Backend, B: Backend, const D: usize>(y: Tensor<A, D>) -> Tensor<B, D> {
    match cast::<_, Tensor<B, D>>(&mut Some(y)) {
        Some(y) => y,
        None => unreachable!("the backend was identified by the cast into it"),
    }
}

/// Whether `B` is the CPU backend (plain or autodiff) and this module's ops are on.
pub(crate) fn is_flex<B: Backend>() -> bool {
    let id = std::any::TypeId::of::<B>();
    enabled() && (id == std::any::TypeId::of::<Flex>() || id == std::any::TypeId::of::<AdFlex>())
}

thread_local! {
    /// Off: the CPU backend takes burn's own ops on this thread (tests compare the two).
    static ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

fn enabled() -> bool {
    ENABLED.with(|e| e.get())
}

/// Runs `f` with this module's ops off on this thread: the reference for tests.
#[cfg(test)]
pub(crate) fn with_burn_ops<R>(f: impl FnOnce() -> R) -> R {
    ENABLED.with(|e| e.set(false));
    let out = f();
    ENABLED.with(|e| e.set(true));
    out
}

/// A contiguous f32 flex tensor over `data`.
pub(crate) fn flex(data: Vec<f32>, dims: impl AsRef<[usize]>) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(data),
        Layout::contiguous(Shape::from(dims.as_ref().to_vec())),
        DType::F32,
    )
}

/// The autodiff tensor type of the CPU backend (its fields are public; its module is not).
pub(crate) type AdTensor = burn::tensor::ops::FloatTensor<AdFlex>;

/// Takes the gradient registered so far for the parent node `node` out of `grads`, as a vector
/// of `len` values (an op then adds its own contribution in its parallel passes and registers
/// the sum, instead of burn adding the two on one thread). `None` if there is none, or of
/// another size (then it stays registered). A macro because burn's node type cannot be named.
macro_rules! take_grad {
    ($grads:expr, $node:expr, $len:expr) => {{
        // `Gradients::remove` looks a gradient up by a tensor's node; this tensor only names it.
        let key = $crate::cpu::AdTensor {
            primitive: $crate::cpu::flex(Vec::new(), [0]),
            node: $node.clone(),
            rc: std::sync::Arc::new($node.id),
        };
        match $grads.remove::<burn::backend::Flex>(&key) {
            Some(t) if t.layout().num_elements() == $len => {
                #[cfg(test)]
                $crate::cpu::ACCUMULATED.with(|n| n.set(n.get() + 1));
                Some(t.to_contiguous().storage::<f32>().to_vec())
            }
            Some(t) => {
                $grads.register::<burn::backend::Flex>($node.id, t);
                None
            }
            None => None,
        }
    }};
}
pub(crate) use take_grad;

#[cfg(test)]
thread_local! {
    /// Gradients an op added its contribution to, on this thread (the backward pass runs on
    /// the caller's thread; tests check that the path is taken).
    pub(crate) static ACCUMULATED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

simclr_core::multiversion! {
    /// `dst += src`, element by element (a GEMM tile onto its partial sum), at the CPU's widest
    /// vector width.
    pub(crate) fn add_into(dst: &mut [f32], src: &[f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }
}

/// Sizes the thread pool of the training and evaluation ops (rayon's global pool) to
/// `threads`, once per process; later calls keep the first size. Results do not depend on it.
pub fn set_threads(threads: usize) {
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| {
        // An error means a pool exists already (its size then stands).
        let _ = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build_global();
    });
}

/// `data` as possibly-uninitialized cells, for sinks that take either.
///
/// # Safety
/// Only initialized values may be written through the result (so `data` stays initialized).
pub(crate) unsafe fn as_uninit(data: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: MaybeUninit<f32> has the layout of f32; the caller writes only floats.
    unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast(), data.len()) }
}

/// A vector of `n` values written by `fill` without zeroing them first (a layer's output is
/// tens of megabytes: zeroing it cost ~5% of a ResNet-18 step). In debug builds the cells hold
/// NaN first, so a value `fill` misses shows in the tests.
///
/// # Safety
/// `fill` must write every one of the `n` cells.
pub(crate) unsafe fn filled(n: usize, fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = uninit(n);
    fill(&mut v);
    // SAFETY: the caller's `fill` initialized all n cells.
    unsafe { assume_init(v) }
}

/// `n` cells to be written (NaN in debug builds, so a value the writer misses shows in the
/// tests); [`assume_init`] turns them into values once every cell is written.
pub(crate) fn uninit(n: usize) -> Vec<std::mem::MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is n, and a MaybeUninit needs no initialization.
    unsafe { v.set_len(n) };
    if cfg!(debug_assertions) {
        v.fill(std::mem::MaybeUninit::new(f32::NAN));
    }
    v
}

/// The values of cells from [`uninit`], without a copy.
///
/// # Safety
/// Every cell of `v` has been written.
pub(crate) unsafe fn assume_init(v: Vec<std::mem::MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
    // SAFETY: MaybeUninit<f32> has the layout of f32, the allocation is handed over whole (same
    // pointer, length and capacity, never dropped here), and the caller wrote every cell.
    unsafe { Vec::from_raw_parts(ptr.cast::<f32>(), len, cap) }
}

/// `n` zeros, written by every thread of the pool (a big tensor's allocation is then not a
/// single-threaded memset on the thread that drives the backward pass).
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    if n < CHUNK {
        return vec![0.0; n];
    }
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n].par_chunks_mut(CHUNK).for_each(|c| {
        c.iter_mut().for_each(|x| {
            x.write(0.0);
        });
    });
    // SAFETY: the loop above initialized all n elements.
    unsafe { v.set_len(n) };
    v
}

thread_local! {
    /// Per-thread working buffers, kept between calls so that the im2col and GEMM buffers of
    /// every convolution are neither zeroed nor page-faulted in again.
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with `K` working buffers of the given lengths from this thread's pool. Their
/// contents are whatever the last user left (initialized, not zeroed): `f` must write before it
/// reads.
pub(crate) fn with_scratch<const K: usize, R>(lens: [usize; K], f: impl FnOnce([&mut [f32]; K]) -> R) -> R {
    let mut bufs: [Vec<f32>; K] =
        std::array::from_fn(|_| SCRATCH.with(|s| s.borrow_mut().pop()).unwrap_or_default());
    for (b, &len) in bufs.iter_mut().zip(&lens) {
        if b.len() < len {
            b.resize(len, 0.0);
        }
    }
    let out = {
        let mut it = bufs.iter_mut().zip(lens);
        let slices: [&mut [f32]; K] = std::array::from_fn(|_| match it.next() {
            Some((b, len)) => &mut b[..len],
            None => unreachable!("one slice per buffer"),
        });
        f(slices)
    };
    SCRATCH.with(|s| s.borrow_mut().extend(bufs));
    out
}

/// The GEMM microkernel's own speed on this CPU, GFLOP/s on one thread, measured on
/// L1-resident operands (the practical peak a convolution can approach), and its name
/// (`avx512`, `avx2` or `portable`).
pub fn kernel_peak_gflops() -> (f64, &'static str) {
    let kern = gemm::kernel();
    let kc = gemm::KC;
    let a = vec![0.5f32; kern.mr * kc];
    let b = vec![0.25f32; kern.nr * kc];
    let mut tile = vec![0f32; kern.mr * kern.nr];
    let flops = (2 * kern.mr * kern.nr * kc) as f64;
    // A warm-up, then ~20 ms.
    let mut best = 0f64;
    for iters in [2_000usize, 20_000, 20_000] {
        let t = std::time::Instant::now();
        for _ in 0..iters {
            gemm::bench_run(kern, kc, &a, &b, &mut tile);
        }
        best = best.max(flops * iters as f64 / t.elapsed().as_secs_f64().max(1e-9) / 1e9);
    }
    std::hint::black_box(&tile);
    (best, kern.name)
}

#[cfg(test)]
mod tests {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::optim::GradientsParams;
    use burn::tensor::{Tensor, TensorData};

    use super::*;
    use crate::loss::contrastive_loss;
    use crate::model::SimclrModel;
    use crate::SimclrTrain;

    struct Grads<'a> {
        grads: &'a GradientsParams,
        out: Vec<Vec<f32>>,
    }

    impl ModuleVisitor<AdFlex> for Grads<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AdFlex, D>>) {
            if let Some(g) = self.grads.get::<Flex, D>(p.id) {
                self.out.push(g.into_data().to_vec::<f32>().unwrap_or_default());
            }
        }
    }

    /// Loss and every parameter's gradient of a whole model on one batch.
    fn step(cfg: &SimclrTrain) -> (f32, Vec<Vec<f32>>) {
        use rand::{Rng, SeedableRng};
        let device = Default::default();
        let model = SimclrModel::<AdFlex>::new(cfg, 3, &device);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let x: Vec<f32> = (0..16 * 3 * 32 * 32).map(|_| rng.random::<f32>()).collect();
        let x = Tensor::<AdFlex, 4>::from_data(TensorData::new(x, [16, 3, 32, 32]), &device);
        let (_, z) = model.forward(x);
        let out = contrastive_loss(z, &cfg.loss);
        let loss = out.loss.clone().into_data().to_vec::<f32>().unwrap_or_default()[0];
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        let mut v = Grads { grads: &grads, out: Vec::new() };
        model.visit(&mut v);
        (loss, v.out)
    }

    /// The whole model, trained with this module's ops, gives burn's loss and gradients (both
    /// stems, bottleneck blocks, a head with BatchNorm).
    #[test]
    fn whole_models_match_burns_ops() {
        // Measured: ResNet-18s agree to ~1e-5 relative. The ResNet-50 (1 x 1 maps at the end,
        // BatchNorm over 16 values) amplifies rounding to ~1e-2 in its first layers; a wrong
        // gradient is off by O(1).
        for (cfg, tol) in [
            (serde_json::json!({"stem": "imagenet", "width": 0.25, "head": {"out_dim": 16}}), 1e-3),
            (serde_json::json!({"stem": "cifar", "width": 0.25, "head": {"bn": false}}), 1e-3),
            (serde_json::json!({"backbone": "resnet50", "stem": "imagenet", "width": 0.125}), 1e-1),
        ] {
            let cfg: SimclrTrain = serde_json::from_value(cfg).unwrap_or_default();
            let (loss, grads) = step(&cfg);
            let (want_loss, want) = with_burn_ops(|| step(&cfg));
            assert!((loss - want_loss).abs() <= 1e-4 * want_loss.abs(), "loss {loss} vs burn's {want_loss}");
            assert_eq!(grads.len(), want.len());
            for (k, (g, w)) in grads.iter().zip(&want).enumerate() {
                let norm = w.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
                let diff = g.iter().zip(w).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>().sqrt();
                assert!(
                    diff <= tol * norm.max(1e-6),
                    "{cfg:?} parameter {k}: |diff| {diff:.3e} vs |grad| {norm:.3e}"
                );
            }
        }
    }
}
