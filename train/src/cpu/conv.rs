//! 2-D convolution (groups 1, dilation 1) for the CPU backend: im2col + one GEMM per group of
//! images, forward and backward.
//!
//! Why not burn's own: flex's forward is fine, but burn computes the weight gradient as a
//! convolution of the input by the output gradient (a 32 x 32 "kernel" for a CIFAR layer),
//! which leaves flex's GEMM with 9 output columns and a 600 MB im2col per layer; the backward
//! pass was ~70% of a ResNet-18 step. Here both gradients are plain GEMMs:
//! dW = sum_n dY[n] . col(x[n])^T and col(dX[n]) = W^T . dY[n], then col2im.
//!
//! Deterministic whatever the thread count: images are split into groups fixed by the shapes
//! (never by the number of threads), each group's GEMM runs on one thread, and the partial
//! weight gradients are summed in group order.
//!
//! Dispatch ([`super`]): `Flex` and `Autodiff<Flex>` with f32 tensors take this path; any other
//! backend (CUDA, wgpu) or dtype goes to burn's `conv2d`.

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{ConvOptions, FloatTensor};
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::NodeId;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use std::ops::Range;

use super::conv_grad::{self, weight_grad};
use super::geometry::Geometry;

use super::gemm::dense::{Matrix, Out as Dense};
use super::gemm::{self, Packed};
use super::im2col::{Im2colCols, Nchw, Padded, PaddedCl};
use super::{back, cast, flex, with_scratch, AdFlex};

/// Calls that took this module's path (tests check that the dispatch finds the CPU backend).
#[cfg(test)]
static FAST_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `conv2d(x, weight)` without bias, stride `s`, padding `p`; the fast path on the CPU backend.
pub fn conv2d<B: Backend>(x: Tensor<B, 4>, weight: Tensor<B, 4>, s: usize, p: usize) -> Tensor<B, 4> {
    let options = ConvOptions::new([s, s], [p, p], [1, 1], 1);
    let fast = x.dtype() == DType::F32 && weight.dtype() == DType::F32 && super::is_flex::<B>();
    let mut slot = Some((x, weight));
    if fast {
        if let Some((x, w)) = cast::<_, (Tensor<AdFlex, 4>, Tensor<AdFlex, 4>)>(&mut slot) {
            #[cfg(test)]
            FAST_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let y = autodiff_forward(x.into_primitive().tensor(), w.into_primitive().tensor(), s, p);
            return back::<AdFlex, B, 4>(Tensor::from_primitive(TensorPrimitive::Float(y)));
        }
        if let Some((x, w)) = cast::<_, (Tensor<Flex, 4>, Tensor<Flex, 4>)>(&mut slot) {
            #[cfg(test)]
            FAST_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let geo = Geometry::new(x.shape().dims(), w.shape().dims(), s, p);
            let y = forward(&x.into_primitive().tensor(), &w.into_primitive().tensor(), &geo, None);
            return back::<Flex, B, 4>(Tensor::from_primitive(TensorPrimitive::Float(y)));
        }
    }
    match slot {
        Some((x, w)) => burn::tensor::module::conv2d(x, w, None, options),
        None => unreachable!("a tensor pair is taken only by a cast that returns"),
    }
}

/// Parallel tasks a convolution should have, at least, before rows are split.
const MIN_TASKS: usize = 8;
/// Output columns per forward task: the packed B block (KC x this) fits in L2.
const TASK_COLUMNS: usize = 512;

/// `(rows, columns)` ranges of the tasks that split an m x n product: column blocks of
/// `columns`, each split into row blocks (multiples of `mr`) when there are fewer than
/// [`MIN_TASKS`] of them. A function of the shapes alone.
fn tiles(m: usize, n: usize, columns: usize, mr: usize) -> Vec<(Range<usize>, Range<usize>)> {
    let col_blocks = n.div_ceil(columns.max(1)).max(1);
    let row_blocks = if col_blocks >= MIN_TASKS {
        1
    } else {
        MIN_TASKS.div_ceil(col_blocks).min(m.div_ceil(4 * mr)).max(1)
    };
    let rows = m.div_ceil(row_blocks).div_ceil(mr) * mr;
    let cols = n.div_ceil(col_blocks).max(1);
    let mut out = Vec::new();
    for cb in 0..col_blocks {
        for rb in 0..row_blocks {
            let (r0, c0) = (rb * rows, cb * cols);
            if r0 < m && c0 < n {
                out.push((r0..(r0 + rows).min(m), c0..(c0 + cols).min(n)));
            }
        }
    }
    out
}

