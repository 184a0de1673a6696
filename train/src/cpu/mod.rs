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
pub mod conv;
mod conv_grad;
pub(crate) mod gemm;
mod im2col;

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

/// Whether `B` is the CPU backend (plain or autodiff).
pub(crate) fn is_flex<B: Backend>() -> bool {
    let id = std::any::TypeId::of::<B>();
    id == std::any::TypeId::of::<Flex>() || id == std::any::TypeId::of::<AdFlex>()
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

/// Scratch benchmark hook: the microkernel alone on L1-resident panels; returns GFLOP/s.
#[doc(hidden)]
pub fn bench_kernel(iters: usize) -> f64 {
    let kern = gemm::kernel();
    let kc = gemm::KC;
    let a = vec![0.5f32; kern.mr * kc];
    let b = vec![0.25f32; kern.nr * kc];
    let mut tile = vec![0f32; kern.mr * kern.nr];
    let t = std::time::Instant::now();
    for _ in 0..iters {
        gemm::bench_run(kern, kc, &a, &b, &mut tile);
    }
    std::hint::black_box(&tile);
    (2 * kern.mr * kern.nr * kc * iters) as f64 / t.elapsed().as_secs_f64() / 1e9
}
