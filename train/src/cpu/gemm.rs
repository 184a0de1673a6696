//! A small GEMM driver whose operands are packed by the caller's code, so a convolution can
//! pack its im2col matrix straight from the image (implicit im2col) and store results straight
//! into NCHW tensors: one pass over the data where im2col + a library GEMM took three.
//!
//! C[m, n] (+)= sum over k of A[m, k] B[k, n], computed tile by tile (`mr` x `nr`) by a
//! microkernel picked at run time: AVX-512 (8 x 32), AVX2 + FMA (6 x 16), or portable code
//! (4 x 8). The reduction runs in blocks of [`KC`] in order, and each tile's sum over a block
//! runs in order of k, so the result depends on the shapes and the CPU alone, never on how the
//! caller splits the work across threads.

use std::sync::OnceLock;

/// Reduction block (measured best on the convolution shapes of ResNet-18: 128 and 384 were
/// 5-15% slower): fewer passes over C, and the B rows a tile reads stay in L1.
pub(crate) const KC: usize = 256;
/// Rows of A packed at a time (its block, MC x KC, stays in L2).
const MC: usize = 256;

/// A microkernel: `tile[r * nr + j] = sum over k < kc of a[k * mr + r] * b[k * nr + j]`.
#[derive(Clone, Copy)]
pub(crate) struct Kernel {
    pub mr: usize,
    pub nr: usize,
    /// SAFETY contract: `a` holds `kc * mr` values, `b` `kc * nr`, `tile` `mr * nr`, and the
    /// CPU has the instructions the kernel was compiled for ([`kernel`] checks).
    run: unsafe fn(usize, *const f32, *const f32, *mut f32, bool),
    /// The same with B read in place: row k of the panel is `b0[offs[k]..][..nr / 2]` then
    /// `b1[offs[k]..][..nr / 2]`; with the last argument true the sums start from the tile's
    /// values (a previous reduction block). SAFETY contract: as `run`, and every such read is
    /// in bounds.
    indirect: IndirectFn,
    /// The same with A read in place and B packed: `a[k * mr + r]` is
    /// `src[rows[r] + offs[k]]`. SAFETY contract: as `run`, and every such read is in bounds.
    arows: ArowsFn,
    pub name: &'static str,
}

type IndirectFn = unsafe fn(usize, *const f32, *const f32, *const f32, *const usize, *mut f32, bool);
type ArowsFn = unsafe fn(usize, *const f32, *const usize, *const usize, *const f32, *mut f32, bool);

/// The widest microkernel this CPU runs, or a narrower one named by `SIMCLR_CPU_KERNEL`
/// (`avx2`, `portable`): to measure what an older CPU would get, on this one.
pub(crate) fn kernel() -> Kernel {
    static K: OnceLock<Kernel> = OnceLock::new();
    *K.get_or_init(|| {
        let cap = std::env::var("SIMCLR_CPU_KERNEL").unwrap_or_default();
        if cap == "portable" {
            return portable();
        }
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") && cap != "avx2" {
                return Kernel {
                    mr: 8,
                    nr: 32,
                    run: x86::avx512_x32::<8>,
                    indirect: x86::avx512_x32_indirect::<8>,
                    arows: x86::avx512_x32_arows::<8>,
                    name: "avx512",
                };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Kernel {
                    mr: 6,
                    nr: 16,
                    run: x86::avx2_6x16,
                    indirect: x86::avx2_6x16_indirect,
                    arows: x86::avx2_6x16_arows,
                    name: "avx2",
                };
            }
        }
        portable()
    })
}

/// The kernel for a product with `rows` rows of A packed (not read in place): [`kernel`], or on
/// AVX-512 its 12-row form where 12-row panels waste at most 1/32 of the rows (128 rows and
/// more): each B row loaded meets 12 broadcasts instead of 8. The sums are the same bits either
/// way (each element still sums its reduction in order), only the tiling differs. (12 rows
/// everywhere was slower: 64-channel layers computed 72 rows.)
pub(crate) fn kernel_for_rows(rows: usize) -> Kernel {
    let k = kernel();
    #[cfg(target_arch = "x86_64")]
    if k.name == "avx512" && rows.div_ceil(12) * 12 - rows <= rows / 32 {
        return Kernel {
            mr: 12,
            run: x86::avx512_x32::<12>,
            indirect: x86::avx512_x32_indirect::<12>,
            arows: x86::avx512_x32_arows::<12>,
            name: "avx512-12",
            ..k
        };
    }
    k
}