/// Forward: y = W . im2col(x), never building the im2col matrix. Stride-1 convolutions whose
/// output rows are whole vector halves read it in place from a padded copy of x (channels as
/// rows of the product, stored straight into NCHW); small outputs (under 16 columns) compute
/// y^T = im2col'(x) . W'^T from a padded channels-last copy of x, read in place too
/// ([`forward_channels_last`]); the rest pack it panel by panel. (Measured per layer, 2 cores:
/// channels-last is 9-42% faster on 8x8 and 4x4 outputs, 20% slower on a 32x32 stride-2 input.)
/// `base`, if given, is added to: y = base + W . im2col(x) (a gradient accumulated in place).
fn forward(x: &FlexTensor, w: &FlexTensor, geo: &Geometry, base: Option<Vec<f32>>) -> FlexTensor {
    let (x, w) = (x.to_contiguous(), w.to_contiguous());
    let (xd, wd): (&[f32], &[f32]) = (x.storage(), w.storage());
    let g = *geo;
    let (k, pos) = (g.k(), g.positions());
    let run = |out: &Nchw| {
        let kern = gemm::kernel_for_rows(g.co);
        if g.s == 1 && g.wo.is_multiple_of(kern.nr / 2) {
            let a = Packed::new(kern.mr, &Matrix { data: wd, lane_stride: k, k_stride: 1 }, g.co, k);
            let packed = Im2colCols { x: xd, g };
            let padded = Padded::new(xd, g);
            tiles(g.co, g.n * pos, TASK_COLUMNS, kern.mr).into_par_iter().for_each(|(r, c)| {
                gemm::gemm_indirect(kern, r, c, 0..k, gemm::A::Prepacked(&a), &padded, &packed, out)
            });
        } else if g.wo < 16 {
            // Small outputs: the products have few columns per image and the copy of x is small.
            forward_channels_last(xd, wd, g, gemm::kernel(), out);
        } else {
            let a = Packed::new(kern.mr, &Matrix { data: wd, lane_stride: k, k_stride: 1 }, g.co, k);
            let packed = Im2colCols { x: xd, g };
            tiles(g.co, g.n * pos, TASK_COLUMNS, kern.mr).into_par_iter().for_each(|(r, c)| {
                gemm::gemm_indirect(kern, r, c, 0..k, gemm::A::Prepacked(&a), &NoIndirect, &packed, out)
            });
        }
    };
    let len = g.n * g.co * pos;
    let y = match base {
        Some(mut y) => {
            if !y.is_empty() {
                run(&Nchw::adding(&mut y, g.co, pos));
            }
            y
        }
        None if len == 0 || k == 0 => super::zeros(len),
        // SAFETY: every branch of `run` covers all channels x columns (the tiles, or the
        // channels-last tasks), and with k >= 1 the first reduction block of every tile stores
        // with `overwrite`, so every cell is written (the conv tests check, NaN-filled in debug).
        None => unsafe { super::filled(len, |cells| run(&Nchw::new(cells, g.co, pos))) },
    };
    flex(y, [g.n, g.co, g.ho, g.wo])
}

