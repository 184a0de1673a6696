//! The operands of the convolution GEMMs ([`super::gemm`]), packed straight from NCHW tensors:
//! the im2col matrix of the input (never materialized), the output gradient as a matrix, and
//! the NCHW output as a tile sink.
//!
//! Columns are (image, output position) pairs, `image * positions + oh * wo + ow`; im2col rows
//! are (input channel, kernel row, kernel column) triples, `(c * kh + i) * kw + j`.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;

use super::gemm::{slot, zero_padding, Pack, Store};
use super::geometry::Geometry;

/// A run of consecutive columns inside one output row of one image (and one panel).
#[derive(Clone, Copy)]
struct Run {
    /// The run's first column, counted from the start of the packed range.
    at: usize,
    len: usize,
    image: usize,
    oh: usize,
    ow: usize,
}

/// Splits columns `c0..c0 + len` into runs that stay inside one output row (`row` true) or
/// one image (`row` false), and inside one panel of `width` columns.
fn runs(g: &Geometry, c0: usize, len: usize, width: usize, row: bool) -> Vec<Run> {
    let pos = g.positions();
    let mut out = Vec::with_capacity(len / g.wo.min(width).max(1) + 2);
    let mut at = 0;
    while at < len {
        let col = c0 + at;
        let (image, p) = (col / pos, col % pos);
        let (oh, ow) = (p / g.wo, p % g.wo);
        let left = if row { g.wo - ow } else { pos - p };
        let n = left.min(len - at).min(width - at % width);
        out.push(Run { at, len: n, image, oh, ow });
        at += n;
    }
    out
}

/// The im2col row `k` = (channel, kernel row, kernel column).
fn tap(g: &Geometry, k: usize) -> (usize, usize, usize) {
    let taps = g.kh * g.kw;
    (k / taps, k % taps / g.kw, k % g.kw)
}

/// `dst[t] = x[image, c, oh * s + i - p, (ow + t) * s + j - p]`, 0 outside the image.
#[inline]
fn gather_row(x: &[f32], g: &Geometry, run: &Run, c: usize, i: usize, j: usize, dst: &mut [f32]) {
    let ih = (run.oh * g.s + i).wrapping_sub(g.p);
    if ih >= g.h {
        dst.fill(0.0);
        return;
    }
    let line = &x[((run.image * g.ci + c) * g.h + ih) * g.w..][..g.w];
    // Valid outputs: 0 <= ow * s + j - p < w.
    let lo = g.p.saturating_sub(j).div_ceil(g.s);
    let hi = if g.w + g.p > j { (g.w + g.p - j - 1) / g.s + 1 } else { 0 };
    let end = run.ow + run.len;
    let (a, b) = (lo.clamp(run.ow, end), hi.clamp(run.ow, end));
    let (a, b) = (a - run.ow, b.max(a) - run.ow);
    dst[..a].fill(0.0);
    dst[b..].fill(0.0);
    if a < b {
        let iw0 = (run.ow + a) * g.s + j - g.p;
        if g.s == 1 {
            dst[a..b].copy_from_slice(&line[iw0..iw0 + (b - a)]);
        } else {
            for (d, v) in dst[a..b].iter_mut().zip(line[iw0..].iter().step_by(g.s)) {
                *d = *v;
            }
        }
    }
}

/// The im2col matrix of `x` as the B operand of the forward GEMM: lanes are columns, the
/// reduction runs over im2col rows.
pub(crate) struct Im2colCols<'a> {
    pub x: &'a [f32],
    pub g: Geometry,
}

impl Pack for Im2colCols<'_> {
    fn pack(&self, c0: usize, len: usize, width: usize, k0: usize, kc: usize, out: &mut [f32]) {
        let rs = runs(&self.g, c0, len, width, true);
        for kk in 0..kc {
            let (c, i, j) = tap(&self.g, k0 + kk);
            for r in &rs {
                let at = slot(r.at, kk, width, kc);
                gather_row(self.x, &self.g, r, c, i, j, &mut out[at..at + r.len]);
            }
        }
        zero_padding(len, width, kc, out);
    }
}

