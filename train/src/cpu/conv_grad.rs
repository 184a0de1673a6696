//! The convolution's gradients on the CPU ([`super::gemm`] products with operands packed from
//! the tensors): the weight gradient dW^T = im2col(x) . dY^T and, for strides other than 1,
//! the input gradient col(dX) = W^T . dY followed by col2im over groups of images. (Stride 1
//! takes the forward convolution of dY by the flipped kernel, see [`super::conv`].)
//!
//! Deterministic whatever the thread count: work is split into image groups and row blocks
//! fixed by the shapes, and partial weight gradients are summed in group order.

use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::conv::Geometry;
use super::gemm::dense::{Matrix, Out as Dense};
use super::gemm::{self, PackedA, Store};
use super::im2col::{DyCols, DyInPlace, DyRows, PaddedCl};
use super::{flex, with_scratch};

/// Partial weight gradients, at most (summed in order at the end).
const MAX_PARTIALS: usize = 16;
/// Parallel tasks a GEMM should have, at least, before its rows are split.
const MIN_TASKS: usize = 8;
/// Rows per GEMM block, at least, when rows are split.
const MIN_BLOCK_ROWS: usize = 32;

/// Rows per block when `rows` rows must make up for `tasks` tasks: all of them, or blocks that
/// bring the task count to [`MIN_TASKS`] (a function of the shapes alone).
fn block_rows(rows: usize, tasks: usize) -> usize {
    if tasks >= MIN_TASKS {
        return rows.max(1);
    }
    let blocks = MIN_TASKS.div_ceil(tasks.max(1)).min(rows.div_ceil(MIN_BLOCK_ROWS)).max(1);
    rows.div_ceil(blocks).max(1)
}

/// Weight gradient: dW' = dY . im2col'(x)^T with im2col' rows ordered (kernel row, kernel
/// column, channel) so a channels-last copy of x can be read in place ([`PaddedCl`]), reduced
/// over columns: up to [`MAX_PARTIALS`] partial sums over consecutive image groups (summed in
/// order at the end), each split into column blocks when there are few; every split is fixed
/// by the shapes.
pub(crate) fn weight_grad(x: &FlexTensor, dy: &FlexTensor, geo: &Geometry) -> FlexTensor {
    let (x, dy) = (x.to_contiguous(), dy.to_contiguous());
    let (xd, dyd): (&[f32], &[f32]) = (x.storage(), dy.storage());
    let g = *geo;
    let (k, pos, group) = (g.k(), g.positions(), g.group());
    let groups = g.groups();
    let partials = groups.clamp(1, MAX_PARTIALS);
    let per = groups.div_ceil(partials);
    let kern = gemm::kernel();
    let cols = block_rows(k, partials).div_ceil(kern.nr) * kern.nr;
    let blocks = k.div_ceil(cols);
    let a = DyRows { dy: dyd, g };
    let xcl = PaddedCl::new(xd, g);
    let sums: Vec<Vec<f32>> = (0..partials)
        .into_par_iter()
        .map(|part| {
            let first = (part * per * group).min(g.n) * pos;
            let last = ((part + 1) * per * group).min(g.n) * pos;
            let mut dw = vec![0f32; g.co * k];
            let out = Dense::new(&mut dw, k);
            (0..blocks).into_par_iter().for_each(|b| {
                let c = b * cols..((b + 1) * cols).min(k);
                gemm::gemm_indirect(kern, 0..g.co, c, first..last, gemm::A::Packer(&a), &xcl, &xcl, &out);
            });
            dw
        })
        .collect();
    let mut iter = sums.into_iter();
    let mut dwp = iter.next().unwrap_or_else(|| vec![0f32; g.co * k]);
    for part in iter {
        dwp.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
    }
    // (i, j, c) order back to (c, i, j).
    let taps = g.kh * g.kw;
    let mut out = vec![0f32; dwp.len()];
    for o in 0..g.co {
        for t in 0..taps {
            for c in 0..g.ci {
                out[(o * g.ci + c) * taps + t] = dwp[o * k + t * g.ci + c];
            }
        }
    }
    flex(out, [g.co, g.ci, g.kh, g.kw])
}

/// Input gradient for any stride: col(dX_g) = W^T . dY_g per image group (row blocks in
/// parallel when groups are few), scattered back by col2im.
pub(crate) fn input_grad_strided(w: &[f32], dy: &[f32], g: Geometry) -> FlexTensor {
    let (k, pos, group) = (g.k(), g.positions(), g.group());
    let image = g.ci * g.h * g.w;
    let mut dx = vec![0f32; g.n * image];
    if dx.is_empty() {
        return flex(dx, [g.n, g.ci, g.h, g.w]);
    }
    let kern = gemm::kernel();
    let rows = block_rows(k, g.groups()).div_ceil(kern.mr) * kern.mr;
    let a = PackedA::new(kern, &Matrix { data: w, lane_stride: 1, k_stride: k }, k, g.co);
    let (b, fallback) = (DyInPlace { dy, g }, DyCols { dy, g });
    dx.par_chunks_mut(group * image).enumerate().for_each(|(gi, out)| {
        let n0 = gi * group;
        let images = out.len() / image;
        let cols = images * pos;
        with_scratch([k * cols], |[col]| {
            // col[k, cols] = W^T[k, co] . dY_g[co, cols], row blocks in parallel.
            let sink = ColumnsFrom { inner: Dense::new(col, cols), first: n0 * pos };
            (0..k.div_ceil(rows)).into_par_iter().for_each(|blk| {
                let r = blk * rows..((blk + 1) * rows).min(k);
                let c = n0 * pos..n0 * pos + cols;
                gemm::gemm_indirect(kern, r, c, 0..g.co, gemm::A::Prepacked(&a), &b, &fallback, &sink);
            });
            let col = &*col;
            out.par_chunks_mut(image).enumerate().for_each(|(i, dxi)| col2im(col, &g, images, i, dxi));
        });
    });
    flex(dx, [g.n, g.ci, g.h, g.w])
}

/// A sink whose column 0 is column `first` of the product.
struct ColumnsFrom<S> {
    inner: S,
    first: usize,
}

impl<S: Store> Store for ColumnsFrom<S> {
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
        self.inner.store(m0, mlen, n0 - self.first, nlen, tile, nr, overwrite);
    }
}

/// The valid output columns `lo..hi` for kernel column `j` and the input column of `lo`.
fn valid_columns(g: &Geometry, j: usize) -> (usize, usize) {
    // iw = ow * s + j - p must lie in 0..w.
    let lo = g.p.saturating_sub(j).div_ceil(g.s);
    let hi = if g.w + g.p > j { ((g.w + g.p - j - 1) / g.s + 1).min(g.wo) } else { 0 };
    (lo, hi.max(lo))
}

/// The adjoint of [`im2col`] for image `img` of a group of `images`: adds each column entry
/// back into its input position of `dx` (that image's gradient).
fn col2im(col: &[f32], g: &Geometry, images: usize, img: usize, dx: &mut [f32]) {
    let (pos, plane) = (g.positions(), g.h * g.w);
    let cols = images * pos;
    {
        for c in 0..g.ci {
            let dst = &mut dx[c * plane..][..plane];
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
