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
//! Dispatch: the model is generic over `Backend`; stable Rust has no specialization, so
//! [`conv2d`] checks at run time (by type, through `Any`) whether the backend is `Flex` or
//! `Autodiff<Flex>` and takes this path for f32 tensors; any other backend (CUDA) or dtype
//! goes to burn's `conv2d`.

use std::any::Any;

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{ConvOptions, FloatTensor};
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::NodeId;
use burn_flex::{FlexTensor, Layout};
use burn_std::Bytes;
use rayon::prelude::*;

type AdFlex = Autodiff<Flex>;

/// Output columns (images x output positions) per GEMM: enough for the GEMM kernels to run
/// at speed on the small late layers (4 x 4 outputs), small enough for the im2col buffer to
/// stay in cache on the early ones.
const GROUP_COLUMNS: usize = 1024;
/// Partial weight gradients, at most (summed in order at the end).
const MAX_PARTIALS: usize = 16;

/// Calls that took this module's path (tests check that the dispatch finds the CPU backend).
#[cfg(test)]
static FAST_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `conv2d(x, weight)` without bias, stride `s`, padding `p`; the fast path on the CPU backend.
pub fn conv2d<B: Backend>(x: Tensor<B, 4>, weight: Tensor<B, 4>, s: usize, p: usize) -> Tensor<B, 4> {
    let options = ConvOptions::new([s, s], [p, p], [1, 1], 1);
    let fast = x.dtype() == DType::F32 && weight.dtype() == DType::F32;
    let mut slot = Some((x, weight));
    if fast {
        if let Some((x, w)) = cast::<_, (Tensor<AdFlex, 4>, Tensor<AdFlex, 4>)>(&mut slot) {
            #[cfg(test)]
            FAST_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let y = autodiff_forward(x.into_primitive().tensor(), w.into_primitive().tensor(), s, p);
            return back::<AdFlex, B>(Tensor::from_primitive(TensorPrimitive::Float(y)));
        }
        if let Some((x, w)) = cast::<_, (Tensor<Flex, 4>, Tensor<Flex, 4>)>(&mut slot) {
            #[cfg(test)]
            FAST_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let geo = Geometry::new(x.shape().dims(), w.shape().dims(), s, p);
            let y = forward(&x.into_primitive().tensor(), &w.into_primitive().tensor(), &geo);
            return back::<Flex, B>(Tensor::from_primitive(TensorPrimitive::Float(y)));
        }
    }
    match slot {
        Some((x, w)) => burn::tensor::module::conv2d(x, w, None, options),
        None => unreachable!("a tensor pair is taken only by a cast that returns"),
    }
}

/// Moves a value out of `slot` as type `U` if `T` is `U`.
fn cast<T: 'static, U: 'static>(slot: &mut Option<T>) -> Option<U> {
    (slot as &mut dyn Any).downcast_mut::<Option<U>>().and_then(Option::take)
}

/// The result back as the caller's tensor type (`A` is `B`: checked by the cast that led here).
fn back<A: Backend, B: Backend>(y: Tensor<A, 4>) -> Tensor<B, 4> {
    match cast::<_, Tensor<B, 4>>(&mut Some(y)) {
        Some(y) => y,
        None => unreachable!("the backend was identified by the cast into it"),
    }
}

/// The shapes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    ci: usize,
    h: usize,
    w: usize,
    co: usize,
    kh: usize,
    kw: usize,
    s: usize,
    p: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn new(x: [usize; 4], w: [usize; 4], s: usize, p: usize) -> Self {
        let [n, ci, h, wd] = x;
        let [co, _, kh, kw] = w;
        let ho = (h + 2 * p).saturating_sub(kh) / s + 1;
        let wo = (wd + 2 * p).saturating_sub(kw) / s + 1;
        Self { n, ci, h, w: wd, co, kh, kw, s, p, ho, wo }
    }
    /// Rows of the im2col matrix (input channels x kernel positions).
    fn k(&self) -> usize {
        self.ci * self.kh * self.kw
    }
    /// Output positions per image.
    fn positions(&self) -> usize {
        self.ho * self.wo
    }
    /// Images per GEMM.
    fn group(&self) -> usize {
        GROUP_COLUMNS.div_ceil(self.positions().max(1)).clamp(1, self.n.max(1))
    }
}