/// The portable microkernel (any CPU; the reference the others are tested against).
pub(crate) fn portable() -> Kernel {
    Kernel {
        mr: 4,
        nr: 8,
        run: portable_4x8,
        indirect: portable_4x8_indirect,
        arows: portable_4x8_arows,
        name: "portable",
    }
}

/// Writes panels of the A (rows) or B (columns) operand.
pub(crate) trait Pack: Sync {
    /// Lanes `i0..i0 + len` (rows of A, columns of B) for reduction indices `k0..k0 + kc`, in
    /// panels of `width` lanes: lane `l` goes to `out[(l / width) * width * kc + kk * width +
    /// l % width]`. The last panel's lanes past `len` must be written as zeros.
    fn pack(&self, i0: usize, len: usize, width: usize, k0: usize, kc: usize, out: &mut [f32]);
}

/// Where lane `l` of reduction index `kk` goes in a packed block (see [`Pack::pack`]).
#[inline(always)]
pub(crate) fn slot(l: usize, kk: usize, width: usize, kc: usize) -> usize {
    (l / width) * width * kc + kk * width + l % width
}

/// Zeroes the padding lanes of the last panel of a packed block of `len` lanes.
pub(crate) fn zero_padding(len: usize, width: usize, kc: usize, out: &mut [f32]) {
    let rem = len % width;
    if rem == 0 {
        return;
    }
    let last = &mut out[(len / width) * width * kc..][..width * kc];
    for kk in 0..kc {
        last[kk * width + rem..(kk + 1) * width].fill(0.0);
    }
}

/// Receives finished tiles.
pub(crate) trait Store: Sync {
    /// `tile[r * nr + j]` for `r < mlen`, `j < nlen` belongs at C[m0 + r, n0 + j]: written if
    /// `overwrite`, else added to what is there.
    #[allow(clippy::too_many_arguments)]
    fn store(&self, m0: usize, mlen: usize, n0: usize, nlen: usize, tile: &[f32], nr: usize, overwrite: bool);
}

/// C[rows, cols] = (C +) A[rows, ks] . B[ks, cols] on the calling thread, both operands packed
/// (the reference path the tests check every kernel with): reduction blocks of
/// [`KC`] from `ks.start`; `accumulate` adds to C instead of overwriting it with the first block.
#[cfg(test)]
#[allow(clippy::too_many_arguments)] // mirrors a BLAS call: three operands, three ranges
pub(crate) fn gemm(
    kern: Kernel,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    ks: std::ops::Range<usize>,
    a: &impl Pack,
    b: &impl Pack,
    c: &impl Store,
    accumulate: bool,
) {
    let (mr, nr) = (kern.mr, kern.nr);
    let (m, n) = (rows.len(), cols.len());
    if m == 0 || n == 0 {
        return;
    }
    let (mp, np) = (m.div_ceil(mr), n.div_ceil(nr));
    if ks.is_empty() {
        // Nothing to sum: C = 0 (or unchanged).
        if !accumulate {
            let zero = vec![0f32; mr * nr];
            for jp in 0..np {
                for ip in 0..mp {
                    let (m0, n0) = (rows.start + ip * mr, cols.start + jp * nr);
                    c.store(m0, mr.min(rows.end - m0), n0, nr.min(cols.end - n0), &zero, nr, true);
                }
            }
        }
        return;
    }
    super::with_scratch([mp * mr * KC, np * nr * KC, mr * nr], |[ap, bp, tile]| {
        let mut k0 = ks.start;
        while k0 < ks.end {
            let kc = KC.min(ks.end - k0);
            a.pack(rows.start, m, mr, k0, kc, &mut ap[..mp * mr * kc]);
            b.pack(cols.start, n, nr, k0, kc, &mut bp[..np * nr * kc]);
            let overwrite = !accumulate && k0 == ks.start;
            for jp in 0..np {
                let n0 = cols.start + jp * nr;
                let bpanel = &bp[jp * nr * kc..][..kc * nr];
                for ip in 0..mp {
                    let m0 = rows.start + ip * mr;
                    let apanel = &ap[ip * mr * kc..][..kc * mr];
                    // SAFETY: the panels hold kc * mr and kc * nr values, the tile mr * nr, and
                    // `kernel()` chose a kernel this CPU runs.
                    unsafe { (kern.run)(kc, apanel.as_ptr(), bpanel.as_ptr(), tile.as_mut_ptr(), false) };
                    c.store(m0, mr.min(rows.end - m0), n0, nr.min(cols.end - n0), tile, nr, overwrite);
                }
            }
            k0 += kc;
        }
    });
}