/// dY as the A operand of the weight-gradient GEMM (dW' = dY . im2col'(x)): lanes are output
/// channels, the reduction runs over columns.
pub(crate) struct DyRows<'a> {
    pub dy: &'a [f32],
    pub g: Geometry,
}

impl Pack for DyRows<'_> {
    fn pack(&self, m0: usize, len: usize, width: usize, c0: usize, kc: usize, out: &mut [f32]) {
        let pos = self.g.positions();
        let rs = runs(&self.g, c0, kc, usize::MAX, false);
        for lane in 0..len {
            let base = slot(lane, 0, width, kc);
            for r in &rs {
                let p = r.oh * self.g.wo + r.ow;
                let src = &self.dy[(r.image * self.g.co + m0 + lane) * pos + p..][..r.len];
                for (t, v) in src.iter().enumerate() {
                    out[base + (r.at + t) * width] = *v;
                }
            }
        }
        zero_padding(len, width, kc, out);
    }
}

/// An NCHW tensor zero-padded by `lo` rows/columns before and `hi` after, channels-last:
/// `[image][hp][wp][c]`; returns it with `hp` and `wp`.
pub(crate) fn channels_last(
    x: &[f32],
    [n, c, h, w]: [usize; 4],
    lo: usize,
    hi: usize,
) -> (Vec<f32>, usize, usize) {
    use rayon::prelude::*;
    let (hp, wp) = (h + lo + hi, w + lo + hi);
    let zero = MaybeUninit::new(0.0);
    // Only the border is zeroed: the interior is written once, by the transposition.
    let mut data = super::uninit(n * hp * wp * c);
    let plane = h * w;
    if !data.is_empty() {
        data.par_chunks_mut(hp * wp * c).enumerate().for_each(|(i, dst)| {
            dst[..lo * wp * c].fill(zero);
            dst[(lo + h) * wp * c..].fill(zero);
            for ih in 0..h {
                let line = &mut dst[(ih + lo) * wp * c..][..wp * c];
                line[..lo * c].fill(zero);
                line[(lo + w) * c..].fill(zero);
            }
            if plane == 0 {
                return;
            }
            let src = &x[i * c * plane..][..c * plane];
            // Blocks of 8 channels x 8 columns: reads and writes both in runs of 8.
            for ih in 0..h {
                let row = &mut dst[((ih + lo) * wp + lo) * c..][..w * c];
                for c0 in (0..c).step_by(8) {
                    for iw0 in (0..w).step_by(8) {
                        let wn = 8.min(w - iw0);
                        for ch in c0..(c0 + 8).min(c) {
                            let line = &src[ch * plane + ih * w + iw0..][..wn];
                            for (t, v) in line.iter().enumerate() {
                                row[(iw0 + t) * c + ch] = MaybeUninit::new(*v);
                            }
                        }
                    }
                }
            }
        });
    }
    // SAFETY: every image's rows before `lo` and from `lo + h`, and the columns before `lo`
    // and from `lo + w` of the rows between, are zeroed; the rest, every (row, column, channel)
    // of the image, is written by the transposition (the conv tests check, NaN-filled in debug).
    let data = unsafe { super::assume_init(data) };
    (data, hp, wp)
}

/// `x` zero-padded and channels-last, `[image][hp][wp][ci]`, the B operand of the
/// weight-gradient GEMM read in place. Its im2col rows are ordered (kernel row, kernel column,
/// channel) (`im2col'`), so 16 or 32 consecutive rows at one output position are contiguous:
/// row `t` of column (image, oh, ow) sits at `column_offset + tap_base(t)`.
pub(crate) struct PaddedCl {
    data: Vec<f32>,
    g: Geometry,
    hp: usize,
    wp: usize,
}

impl PaddedCl {
    pub(crate) fn new(x: &[f32], g: Geometry) -> Self {
        let (data, hp, wp) = channels_last(x, [g.n, g.ci, g.h, g.w], g.p, g.p);
        Self { data, g, hp, wp }
    }