/// y^T [columns x co] = im2col'(x) . W'^T with im2col' rows ordered (kernel row, kernel column,
/// channel), read in place from a padded channels-last copy of x; each task's block of y^T is
/// computed in a scratch buffer, then transposed into y.
fn forward_channels_last(xd: &[f32], wd: &[f32], g: Geometry, kern: gemm::Kernel, out: &Nchw) {
    let (k, pos) = (g.k(), g.positions());
    let taps = g.kh * g.kw;
    let mut wperm = super::zeros(wd.len());
    wperm.par_chunks_mut(k.max(1)).enumerate().for_each(|(o, row)| {
        for c in 0..g.ci {
            for t in 0..taps {
                row[t * g.ci + c] = wd[(o * g.ci + c) * taps + t];
            }
        }
    });
    let b = Packed::new(kern.nr, &Matrix { data: &wperm, lane_stride: k, k_stride: 1 }, g.co, k);
    let xcl = PaddedCl::new(xd, g);
    let columns = g.n * pos;
    // Blocks of columns (each stays in one image where it can), channel blocks of whole panels
    // when there are few: a function of the shapes alone.
    let col_blocks = columns.div_ceil(CL_TASK_COLUMNS);
    let chan_blocks =
        if col_blocks >= MIN_TASKS { 1 } else { MIN_TASKS.div_ceil(col_blocks).min(g.co.div_ceil(kern.nr)) };
    let per_chan = g.co.div_ceil(chan_blocks).div_ceil(kern.nr) * kern.nr;
    let tasks: Vec<(Range<usize>, Range<usize>)> = (0..col_blocks)
        .flat_map(|cb| (0..chan_blocks).map(move |hb| (cb, hb)))
        .map(|(cb, hb)| {
            (
                cb * CL_TASK_COLUMNS..((cb + 1) * CL_TASK_COLUMNS).min(columns),
                hb * per_chan..((hb + 1) * per_chan).min(g.co),
            )
        })
        .filter(|(c, h)| !c.is_empty() && !h.is_empty())
        .collect();
    tasks.into_par_iter().for_each(|(cols, chans)| {
        let (m, n) = (cols.len(), chans.len());
        with_scratch([m * n], |[t]| {
            let sink = Shifted { inner: Dense::new(t, n), rows: cols.start, cols: chans.start };
            gemm::gemm_arows(kern, cols.clone(), chans.clone(), k, &xcl, &b, &sink);
            out.put_transposed(cols.start, m, chans.start, n, t);
        });
    });
}

/// Output columns per task of [`forward_channels_last`].
const CL_TASK_COLUMNS: usize = 256;

/// A sink whose (0, 0) is (`rows`, `cols`) of the product.
struct Shifted<S> {
    inner: S,
    rows: usize,
    cols: usize,
}

impl<S: gemm::Store> gemm::Store for Shifted<S> {
    fn store(
        &self,
        m0: usize,
        mlen: usize,
        n0: usize,
        nlen: usize,
        tile: &[f32],
        nr: usize,
        overwrite: bool,
    ) {
        self.inner.store(m0 - self.rows, mlen, n0 - self.cols, nlen, tile, nr, overwrite);
    }
}

/// A B operand with no panel readable in place (everything packed).
struct NoIndirect;

impl gemm::Indirect for NoIndirect {
    fn data(&self) -> &[f32] {
        &[]
    }
    fn offsets(&self, _: usize, kc: usize, out: &mut [usize]) {
        out[..kc].fill(0);
    }
    fn bases(&self, _: usize, _: usize) -> Option<(usize, usize)> {
        None
    }
}

/// Input gradient. Stride 1: the forward convolution of dY by the flipped, transposed kernel
/// (padding k - 1 - p), which runs at the forward pass's speed. Other strides: GEMM + col2im
/// ([`conv_grad`]).
/// `base`, if given, is the gradient x already has from its other uses: the result is added to
/// it in the parallel stores (instead of a single-threaded tensor add afterwards).
fn input_grad(w: &FlexTensor, dy: &FlexTensor, geo: &Geometry, base: Option<Vec<f32>>) -> FlexTensor {
    let (w, dy) = (w.to_contiguous(), dy.to_contiguous());
    let (wd, dyd): (&[f32], &[f32]) = (w.storage(), dy.storage());
    let g = *geo;
    if g.s == 1 && g.kh == g.kw && g.p < g.kh && g.h == g.ho && g.w == g.wo {
        let taps = g.kh * g.kw;
        let mut flipped = super::zeros(wd.len());
        flipped.par_chunks_mut((g.co * taps).max(1)).enumerate().for_each(|(c, row)| {
            for o in 0..g.co {
                for t in 0..taps {
                    row[o * taps + taps - 1 - t] = wd[(o * g.ci + c) * taps + t];
                }
            }
        });
        let flipped = flex(flipped, [g.ci, g.co, g.kh, g.kw]);
        let back = Geometry::new([g.n, g.co, g.ho, g.wo], [g.ci, g.co, g.kh, g.kw], 1, g.kh - 1 - g.p);
        return forward(&dy, &flipped, &back, base);
    }
    conv_grad::input_grad_strided(wd, dyd, g, base)
}