/// An operand packed once, every reduction block, in panels of `width` lanes (`mr` for A,
/// `nr` for B), for many products.
pub(crate) struct Packed {
    data: Vec<f32>,
    width: usize,
    lanes: usize,
}

impl Packed {
    pub(crate) fn new(width: usize, src: &impl Pack, lanes: usize, k: usize) -> Self {
        let np = lanes.div_ceil(width);
        let blocks = k.div_ceil(KC);
        use rayon::prelude::*;
        // Zeroed in parallel: the caller's thread alone would hold up both cores.
        let mut data = super::zeros(blocks * np * width * KC);
        // Reduction blocks, and the panels of each, in parallel.
        data.par_chunks_mut((np * width * KC).max(1)).enumerate().for_each(|(q, block)| {
            let (k0, kc) = (q * KC, KC.min(k - q * KC));
            block[..np * width * kc].par_chunks_mut(width * kc).enumerate().for_each(|(ip, panel)| {
                let l0 = ip * width;
                src.pack(l0, width.min(lanes - l0), width, k0, kc, panel);
            });
        });
        Self { data, width, lanes }
    }

    /// Panel `ip` of reduction block `q` (`kc` long).
    fn panel(&self, q: usize, ip: usize, kc: usize) -> &[f32] {
        let np = self.lanes.div_ceil(self.width);
        &self.data[q * np * self.width * KC + ip * self.width * kc..][..self.width * kc]
    }
}

/// A B operand that can be read in place: column panels whose two halves are contiguous in
/// [`Indirect::data`] at a fixed offset per reduction index.
pub(crate) trait Indirect: Sync {
    fn data(&self) -> &[f32];
    /// `out[kk]` = the offset of reduction index `k0 + kk` from a column's base.
    fn offsets(&self, k0: usize, kc: usize, out: &mut [usize]);
    /// The bases of the `half`-column runs starting at columns `n0` and `n0 + half`, if each
    /// is contiguous in `data`.
    fn bases(&self, n0: usize, half: usize) -> Option<(usize, usize)>;
}