    /// Offset of column `col` = (image, oh, ow): its window's top-left corner.
    fn column(&self, col: usize) -> usize {
        let pos = self.g.positions();
        let (image, p) = (col / pos, col % pos);
        let (oh, ow) = (p / self.g.wo, p % self.g.wo);
        ((image * self.hp + oh * self.g.s) * self.wp + ow * self.g.s) * self.g.ci
    }

    /// Offset of im2col' row `t` = (i, j, c) from a column's offset.
    fn tap(&self, t: usize) -> usize {
        let (ij, c) = (t / self.g.ci, t % self.g.ci);
        let (i, j) = (ij / self.g.kw, ij % self.g.kw);
        (i * self.wp + j) * self.g.ci + c
    }
}

impl super::gemm::Indirect for PaddedCl {
    fn data(&self) -> &[f32] {
        &self.data
    }
    fn offsets(&self, k0: usize, kc: usize, out: &mut [usize]) {
        for (kk, o) in out[..kc].iter_mut().enumerate() {
            *o = self.column(k0 + kk);
        }
    }
    fn bases(&self, t0: usize, half: usize) -> Option<(usize, usize)> {
        let ci = self.g.ci;
        let ok = |t: usize| t % ci + half <= ci;
        (ok(t0) && ok(t0 + half)).then(|| (self.tap(t0), self.tap(t0 + half)))
    }
}

/// As the A operand of the forward GEMM in columns-by-channels form (Y^T = im2col'(x) .
/// W'^T): rows are columns, the reduction runs over im2col' rows.
impl super::gemm::RowsInPlace for PaddedCl {
    fn data(&self) -> &[f32] {
        &self.data
    }
    fn row(&self, r: usize) -> usize {
        self.column(r)
    }
    fn offsets(&self, k0: usize, kc: usize, out: &mut [usize]) {
        for (kk, o) in out[..kc].iter_mut().enumerate() {
            *o = self.tap(k0 + kk);
        }
    }
}

impl Pack for PaddedCl {
    fn pack(&self, t0: usize, len: usize, width: usize, c0: usize, kc: usize, out: &mut [f32]) {
        let taps: Vec<usize> = (0..len).map(|l| self.tap(t0 + l)).collect();
        for kk in 0..kc {
            let col = self.column(c0 + kk);
            for (l, t) in taps.iter().enumerate() {
                out[slot(l, kk, width, kc)] = self.data[col + t];
            }
        }
        zero_padding(len, width, kc, out);
    }
}

/// An N x C x positions tensor filled tile by tile: rows are channels, columns are (image,
/// position) pairs.
pub(crate) struct Nchw<'a> {
    /// Possibly uninitialized where nothing was stored yet: written only through raw pointers,
    /// read (added to) only where initialized (`add`, or a tile's later reduction blocks).
    cells: &'a [UnsafeCell<MaybeUninit<f32>>],
    channels: usize,
    positions: usize,
    /// Add every result to what the tensor holds (an earlier gradient), never overwrite.
    add: bool,
}

// SAFETY: the convolution's tasks store disjoint tiles (disjoint channel or column ranges), so
// no element is written by two threads, and nothing reads the tensor until they are joined.
unsafe impl Sync for Nchw<'_> {}

impl<'a> Nchw<'a> {
    /// A sink that overwrites: `data` need not be initialized; every element the product
    /// covers is written before it is read.
    pub(crate) fn new(data: &'a mut [MaybeUninit<f32>], channels: usize, positions: usize) -> Self {
        let len = data.len();
        // SAFETY: UnsafeCell<MaybeUninit<f32>> has the layout of MaybeUninit<f32>; the
        // exclusive borrow lasts for 'a.
        let cells = unsafe {
            std::slice::from_raw_parts(data.as_mut_ptr().cast::<UnsafeCell<MaybeUninit<f32>>>(), len)
        };
        Self { cells, channels, positions, add: false }
    }