#[derive(Debug)]
struct ConvBackward;

impl Backward<Flex, 2> for ConvBackward {
    type State = (NodeId, NodeId, Geometry);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (x_state, w_state, geo) = ops.state;
        let x = checkpointer.retrieve_node_output::<FlexTensor>(x_state);
        let w = checkpointer.retrieve_node_output::<FlexTensor>(w_state);
        if let Some(node) = node_x {
            let base = super::take_grad!(grads, node, geo.n * geo.ci * geo.h * geo.w);
            grads.register::<Flex>(node.id, input_grad(&w, &dy, &geo, base));
        }
        if let Some(node) = node_w {
            grads.register::<Flex>(node.id, weight_grad(&x, &dy, &geo));
        }
    }
}

fn autodiff_forward(
    x: FloatTensor<AdFlex>,
    w: FloatTensor<AdFlex>,
    s: usize,
    p: usize,
) -> FloatTensor<AdFlex> {
    let dims = |t: &FlexTensor| {
        let d = t.layout().shape();
        [d[0], d[1], d[2], d[3]]
    };
    let geo = Geometry::new(dims(&x.primitive), dims(&w.primitive), s, p);
    match ConvBackward.prepare::<NoCheckpointing>([x.node.clone(), w.node.clone()]).compute_bound().stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let x_state = prep.checkpoint(&x);
            let w_state = prep.checkpoint(&w);
            let y = forward(&x.primitive, &w.primitive, &geo, None);
            prep.finish((x_state, w_state, geo), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(&x.primitive, &w.primitive, &geo, None)),
    }
}