/// Where the A operand comes from.
pub(crate) enum A<'a> {
    /// Packed once ([`Packed`], `mr` wide); the reduction must be `0..k`.
    Prepacked(&'a Packed),
    /// Packed block by block (MC rows x KC) as the product goes.
    Packer(&'a dyn Pack),
}

/// C[rows, cols] = A[rows, ks] . B[ks, cols] (the first reduction block overwrites C) with B
/// read in place where [`Indirect::bases`] allows, else packed by `fallback`. One thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_indirect(
    kern: Kernel,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    ks: std::ops::Range<usize>,
    a: A<'_>,
    b: &impl Indirect,
    fallback: &impl Pack,
    c: &impl Store,
) {
    let (mr, nr, half) = (kern.mr, kern.nr, kern.nr / 2);
    if rows.is_empty() || cols.is_empty() {
        return;
    }
    let data = b.data();
    if let A::Prepacked(pa) = a {
        return prepacked_tiles(kern, rows, cols, ks, pa, b, fallback, c);
    }
    let mut offs = vec![0usize; KC];
    let mc = (MC / mr).max(1) * mr;
    // Rows are handled in blocks of whole panels; a range that starts or ends inside a panel
    // computes the whole panel and stores its own rows.
    let (p0, p1) = (rows.start / mr, rows.end.div_ceil(mr));
    let a_len = match a {
        A::Prepacked(_) => 0,
        A::Packer(_) => mc * KC,
    };
    super::with_scratch([nr * KC, mr * nr, a_len], |[bp, tile, ap]| {
        let mut k0 = ks.start;
        while k0 < ks.end {
            let kc = KC.min(ks.end - k0);
            b.offsets(k0, kc, &mut offs[..kc]);
            let reach = offs[..kc].iter().copied().max().unwrap_or(0) + half;
            let overwrite = k0 == ks.start;
            let mut pb = p0;
            while pb < p1 {
                let pe = (pb + mc / mr).min(p1);
                if let A::Packer(packer) = a {
                    // Whole panels from pb * mr (rows before `rows.start` are valid rows of A,
                    // computed and dropped); the packer zero-pads past `rows.end`.
                    let (m0, m1) = (pb * mr, (pe * mr).min(rows.end));
                    packer.pack(m0, m1 - m0, mr, k0, kc, &mut ap[..(pe - pb) * mr * kc]);
                }
                let mut n0 = cols.start;
                while n0 < cols.end {
                    let nlen = nr.min(cols.end - n0);
                    let bases = if nlen == nr { b.bases(n0, half) } else { None };
                    let bases = bases.filter(|&(x, y)| x.max(y) + reach <= data.len());
                    if bases.is_none() {
                        fallback.pack(n0, nlen, nr, k0, kc, &mut bp[..nr * kc]);
                    }
                    for ip in pb..pe {
                        let apanel = match a {
                            A::Prepacked(pa) => pa.panel(k0 / KC, ip, kc),
                            A::Packer(_) => &ap[(ip - pb) * mr * kc..][..mr * kc],
                        };
                        match bases {
                            // SAFETY: the panel holds kc * mr values, the tile mr * nr; every
                            // read b0/b1 + offs[kk] + (0..half) is below data.len() (checked
                            // above: base + max offset + half <= len); `kernel()` chose a kernel
                            // this CPU runs.
                            Some((x, y)) => unsafe {
                                (kern.indirect)(
                                    kc,
                                    apanel.as_ptr(),
                                    data.as_ptr().add(x),
                                    data.as_ptr().add(y),
                                    offs.as_ptr(),
                                    tile.as_mut_ptr(),
                                    false,
                                )
                            },
                            // SAFETY: as in `gemm`.
                            None => unsafe {
                                (kern.run)(kc, apanel.as_ptr(), bp.as_ptr(), tile.as_mut_ptr(), false)
                            },
                        }
                        let m0 = (ip * mr).max(rows.start);
                        let mlen = ((ip + 1) * mr).min(rows.end) - m0;
                        // Rows of the panel outside `rows` are dropped.
                        let skip = m0 - ip * mr;
                        c.store(m0, mlen, n0, nlen, &tile[skip * nr..], nr, overwrite);
                    }
                    n0 += nlen;
                }
                pb = pe;
            }
            k0 += kc;
        }
    });
}