    /// A sink that adds every result to `data`'s values.
    pub(crate) fn adding(data: &'a mut [f32], channels: usize, positions: usize) -> Self {
        // SAFETY: the sink writes only floats.
        Self { add: true, ..Self::new(unsafe { super::as_uninit(data) }, channels, positions) }
    }

    /// The first of `n` cells from `start` (bounds checked), to write through.
    fn ptr(&self, start: usize, n: usize) -> *mut f32 {
        UnsafeCell::raw_get(self.cells[start..start + n].as_ptr()).cast::<f32>()
    }
}

impl Nchw<'_> {
    /// Writes `t`, a (columns `m0..m0 + mlen`) x (channels `n0..n0 + nlen`) block in row-major
    /// order, transposed into the tensor.
    pub(crate) fn put_transposed(&self, m0: usize, mlen: usize, n0: usize, nlen: usize, t: &[f32]) {
        let pos = self.positions;
        let mut at = 0;
        while at < mlen {
            let col = m0 + at;
            let (image, p) = (col / pos, col % pos);
            let n = (pos - p).min(mlen - at);
            for j in 0..nlen {
                let start = (image * self.channels + n0 + j) * pos + p;
                if self.add {
                    // SAFETY: these cells belong to this block alone (see `Sync`) and hold a
                    // gradient (`add`).
                    let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr(start, n), n) };
                    dst.iter_mut().enumerate().for_each(|(t_, d)| *d += t[(at + t_) * nlen + j]);
                } else {
                    let dst = self.ptr(start, n);
                    for t_ in 0..n {
                        // SAFETY: cell t_ < n of this block alone (see `Sync`); a write needs
                        // no initialized target.
                        unsafe { dst.add(t_).write(t[(at + t_) * nlen + j]) };
                    }
                }
            }
            at += n;
        }
    }
}

impl Nchw<'_> {
    /// [`Nchw::put_transposed`] for the positions of phase (`a`, `b`) of a stride-`s` grid:
    /// column `col` of `t` is (image, u, v) of a `hu` x `wv` grid, written at row `s u + a`,
    /// column `s v + b` of a tensor `w` columns wide.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn put_phase(
        &self,
        m0: usize,
        mlen: usize,
        nlen: usize,
        t: &[f32],
        [hu, wv]: [usize; 2],
        [s, a, b]: [usize; 3],
        w: usize,
    ) {
        let pos = self.positions;
        for at in 0..mlen {
            let col = m0 + at;
            let (image, uv) = (col / (hu * wv), col % (hu * wv));
            let (u, v) = (uv / wv, uv % wv);
            let p = (s * u + a) * w + s * v + b;
            for j in 0..nlen {
                let cell = &self.cells[(image * self.channels + j) * pos + p];
                let v = t[at * nlen + j];
                let cell = cell.get().cast::<f32>();
                // SAFETY: each phase position belongs to one task of one phase (see `Sync`);
                // it is read only when adding (initialized), else written.
                unsafe { cell.write(if self.add { *cell + v } else { v }) };
            }
        }
    }
}

impl Store for Nchw<'_> {
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
        let pos = self.positions;
        let mut at = 0;
        while at < nlen {
            let col = n0 + at;
            let (image, p) = (col / pos, col % pos);
            let n = (pos - p).min(nlen - at);
            for r in 0..mlen {
                let start = (image * self.channels + m0 + r) * pos + p;
                let src = &tile[r * nr + at..][..n];
                if overwrite && !self.add {
                    // SAFETY: n cells of this tile alone (see `Sync`); `src` is another buffer.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr(start, n), n) };
                } else {
                    // SAFETY: these cells belong to this tile alone, and they hold a gradient
                    // (`add`) or this tile's first reduction block (stored with `overwrite`).
                    let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr(start, n), n) };
                    crate::cpu::add_into(dst, src);
                }
            }
            at += n;
        }
    }
}

