//! The convolution's gradients on the CPU ([`super::gemm`] products with operands packed from
//! the tensors): the weight gradient dW^T = im2col(x) . dY^T and, for strides other than 1,
//! the input gradient col(dX) = W^T . dY followed by col2im over groups of images. (Stride 1
//! takes the forward convolution of dY by the flipped kernel, see [`super::conv`].)
//!
//! Deterministic whatever the thread count: work is split into image groups and row blocks
//! fixed by the shapes, and partial weight gradients are summed in group order.

use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::gemm::dense::{Matrix, Out as Dense};
use super::gemm::{self, Packed, Store};
use super::geometry::Geometry;
use super::im2col::{channels_last, DyRows, Nchw, PaddedCl, PhaseDy};
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
    let kern = gemm::kernel_for_rows(g.co);
    let cols = block_rows(k, partials).div_ceil(kern.nr) * kern.nr;
    let blocks = k.div_ceil(cols);
    let a = DyRows { dy: dyd, g };
    let xcl = PaddedCl::new(xd, g);
    let sums: Vec<Vec<f32>> = (0..partials)
        .into_par_iter()
        .map(|part| {
            let first = (part * per * group).min(g.n) * pos;
            let last = ((part + 1) * per * group).min(g.n) * pos;
            let mut dw = super::zeros(g.co * k);
            let out = Dense::new(&mut dw, k);
            (0..blocks).into_par_iter().for_each(|b| {
                let c = b * cols..((b + 1) * cols).min(k);
                gemm::gemm_indirect(kern, 0..g.co, c, first..last, gemm::A::Packer(&a), &xcl, &xcl, &out);
            });
            dw
        })
        .collect();
    // Partials summed in order, and (i, j, c) order back to (c, i, j), a row of dW per task.
    let taps = g.kh * g.kw;
    let mut out = super::zeros(g.co * k);
    out.par_chunks_mut(k.max(1)).enumerate().for_each(|(o, row)| {
        for t in 0..taps {
            for c in 0..g.ci {
                let at = o * k + t * g.ci + c;
                let mut v = sums[0][at];
                for part in &sums[1..] {
                    v += part[at];
                }
                row[c * taps + t] = v;
            }
        }
    });
    flex(out, [g.co, g.ci, g.kh, g.kw])
}

/// Input gradient for strides above 1, by phases (the sub-pixel form of a transposed
/// convolution): the input positions (s u + a, s v + b) of phase (a, b) receive only the taps
/// i = a + p (mod s), j = b + p (mod s), each from dY at (u + (a + p - i) / s, v + ...), so each
/// phase is one product dX_ab^T = dY'_ab . W_ab read in place from a padded channels-last copy
/// of dY: no column buffer and no scatter-add. Positions of a phase with no taps keep `base` (or 0).
pub(crate) fn input_grad_strided(w: &[f32], dy: &[f32], g: Geometry, base: Option<Vec<f32>>) -> FlexTensor {
    let adding = base.is_some();
    let mut dx = base.unwrap_or_else(|| super::zeros(g.n * g.ci * g.h * g.w));
    if dx.is_empty() {
        return flex(dx, [g.n, g.ci, g.h, g.w]);
    }
    let kern = gemm::kernel();
    let (s, p) = (g.s as isize, g.p as isize);
    // Per phase: taps as (i, j, di, dj) with dY row u + di for input row s u + a.
    let shift = |a: usize, i: usize| -> Option<isize> {
        let d = a as isize + p - i as isize;
        (d.rem_euclid(s) == 0).then_some(d.div_euclid(s))
    };
    let mut phases = Vec::new();
    for a in 0..g.s.min(g.h) {
        for b in 0..g.s.min(g.w) {
            let taps: Vec<(usize, usize, isize, isize)> = (0..g.kh)
                .flat_map(|i| (0..g.kw).map(move |j| (i, j)))
                .filter_map(|(i, j)| Some((i, j, shift(a, i)?, shift(b, j)?)))
                .collect();
            if !taps.is_empty() {
                phases.push((a, b, taps));
            }
        }
    }
    // One padded copy of dY serves every phase: enough rows before and after for every shift.
    let lo = phases.iter().flat_map(|(_, _, t)| t.iter().flat_map(|x| [-x.2, -x.3])).max().unwrap_or(0).max(0)
        as usize;
    let (hu_max, wv_max) = (g.h.div_ceil(g.s), g.w.div_ceil(g.s));
    let reach =
        phases.iter().flat_map(|(_, _, t)| t.iter().flat_map(|x| [x.2, x.3])).max().unwrap_or(0).max(0)
            as usize;
    let hi = (hu_max.max(wv_max) + reach).saturating_sub(g.ho.min(g.wo));
    let (data, hp, wp) = channels_last(dy, [g.n, g.co, g.ho, g.wo], lo, hi);
    let out = if adding {
        Nchw::adding(&mut dx, g.ci, g.h * g.w)
    } else {
        // SAFETY: the sink writes only floats.
        Nchw::new(unsafe { super::as_uninit(&mut dx) }, g.ci, g.h * g.w)
    };
    let mut work = Vec::new();
    for (a, b, taps) in &phases {
        let (hu, wv) = ((g.h - a).div_ceil(g.s), (g.w - b).div_ceil(g.s));
        let shifts =
            taps.iter().map(|t| ((t.2 + lo as isize) as usize, (t.3 + lo as isize) as usize)).collect();
        let src = PhaseDy { data: &data, co: g.co, hp, wp, grid: [hu, wv], shifts };
        // W_ab [(tap, co) x ci]: the phase's taps of W, transposed.
        let k = taps.len() * g.co;
        let mut wab = vec![0f32; k * g.ci];
        for (t, &(i, j, _, _)) in taps.iter().enumerate() {
            for o in 0..g.co {
                for c in 0..g.ci {
                    wab[(t * g.co + o) * g.ci + c] = w[((o * g.ci + c) * g.kh + i) * g.kw + j];
                }
            }
        }
        let packed = Packed::new(kern.nr, &Matrix { data: &wab, lane_stride: 1, k_stride: g.ci }, g.ci, k);
        work.push((*a, *b, hu, wv, k, src, packed));
    }
    let tasks: Vec<(usize, usize)> = work
        .iter()
        .enumerate()
        .flat_map(|(ph, wk)| (0..(g.n * wk.2 * wk.3).div_ceil(PHASE_TASK_ROWS)).map(move |t| (ph, t)))
        .collect();
    tasks.into_par_iter().for_each(|(ph, t)| {
        let (a, b, hu, wv, k, src, packed) = &work[ph];
        let rows = t * PHASE_TASK_ROWS..((t + 1) * PHASE_TASK_ROWS).min(g.n * hu * wv);
        let m = rows.len();
        with_scratch([m * g.ci], |[tmp]| {
            let sink = RowsFrom { inner: Dense::new(tmp, g.ci), first: rows.start };
            gemm::gemm_arows(kern, rows.clone(), 0..g.ci, *k, src, packed, &sink);
            out.put_phase(rows.start, m, g.ci, tmp, [*hu, *wv], [g.s, *a, *b], g.w);
        });
    });
    flex(dx, [g.n, g.ci, g.h, g.w])
}

/// Phase positions per task of [`input_grad_strided`].
const PHASE_TASK_ROWS: usize = 256;

/// A sink whose row 0 is row `first` of the product.
struct RowsFrom<S> {
    inner: S,
    first: usize,
}

impl<S: Store> Store for RowsFrom<S> {
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
        self.inner.store(m0 - self.first, mlen, n0, nlen, tile, nr, overwrite);
    }
}