fn flex(data: Vec<f32>, dims: [usize; 4]) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(data), Layout::contiguous(Shape::from(dims.to_vec())), DType::F32)
}

/// Forward: y[n] = W . col(x[n]).
fn forward(x: &FlexTensor, w: &FlexTensor, geo: &Geometry) -> FlexTensor {
    let (x, w) = (x.to_contiguous(), w.to_contiguous());
    let (xd, wd): (&[f32], &[f32]) = (x.storage(), w.storage());
    let g = *geo;
    let (k, pos, group) = (g.k(), g.positions(), g.group());
    let mut y = vec![0f32; g.n * g.co * pos];
    if y.is_empty() {
        return flex(y, [g.n, g.co, g.ho, g.wo]);
    }
    y.par_chunks_mut(group * g.co * pos).enumerate().for_each(|(gi, out)| {
        let n0 = gi * group;
        let images = out.len() / (g.co * pos);
        let cols = images * pos;
        let mut col = vec![0f32; k * cols];
        im2col(xd, &g, n0, images, &mut col);
        if images == 1 {
            matmul(g.co, cols, k, out, cols, false, (wd, k, 1), (&col, cols, 1));
        } else {
            let mut tmp = vec![0f32; g.co * cols];
            matmul(g.co, cols, k, &mut tmp, cols, false, (wd, k, 1), (&col, cols, 1));
            // tmp is [co, images x positions]; y is [images, co, positions].
            for (i, img) in out.chunks_mut(g.co * pos).enumerate() {
                for (c, row) in img.chunks_mut(pos).enumerate() {
                    row.copy_from_slice(&tmp[c * cols + i * pos..c * cols + (i + 1) * pos]);
                }
            }
        }
    });
    flex(y, [g.n, g.co, g.ho, g.wo])
}

/// The output gradient of images `n0..n0 + images` as one [co, images x positions] matrix.
fn gather_dy<'a>(dy: &'a [f32], g: &Geometry, n0: usize, images: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
    let pos = g.positions();
    let start = n0 * g.co * pos;
    if images == 1 {
        return &dy[start..start + g.co * pos];
    }
    let cols = images * pos;
    buf.clear();
    buf.resize(g.co * cols, 0.0);
    for i in 0..images {
        for c in 0..g.co {
            let src = start + (i * g.co + c) * pos;
            buf[c * cols + i * pos..c * cols + (i + 1) * pos].copy_from_slice(&dy[src..src + pos]);
        }
    }
    buf
}

/// Weight gradient: dW = sum over image groups of dY_g . col(x_g)^T, summed in group order.
fn weight_grad(x: &FlexTensor, dy: &FlexTensor, geo: &Geometry) -> FlexTensor {
    let (x, dy) = (x.to_contiguous(), dy.to_contiguous());
    let (xd, dyd): (&[f32], &[f32]) = (x.storage(), dy.storage());
    let g = *geo;
    let (k, pos, group) = (g.k(), g.positions(), g.group());
    let groups = g.n.div_ceil(group);
    let partials = groups.clamp(1, MAX_PARTIALS);
    let per = groups.div_ceil(partials);
    let sums: Vec<Vec<f32>> = (0..partials)
        .into_par_iter()
        .map(|part| {
            let mut dw = vec![0f32; g.co * k];
            let (mut col, mut buf) = (Vec::new(), Vec::new());
            for gi in part * per..((part + 1) * per).min(groups) {
                let n0 = gi * group;
                let images = group.min(g.n - n0);
                let cols = images * pos;
                col.clear();
                col.resize(k * cols, 0.0);
                im2col(xd, &g, n0, images, &mut col);
                let dyg = gather_dy(dyd, &g, n0, images, &mut buf);
                // dW^T[k, co] += col[k, cols] . dY_g[co, cols]^T
                matmul(k, g.co, cols, &mut dw, g.co, true, (&col, cols, 1), (dyg, 1, cols));
            }
            dw
        })
        .collect();
    let mut iter = sums.into_iter();
    let mut dw = iter.next().unwrap_or_else(|| vec![0f32; g.co * k]);
    for part in iter {
        dw.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
    }
    let mut out = vec![0f32; dw.len()];
    for r in 0..k {
        for c in 0..g.co {
            out[c * k + r] = dw[r * g.co + c];
        }
    }
    flex(out, [g.co, g.ci, g.kh, g.kw])
}