/// [`gemm_indirect`] with A prepacked, tile by tile: each tile sums every reduction block in
/// registers and the tile buffer and is stored once (no read-modify-write passes over C).
#[allow(clippy::too_many_arguments)]
fn prepacked_tiles(
    kern: Kernel,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    ks: std::ops::Range<usize>,
    a: &Packed,
    b: &impl Indirect,
    fallback: &impl Pack,
    c: &impl Store,
) {
    let (mr, nr, half) = (kern.mr, kern.nr, kern.nr / 2);
    debug_assert_eq!((ks.start, a.width), (0, mr));
    let k = ks.end;
    let blocks = k.div_ceil(KC);
    let data = b.data();
    let mut offs = vec![0usize; k];
    for q in 0..blocks {
        let k0 = q * KC;
        b.offsets(k0, KC.min(k - k0), &mut offs[k0..]);
    }
    let reach = offs.iter().copied().max().unwrap_or(0) + half;
    let (p0, p1) = (rows.start / mr, rows.end.div_ceil(mr));
    super::with_scratch([nr * KC * blocks, mr * nr], |[bp, tile]| {
        let mut n0 = cols.start;
        while n0 < cols.end {
            let nlen = nr.min(cols.end - n0);
            let bases = if nlen == nr { b.bases(n0, half) } else { None };
            let bases = bases.filter(|&(x, y)| x.max(y) + reach <= data.len());
            if bases.is_none() {
                for q in 0..blocks {
                    let (k0, kc) = (q * KC, KC.min(k - q * KC));
                    fallback.pack(n0, nlen, nr, k0, kc, &mut bp[q * nr * KC..][..nr * kc]);
                }
            }
            for ip in p0..p1 {
                if blocks == 0 {
                    tile.fill(0.0);
                }
                for q in 0..blocks {
                    let (k0, kc) = (q * KC, KC.min(k - q * KC));
                    let apanel = a.panel(q, ip, kc);
                    match bases {
                        // SAFETY: the panel holds kc * mr values, offs[k0..] kc offsets, the
                        // tile mr * nr; every read b0/b1 + offs[kk] + (0..half) is below
                        // data.len() (checked above: base + max offset + half <= len);
                        // `kernel()` chose a kernel this CPU runs.
                        Some((x, y)) => unsafe {
                            (kern.indirect)(
                                kc,
                                apanel.as_ptr(),
                                data.as_ptr().add(x),
                                data.as_ptr().add(y),
                                offs[k0..].as_ptr(),
                                tile.as_mut_ptr(),
                                q > 0,
                            )
                        },
                        // SAFETY: as in `gemm`; the packed block holds kc * nr values.
                        None => unsafe {
                            (kern.run)(
                                kc,
                                apanel.as_ptr(),
                                bp[q * nr * KC..].as_ptr(),
                                tile.as_mut_ptr(),
                                q > 0,
                            )
                        },
                    }
                }
                let m0 = (ip * mr).max(rows.start);
                let mlen = ((ip + 1) * mr).min(rows.end) - m0;
                // Rows of the panel outside `rows` are dropped.
                let skip = m0 - ip * mr;
                c.store(m0, mlen, n0, nlen, &tile[skip * nr..], nr, true);
            }
            n0 += nlen;
        }
    });
}

/// An A operand read in place: row `r`, reduction index `k` at `data[row(r) + offset(k)]`.
pub(crate) trait RowsInPlace: Sync {
    fn data(&self) -> &[f32];
    fn row(&self, r: usize) -> usize;
    /// `out[kk]` = the offset of reduction index `k0 + kk`.
    fn offsets(&self, k0: usize, kc: usize, out: &mut [usize]);
}