/// Seconds of the input gradient and of the weight gradient of one stride-`s`, padding-`p`
/// convolution of `x` (NCHW) by `w`, given dY (the `conv_layers` example's split).
#[doc(hidden)]
pub fn time_grads(
    x: Vec<f32>,
    xs: [usize; 4],
    w: Vec<f32>,
    ws: [usize; 4],
    s: usize,
    p: usize,
) -> (f64, f64) {
    let geo = Geometry::new(xs, ws, s, p);
    let dy = flex(vec![0.5f32; geo.n * geo.co * geo.positions()], [geo.n, geo.co, geo.ho, geo.wo]);
    let (x, w) = (flex(x, xs), flex(w, ws));
    let t = std::time::Instant::now();
    std::hint::black_box(input_grad(&w, &dy, &geo, None));
    let gi = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    std::hint::black_box(weight_grad(&x, &dy, &geo));
    (gi, t.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn random(shape: [usize; 4], seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..shape.iter().product::<usize>()).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-4 * scale, "{what}[{i}]: {x} vs burn's {y}");
        }
    }

    /// (x shape, out channels, kernel, stride, padding): the shapes a ResNet uses and odd ones.
    /// Rows 10-12 take the in-place paths (output rows of 16 and 32, 32 and 48 channels).
    const CASES: [([usize; 4], usize, usize, usize, usize); 12] = [
        ([2, 3, 8, 8], 4, 3, 1, 1),
        ([3, 4, 9, 7], 5, 3, 2, 1),
        ([2, 6, 8, 8], 3, 1, 2, 0),
        ([5, 2, 4, 4], 8, 1, 1, 0),
        ([2, 3, 15, 13], 4, 7, 2, 3),
        ([70, 3, 2, 2], 4, 3, 1, 1),
        ([70, 3, 4, 4], 4, 3, 1, 1),
        ([5, 2, 33, 33], 3, 3, 1, 1),
        ([1, 2, 5, 5], 3, 5, 1, 0),
        ([2, 32, 16, 16], 40, 3, 1, 1),
        ([1, 3, 32, 32], 4, 3, 1, 1),
        ([3, 48, 8, 8], 33, 3, 2, 1),
    ];

    /// Forward and both gradients equal burn's own convolution (different summation order).
    #[test]
    fn matches_burn_forward_and_gradients() {
        let device = Default::default();
        for (seed, (xs, co, k, s, p)) in CASES.into_iter().enumerate() {
            let ws = [co, xs[1], k, k];
            let x0 = TensorData::new(random(xs, seed as u64), xs);
            let w0 = TensorData::new(random(ws, 100 + seed as u64), ws);
            let run = |fast: bool| {
                let x = Tensor::<AdFlex, 4>::from_data(x0.clone(), &device).require_grad();
                let w = Tensor::<AdFlex, 4>::from_data(w0.clone(), &device).require_grad();
                let y = if fast {
                    conv2d(x.clone(), w.clone(), s, p)
                } else {
                    let o = ConvOptions::new([s, s], [p, p], [1, 1], 1);
                    burn::tensor::module::conv2d(x.clone(), w.clone(), None, o)
                };
                let dims = y.shape().dims::<4>();
                let r = Tensor::<AdFlex, 4>::from_data(TensorData::new(random(dims, 7), dims), &device);
                // x is used twice: its gradient from the convolution adds to the other one.
                let grads = ((y.clone() * r).sum() + (x.clone() * x.clone()).sum()).backward();
                let v = |t: Tensor<Flex, 4>| t.into_data().to_vec::<f32>().unwrap_or_default();
                (v(y.inner()), v(x.grad(&grads).expect("x grad")), v(w.grad(&grads).expect("w grad")))
            };
            let before = super::super::ACCUMULATED.with(|n| n.get());
            let (fast, slow) = (run(true), run(false));
            assert!(
                super::super::ACCUMULATED.with(|n| n.get()) > before,
                "the input gradient was not accumulated in place"
            );
            let case = format!("case {seed} {xs:?} co {co} k {k} s {s} p {p}");
            close(&fast.0, &slow.0, &format!("{case} y"));
            close(&fast.1, &slow.1, &format!("{case} dx"));
            close(&fast.2, &slow.2, &format!("{case} dw"));
        }
    }

    /// The inference backend takes the same path and gives the same bits as the autodiff one.
    #[test]
    fn inner_backend_forward_matches() {
        let device = Default::default();
        let (xs, ws) = ([3, 4, 10, 10], [6, 4, 3, 3]);
        let x = TensorData::new(random(xs, 1), xs);
        let w = TensorData::new(random(ws, 2), ws);
        let before = FAST_CALLS.load(std::sync::atomic::Ordering::Relaxed);
        let a = conv2d(
            Tensor::<Flex, 4>::from_data(x.clone(), &device),
            Tensor::from_data(w.clone(), &device),
            2,
            1,
        );
        assert!(FAST_CALLS.load(std::sync::atomic::Ordering::Relaxed) > before, "Flex took burn's path");
        let before = FAST_CALLS.load(std::sync::atomic::Ordering::Relaxed);
        let b = conv2d(Tensor::<AdFlex, 4>::from_data(x, &device), Tensor::from_data(w, &device), 2, 1);
        assert!(
            FAST_CALLS.load(std::sync::atomic::Ordering::Relaxed) > before,
            "Autodiff<Flex> took burn's path"
        );
        assert_eq!(a.into_data(), b.inner().into_data());
    }

    /// Bit-identical forward and gradients on 1 and 3 threads.
    #[test]
    fn same_bits_whatever_the_thread_count() {
        let (xs, ws) = ([40, 5, 6, 6], [7, 5, 3, 3]);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
            pool.install(|| {
                let device = Default::default();
                let x = Tensor::<AdFlex, 4>::from_data(TensorData::new(random(xs, 3), xs), &device)
                    .require_grad();
                let w = Tensor::<AdFlex, 4>::from_data(TensorData::new(random(ws, 4), ws), &device)
                    .require_grad();
                let y = conv2d(x.clone(), w.clone(), 1, 1);
                let grads = (y.clone() * y.clone()).sum().backward();
                let v = |t: Tensor<Flex, 4>| t.into_data().to_vec::<f32>().unwrap_or_default();
                (v(y.inner()), v(x.grad(&grads).expect("x grad")), v(w.grad(&grads).expect("w grad")))
            })
        };
        assert_eq!(run(1), run(3));
    }
}