/// Input gradient. Stride 1: the forward convolution of dY by the flipped, transposed kernel
/// (padding k - 1 - p), which runs at the forward pass's speed. Other strides:
/// col(dX_g) = W^T . dY_g, scattered back by col2im.
fn input_grad(w: &FlexTensor, dy: &FlexTensor, geo: &Geometry) -> FlexTensor {
    let (w, dy) = (w.to_contiguous(), dy.to_contiguous());
    let (wd, dyd): (&[f32], &[f32]) = (w.storage(), dy.storage());
    let g = *geo;
    if g.s == 1 && g.kh == g.kw && g.p < g.kh && g.h == g.ho && g.w == g.wo {
        let taps = g.kh * g.kw;
        let mut flipped = vec![0f32; wd.len()];
        for o in 0..g.co {
            for c in 0..g.ci {
                for t in 0..taps {
                    flipped[(c * g.co + o) * taps + taps - 1 - t] = wd[(o * g.ci + c) * taps + t];
                }
            }
        }
        let flipped = flex(flipped, [g.ci, g.co, g.kh, g.kw]);
        let back = Geometry::new([g.n, g.co, g.ho, g.wo], [g.ci, g.co, g.kh, g.kw], 1, g.kh - 1 - g.p);
        return forward(&dy, &flipped, &back);
    }
    let (k, pos, group) = (g.k(), g.positions(), g.group());
    let image = g.ci * g.h * g.w;
    let mut dx = vec![0f32; g.n * image];
    if dx.is_empty() {
        return flex(dx, [g.n, g.ci, g.h, g.w]);
    }
    dx.par_chunks_mut(group * image).enumerate().for_each(|(gi, out)| {
        let n0 = gi * group;
        let images = out.len() / image;
        let cols = images * pos;
        let mut buf = Vec::new();
        let dyg = gather_dy(dyd, &g, n0, images, &mut buf);
        let mut col = vec![0f32; k * cols];
        // col[k, cols] = W^T[k, co] . dY_g[co, cols]
        matmul(k, cols, g.co, &mut col, cols, false, (wd, 1, k), (dyg, cols, 1));
        col2im(&col, &g, images, out);
    });
    flex(dx, [g.n, g.ci, g.h, g.w])
}

/// The valid output columns `lo..hi` for kernel column `j` and the input column of `lo`.
fn valid_columns(g: &Geometry, j: usize) -> (usize, usize) {
    // iw = ow * s + j - p must lie in 0..w.
    let lo = g.p.saturating_sub(j).div_ceil(g.s);
    let hi = if g.w + g.p > j { ((g.w + g.p - j - 1) / g.s + 1).min(g.wo) } else { 0 };
    (lo, hi.max(lo))
}