/// C[rows, cols] = A[rows, 0..k] . B[0..k, cols] with A read in place and B prepacked (`nr`
/// wide), tile by tile: each tile sums every reduction block in registers and the tile buffer,
/// then is stored once. Rows past the end of A's rows repeat its last row (computed, never
/// stored). One thread.
pub(crate) fn gemm_arows(
    kern: Kernel,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    k: usize,
    a: &impl RowsInPlace,
    b: &Packed,
    c: &impl Store,
) {
    let (mr, nr) = (kern.mr, kern.nr);
    debug_assert_eq!(b.width, nr);
    if rows.is_empty() || cols.is_empty() {
        return;
    }
    let data = a.data();
    let mut offs = vec![0usize; k];
    a.offsets(0, k, &mut offs);
    let reach = offs.iter().copied().max().unwrap_or(0);
    // Per column panel, reduction blocks outer and row panels inner: the B block (kc x nr,
    // 32 KB) stays in L1 while every row panel of the task meets it, each panel's tile
    // accumulating in a task buffer (L2) and stored once at the end. (Rows outer streamed every
    // B panel from L3 once per 8 rows: half of oneDNN's speed on 8x8 layers.)
    let panels = rows.len().div_ceil(mr);
    let mut row_offs = vec![0usize; panels * mr];
    for p in 0..panels {
        let m0 = rows.start + p * mr;
        let mlen = mr.min(rows.end - m0);
        for r in 0..mr {
            row_offs[p * mr + r] = a.row(m0 + r.min(mlen - 1));
        }
    }
    let top = row_offs.iter().copied().max().unwrap_or(0);
    // Every read src[row + offset] stays inside the data (checked once per call).
    assert!(top + reach < data.len(), "conv GEMM: an in-place operand reads past its end");
    super::with_scratch([panels * mr * nr], |[acc]| {
        let mut n0 = cols.start;
        while n0 < cols.end {
            let nlen = nr.min(cols.end - n0);
            if k == 0 {
                acc.fill(0.0);
            }
            for q in 0..k.div_ceil(KC) {
                let (k0, kc) = (q * KC, KC.min(k - q * KC));
                let bpanel = b.panel(q, n0 / nr, kc);
                for (p, tile) in acc.chunks_exact_mut(mr * nr).enumerate() {
                    // SAFETY: the B panel holds kc * nr values, offs[k0..] kc offsets, the
                    // tile mr * nr, row_offs[p * mr..] mr rows; every A read is below
                    // data.len() (asserted above); `kernel()` chose a kernel this CPU runs.
                    unsafe {
                        (kern.arows)(
                            kc,
                            data.as_ptr(),
                            row_offs[p * mr..].as_ptr(),
                            offs[k0..].as_ptr(),
                            bpanel.as_ptr(),
                            tile.as_mut_ptr(),
                            q > 0,
                        )
                    };
                }
            }
            for (p, tile) in acc.chunks_exact(mr * nr).enumerate() {
                let m0 = rows.start + p * mr;
                c.store(m0, mr.min(rows.end - m0), n0, nlen, tile, nr, true);
            }
            n0 += nlen;
        }
    });
}

/// # Safety
/// See [`Kernel::run`].
unsafe fn portable_4x8(kc: usize, a: *const f32, b: *const f32, tile: *mut f32, from_tile: bool) {
    const MR: usize = 4;
    const NR: usize = 8;
    let mut acc = [[0f32; NR]; MR];
    if from_tile {
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: the tile holds MR * NR values.
            unsafe { std::ptr::copy_nonoverlapping(tile.add(r * NR), row.as_mut_ptr(), NR) };
        }
    }
    for k in 0..kc {
        // SAFETY: k < kc, so both reads stay inside the panels (the caller's contract).
        let (ak, bk) = unsafe {
            (std::slice::from_raw_parts(a.add(k * MR), MR), std::slice::from_raw_parts(b.add(k * NR), NR))
        };
        for r in 0..MR {
            for j in 0..NR {
                acc[r][j] += ak[r] * bk[j];
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: the tile holds MR * NR values.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), tile.add(r * NR), NR) };
    }
}

/// # Safety
/// See [`Kernel::indirect`].
unsafe fn portable_4x8_indirect(
    kc: usize,
    a: *const f32,
    b0: *const f32,
    b1: *const f32,
    offs: *const usize,
    tile: *mut f32,
    from_tile: bool,
) {
    const MR: usize = 4;
    const NR: usize = 8;
    let mut acc = [[0f32; NR]; MR];
    if from_tile {
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: the tile holds MR * NR values.
            unsafe { std::ptr::copy_nonoverlapping(tile.add(r * NR), row.as_mut_ptr(), NR) };
        }
    }
    for k in 0..kc {
        // SAFETY: k < kc, and the caller checked every read against the source's bounds.
        let (ak, lo, hi) = unsafe {
            let o = *offs.add(k);
            (
                std::slice::from_raw_parts(a.add(k * MR), MR),
                std::slice::from_raw_parts(b0.add(o), NR / 2),
                std::slice::from_raw_parts(b1.add(o), NR / 2),
            )
        };
        for r in 0..MR {
            for j in 0..NR / 2 {
                acc[r][j] += ak[r] * lo[j];
                acc[r][NR / 2 + j] += ak[r] * hi[j];
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: the tile holds MR * NR values.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), tile.add(r * NR), NR) };
    }
}