/// A stride-1 input zero-padded on every side by the convolution's padding, so that the
/// im2col matrix's panels can be read in place ([`super::gemm::gemm_indirect`]): for column
/// (image, oh, ow) and im2col row (c, i, j) the value sits at
/// `image * ci * hp * wp + c * hp * wp + (oh + i) * wp + (ow + j)`.
pub(crate) struct Padded {
    data: Vec<f32>,
    g: Geometry,
    hp: usize,
    wp: usize,
}

impl Padded {
    /// The padded copy of `x` (stride 1 only).
    pub(crate) fn new(x: &[f32], g: Geometry) -> Self {
        use rayon::prelude::*;
        debug_assert_eq!(g.s, 1);
        let (hp, wp) = (g.h + 2 * g.p, g.w + 2 * g.p);
        let zero = MaybeUninit::new(0.0);
        // Only the border is zeroed: the interior is copied once.
        let mut data = super::uninit(g.n * g.ci * hp * wp);
        if !data.is_empty() {
            data.par_chunks_mut(hp * wp).zip(x.par_chunks(g.h * g.w)).for_each(|(dst, src)| {
                dst[..g.p * wp].fill(zero);
                dst[(g.p + g.h) * wp..].fill(zero);
                for (r, line) in src.chunks(g.w).enumerate() {
                    let row = &mut dst[(r + g.p) * wp..][..wp];
                    row[..g.p].fill(zero);
                    row[g.p + g.w..].fill(zero);
                    for (d, v) in row[g.p..g.p + g.w].iter_mut().zip(line) {
                        *d = MaybeUninit::new(*v);
                    }
                }
            });
        }
        // SAFETY: each plane's rows before `p` and from `p + h` are zeroed, and each row between
        // has its `p` columns either side zeroed and its `w` columns copied (`x` has n * ci
        // planes of h rows, so every plane is reached; the conv tests check, NaN-filled in debug).
        let data = unsafe { super::assume_init(data) };
        Self { data, g, hp, wp }
    }
}

impl super::gemm::Indirect for Padded {
    fn data(&self) -> &[f32] {
        &self.data
    }

    fn offsets(&self, k0: usize, kc: usize, out: &mut [usize]) {
        for (kk, o) in out[..kc].iter_mut().enumerate() {
            let (c, i, j) = tap(&self.g, k0 + kk);
            *o = c * self.hp * self.wp + i * self.wp + j;
        }
    }

    fn bases(&self, n0: usize, half: usize) -> Option<(usize, usize)> {
        let pos = self.g.positions();
        let base = |col: usize| {
            let (image, p) = (col / pos, col % pos);
            let (oh, ow) = (p / self.g.wo, p % self.g.wo);
            (ow + half <= self.g.wo).then(|| image * self.g.ci * self.hp * self.wp + oh * self.wp + ow)
        };
        Some((base(n0)?, base(n0 + half)?))
    }
}

/// dY padded and channels-last as the A operand of one phase of the strided input gradient:
/// rows are the phase's positions (image, u, v), the reduction runs over (tap, channel) with
/// tap `t` reading dY at (u + di[t], v + dj[t]).
pub(crate) struct PhaseDy<'a> {
    pub data: &'a [f32],
    pub co: usize,
    pub hp: usize,
    pub wp: usize,
    /// The phase grid, `hu` x `wv` positions per image.
    pub grid: [usize; 2],
    /// Per tap, the row and column shift plus the padding before (never negative).
    pub shifts: Vec<(usize, usize)>,
}

impl super::gemm::RowsInPlace for PhaseDy<'_> {
    fn data(&self) -> &[f32] {
        self.data
    }
    fn row(&self, r: usize) -> usize {
        let [hu, wv] = self.grid;
        let (image, uv) = (r / (hu * wv), r % (hu * wv));
        ((image * self.hp + uv / wv) * self.wp + uv % wv) * self.co
    }
    fn offsets(&self, k0: usize, kc: usize, out: &mut [usize]) {
        for (kk, o) in out[..kc].iter_mut().enumerate() {
            let (t, c) = ((k0 + kk) / self.co, (k0 + kk) % self.co);
            let (di, dj) = self.shifts[t];
            *o = (di * self.wp + dj) * self.co + c;
        }
    }
}