/// col[(c, i, j), (image, oh, ow)] = x[n0 + image, c, oh * s + i - p, ow * s + j - p] (0 outside).
fn im2col(x: &[f32], g: &Geometry, n0: usize, images: usize, col: &mut [f32]) {
    let (pos, plane) = (g.positions(), g.h * g.w);
    let cols = images * pos;
    for c in 0..g.ci {
        for i in 0..g.kh {
            for j in 0..g.kw {
                let r = (c * g.kh + i) * g.kw + j;
                let row = &mut col[r * cols..(r + 1) * cols];
                let (lo, hi) = valid_columns(g, j);
                for img in 0..images {
                    let src = &x[((n0 + img) * g.ci + c) * plane..][..plane];
                    for oh in 0..g.ho {
                        let dst = &mut row[img * pos + oh * g.wo..][..g.wo];
                        let ih = (oh * g.s + i).wrapping_sub(g.p);
                        if ih >= g.h {
                            dst.fill(0.0);
                            continue;
                        }
                        let line = &src[ih * g.w..(ih + 1) * g.w];
                        dst[..lo].fill(0.0);
                        dst[hi..].fill(0.0);
                        let iw0 = lo * g.s + j - g.p;
                        if g.s == 1 {
                            dst[lo..hi].copy_from_slice(&line[iw0..iw0 + (hi - lo)]);
                        } else {
                            for (d, v) in dst[lo..hi].iter_mut().zip(line[iw0..].iter().step_by(g.s)) {
                                *d = *v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds each column entry back into its input position.
fn col2im(col: &[f32], g: &Geometry, images: usize, dx: &mut [f32]) {
    let (pos, plane) = (g.positions(), g.h * g.w);
    let cols = images * pos;
    for img in 0..images {
        for c in 0..g.ci {
            let dst = &mut dx[(img * g.ci + c) * plane..][..plane];
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let r = (c * g.kh + i) * g.kw + j;
                    let row = &col[r * cols + img * pos..][..pos];
                    let (lo, hi) = valid_columns(g, j);
                    for oh in 0..g.ho {
                        let ih = (oh * g.s + i).wrapping_sub(g.p);
                        if ih >= g.h {
                            continue;
                        }
                        let src = &row[oh * g.wo..][..g.wo];
                        let line = &mut dst[ih * g.w..(ih + 1) * g.w];
                        let iw0 = lo * g.s + j - g.p;
                        if g.s == 1 {
                            line[iw0..iw0 + (hi - lo)]
                                .iter_mut()
                                .zip(&src[lo..hi])
                                .for_each(|(d, v)| *d += v);
                        } else {
                            for (d, v) in line[iw0..].iter_mut().step_by(g.s).zip(&src[lo..hi]) {
                                *d += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// dst[m, n] (row stride `dst_rs`) = (dst if `acc`) + lhs[m, k] . rhs[k, n], one thread.
/// Operands are (data, row stride, column stride).
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, dst_rs, 1) < dst.len(), "conv GEMM: destination out of bounds");
    if k == 0 {
        if !acc {
            dst.iter_mut().for_each(|v| *v = 0.0);
        }
        return;
    }
    assert!(last(m, k, lhs.1, lhs.2) < lhs.0.len(), "conv GEMM: left operand out of bounds");
    assert!(last(k, n, rhs.1, rhs.2) < rhs.0.len(), "conv GEMM: right operand out of bounds");
    // SAFETY: the asserts above keep every element gemm reads or writes inside the slices, and
    // `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
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
            grads.register::<Flex>(node.id, input_grad(&w, &dy, &geo));
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
            let y = forward(&x.primitive, &w.primitive, &geo);
            prep.finish((x_state, w_state, geo), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(&x.primitive, &w.primitive, &geo)),
    }
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
    const CASES: [([usize; 4], usize, usize, usize, usize); 9] = [
        ([2, 3, 8, 8], 4, 3, 1, 1),
        ([3, 4, 9, 7], 5, 3, 2, 1),
        ([2, 6, 8, 8], 3, 1, 2, 0),
        ([5, 2, 4, 4], 8, 1, 1, 0),
        ([2, 3, 15, 13], 4, 7, 2, 3),
        ([70, 3, 2, 2], 4, 3, 1, 1),
        ([70, 3, 4, 4], 4, 3, 1, 1),
        ([5, 2, 33, 33], 3, 3, 1, 1),
        ([1, 2, 5, 5], 3, 5, 1, 0),
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
                let grads = (y.clone() * r).sum().backward();
                let v = |t: Tensor<Flex, 4>| t.into_data().to_vec::<f32>().unwrap_or_default();
                (v(y.inner()), v(x.grad(&grads).expect("x grad")), v(w.grad(&grads).expect("w grad")))
            };
            let (fast, slow) = (run(true), run(false));
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