/// # Safety
/// See [`Kernel::arows`].
unsafe fn portable_4x8_arows(
    kc: usize,
    src: *const f32,
    rows: *const usize,
    offs: *const usize,
    b: *const f32,
    tile: *mut f32,
    from_tile: bool,
) {
    const MR: usize = 4;
    const NR: usize = 8;
    let mut acc = [[0f32; NR]; MR];
    if from_tile {
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: the tile holds MR * NR values.
            unsafe { std::ptr::copy_nonoverlapping(tile.add(r * NR), row.as_mut_ptr(), NR) };
        }
    }
    // SAFETY: the caller passes mr row offsets.
    let rows = unsafe { std::slice::from_raw_parts(rows, MR) };
    for k in 0..kc {
        // SAFETY: k < kc, and the caller checked every read against the source's bounds.
        let (o, bk) = unsafe { (*offs.add(k), std::slice::from_raw_parts(b.add(k * NR), NR)) };
        for r in 0..MR {
            // SAFETY: as above.
            let av = unsafe { *src.add(rows[r] + o) };
            for j in 0..NR {
                acc[r][j] += av * bk[j];
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: the tile holds MR * NR values.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), tile.add(r * NR), NR) };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

/// Row-major matrices as [`Pack`] and [`Store`] (tests and dense layers).
pub(crate) mod dense {
    use super::{Pack, Store};

    use std::cell::UnsafeCell;

    /// A (rows x k) with `rs`, `cs` strides, packed as rows; or B (k x cols), packed as columns.
    pub(crate) struct Matrix<'a> {
        pub data: &'a [f32],
        /// Stride between lanes (rows of A, columns of B).
        pub lane_stride: usize,
        /// Stride between reduction indices.
        pub k_stride: usize,
    }

    impl Pack for Matrix<'_> {
        fn pack(&self, i0: usize, len: usize, width: usize, k0: usize, kc: usize, out: &mut [f32]) {
            if self.lane_stride == 1 {
                // Lanes are contiguous: copy panel rows.
                for kk in 0..kc {
                    let base = i0 + (k0 + kk) * self.k_stride;
                    let mut l = 0;
                    while l < len {
                        let n = (width - l % width).min(len - l);
                        let at = super::slot(l, kk, width, kc);
                        out[at..at + n].copy_from_slice(&self.data[base + l..base + l + n]);
                        l += n;
                    }
                }
                super::zero_padding(len, width, kc, out);
                return;
            }
            for l in 0..len {
                let base = (i0 + l) * self.lane_stride + k0 * self.k_stride;
                let at = super::slot(l, 0, width, kc);
                if self.k_stride == 1 {
                    for (kk, v) in self.data[base..base + kc].iter().enumerate() {
                        out[at + kk * width] = *v;
                    }
                } else {
                    for kk in 0..kc {
                        out[at + kk * width] = self.data[base + kk * self.k_stride];
                    }
                }
            }
            super::zero_padding(len, width, kc, out);
        }
    }

    /// A row-major output matrix shared by the threads that fill disjoint tiles of it.
    pub(crate) struct Out<'a> {
        cells: &'a [UnsafeCell<f32>],
        cols: usize,
    }

    // SAFETY: every caller stores disjoint tiles from different threads (the driver's
    // contract: one thread per tile), so no cell is written by two threads at once.
    unsafe impl Sync for Out<'_> {}

    impl<'a> Out<'a> {
        pub(crate) fn new(data: &'a mut [f32], cols: usize) -> Self {
            let len = data.len();
            // SAFETY: UnsafeCell<f32> has the layout of f32, and the exclusive borrow is held
            // for 'a.
            let cells =
                unsafe { std::slice::from_raw_parts(data.as_mut_ptr().cast::<UnsafeCell<f32>>(), len) };
            Self { cells, cols }
        }
    }

    impl Store for Out<'_> {
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
            for r in 0..mlen {
                let start = (m0 + r) * self.cols + n0;
                let cells = &self.cells[start..start + nlen];
                // SAFETY: this tile's cells belong to this call alone (see `Sync`), and an
                // UnsafeCell<f32> slice has the layout of an f32 slice.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(UnsafeCell::raw_get(cells.as_ptr()), nlen) };
                let src = &tile[r * nr..][..nlen];
                if overwrite {
                    dst.copy_from_slice(src);
                } else {
                    crate::cpu::add_into(dst, src);
                }
            }
        }
    }
}

#[doc(hidden)]
pub(crate) fn bench_run(kern: Kernel, kc: usize, a: &[f32], b: &[f32], tile: &mut [f32]) {
    assert!(a.len() >= kc * kern.mr && b.len() >= kc * kern.nr && tile.len() >= kern.mr * kern.nr);
    // SAFETY: sizes checked above; the kernel runs on this CPU.
    unsafe { (kern.run)(kc, a.as_ptr(), b.as_ptr(), tile.as_mut_ptr(), false) }
}

#[cfg(test)]
mod tests {
    use super::dense::{Matrix, Out};
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn reference(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|t| f64::from(a[i * k + t]) * f64::from(b[t * n + j])).sum();
            }
        }
        c
    }

    fn run(kern: Kernel, m: usize, n: usize, k: usize, accumulate: bool) -> (Vec<f32>, Vec<f64>) {
        let (a, b) = (random(m * k, 1), random(k * n, 2));
        let start = random(m * n, 3);
        let mut c = start.clone();
        let out = Out::new(&mut c, n);
        let am = Matrix { data: &a, lane_stride: k, k_stride: 1 };
        let bm = Matrix { data: &b, lane_stride: 1, k_stride: n };
        gemm(kern, 0..m, 0..n, 0..k, &am, &bm, &out, accumulate);
        let mut want = reference(&a, &b, m, n, k);
        if accumulate {
            want.iter_mut().zip(&start).for_each(|(w, s)| *w += f64::from(*s));
        }
        (c, want)
    }

    #[test]
    fn every_kernel_computes_the_product() {
        for kern in [portable(), kernel(), kernel_for_rows(128)] {
            for (m, n, k) in [(1, 1, 1), (8, 32, 128), (13, 70, 300), (3, 5, 0), (64, 33, 129), (7, 100, 2)] {
                for accumulate in [false, true] {
                    let (got, want) = run(kern, m, n, k, accumulate);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        let tol = 1e-5 * (k as f64).sqrt().max(1.0) * 4.0;
                        assert!(
                            (f64::from(*g) - w).abs() <= tol,
                            "{} {m}x{n}x{k} acc {accumulate} [{i}]: {g} vs {w}",
                            kern.name
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_row_count_of_the_tile_does_not_change_the_bits() {
        // kernel_for_rows may pick 12-row tiles where kernel() has 8: every element must still
        // sum its reduction in the same order (the conv results' determinism relies on it).
        let (m, n, k) = (130, 70, 600);
        let (a, b) = (random(m * k, 6), random(k * n, 7));
        let am = Matrix { data: &a, lane_stride: k, k_stride: 1 };
        let bm = Matrix { data: &b, lane_stride: 1, k_stride: n };
        let (mut narrow, mut wide) = (vec![0f32; m * n], vec![0f32; m * n]);
        gemm(kernel(), 0..m, 0..n, 0..k, &am, &bm, &Out::new(&mut narrow, n), false);
        gemm(kernel_for_rows(m), 0..m, 0..n, 0..k, &am, &bm, &Out::new(&mut wide, n), false);
        assert_eq!(narrow, wide);
    }

    #[test]
    fn sub_blocks_give_the_bits_of_the_whole() {
        let kern = kernel();
        let (m, n, k) = (24, 96, 300);
        let (a, b) = (random(m * k, 4), random(k * n, 5));
        let am = Matrix { data: &a, lane_stride: k, k_stride: 1 };
        let bm = Matrix { data: &b, lane_stride: 1, k_stride: n };
        let mut whole = vec![0f32; m * n];
        gemm(kern, 0..m, 0..n, 0..k, &am, &bm, &Out::new(&mut whole, n), false);
        let mut parts = vec![0f32; m * n];
        let out = Out::new(&mut parts, n);
        for (rows, cols) in [(0..8, 0..40), (8..24, 0..40), (0..24, 40..96)] {
            gemm(kern, rows, cols, 0..k, &am, &bm, &out, false);
        }
        assert_eq!(whole, parts);
    }
}
