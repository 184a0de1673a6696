//! The x86-64 microkernels (AVX-512 8x32 and 12x32, AVX2 6x16), each compiled with its own target
//! features and only called after run-time detection picked it.

use std::arch::x86_64::*;

/// # Safety
/// AVX-512F, and [`super::Kernel::run`]'s contract with mr = MR, nr = 32.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn avx512_x32<const MR: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    tile: *mut f32,
    from_tile: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    if from_tile {
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: the tile holds MR x 32 values.
            unsafe { *row = [_mm512_loadu_ps(tile.add(r * 32)), _mm512_loadu_ps(tile.add(r * 32 + 16))] };
        }
    }
    for k in 0..kc {
        // SAFETY: k < kc: inside the panels.
        unsafe {
            let bk = b.add(k * 32);
            let (b0, b1) = (_mm512_loadu_ps(bk), _mm512_loadu_ps(bk.add(16)));
            let ak = a.add(k * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ak.add(r));
                row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                row[1] = _mm512_fmadd_ps(av, b1, row[1]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: the tile holds MR x 32 values.
        unsafe {
            _mm512_storeu_ps(tile.add(r * 32), row[0]);
            _mm512_storeu_ps(tile.add(r * 32 + 16), row[1]);
        }
    }
}

/// # Safety
/// AVX-512F, and [`super::Kernel::indirect`]'s contract with mr = MR, nr = 32.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn avx512_x32_indirect<const MR: usize>(
    kc: usize,
    a: *const f32,
    b0: *const f32,
    b1: *const f32,
    offs: *const usize,
    tile: *mut f32,
    from_tile: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    if from_tile {
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: the tile holds MR x 32 values.
            unsafe { *row = [_mm512_loadu_ps(tile.add(r * 32)), _mm512_loadu_ps(tile.add(r * 32 + 16))] };
        }
    }
    for k in 0..kc {
        // SAFETY: k < kc, and the caller checked every read against the source's bounds.
        unsafe {
            let o = *offs.add(k);
            let (x0, x1) = (_mm512_loadu_ps(b0.add(o)), _mm512_loadu_ps(b1.add(o)));
            let ak = a.add(k * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ak.add(r));
                row[0] = _mm512_fmadd_ps(av, x0, row[0]);
                row[1] = _mm512_fmadd_ps(av, x1, row[1]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: the tile holds MR x 32 values.
        unsafe {
            _mm512_storeu_ps(tile.add(r * 32), row[0]);
            _mm512_storeu_ps(tile.add(r * 32 + 16), row[1]);
        }
    }
}

/// # Safety
/// AVX-512F, and [`super::Kernel::arows`]'s contract with mr = MR, nr = 32.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn avx512_x32_arows<const MR: usize>(
    kc: usize,
    src: *const f32,
    rows: *const usize,
    offs: *const usize,
    b: *const f32,
    tile: *mut f32,
    from_tile: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    if from_tile {
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: the tile holds MR x 32 values.
            unsafe { *row = [_mm512_loadu_ps(tile.add(r * 32)), _mm512_loadu_ps(tile.add(r * 32 + 16))] };
        }
    }
    // SAFETY: the caller passes MR row offsets.
    let p: [*const f32; MR] = std::array::from_fn(|r| unsafe { src.add(*rows.add(r)) });
    for k in 0..kc {
        // SAFETY: k < kc, and the caller checked every read against the source's bounds.
        unsafe {
            let o = *offs.add(k);
            let bk = b.add(k * 32);
            let (b0, b1) = (_mm512_loadu_ps(bk), _mm512_loadu_ps(bk.add(16)));
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*p[r].add(o));
                row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                row[1] = _mm512_fmadd_ps(av, b1, row[1]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: the tile holds MR x 32 values.
        unsafe {
            _mm512_storeu_ps(tile.add(r * 32), row[0]);
            _mm512_storeu_ps(tile.add(r * 32 + 16), row[1]);
        }
    }
}

/// # Safety
/// AVX2 and FMA, and [`super::Kernel::arows`]'s contract with mr = 6, nr = 16.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn avx2_6x16_arows(
    kc: usize,
    src: *const f32,
    rows: *const usize,
    offs: *const usize,
    b: *const f32,
    tile: *mut f32,
    from_tile: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    if from_tile {
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: the tile holds 6 x 16 values.
            unsafe { *row = [_mm256_loadu_ps(tile.add(r * 16)), _mm256_loadu_ps(tile.add(r * 16 + 8))] };
        }
    }
    // SAFETY: the caller passes 6 row offsets.
    let p: [*const f32; 6] = std::array::from_fn(|r| unsafe { src.add(*rows.add(r)) });
    for k in 0..kc {
        // SAFETY: k < kc, and the caller checked every read against the source's bounds.
        unsafe {
            let o = *offs.add(k);
            let bk = b.add(k * 16);
            let (b0, b1) = (_mm256_loadu_ps(bk), _mm256_loadu_ps(bk.add(8)));
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*p[r].add(o));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: the tile holds 6 x 16 values.
        unsafe {
            _mm256_storeu_ps(tile.add(r * 16), row[0]);
            _mm256_storeu_ps(tile.add(r * 16 + 8), row[1]);
        }
    }
}

/// # Safety
/// AVX2 and FMA, and [`super::Kernel::indirect`]'s contract with mr = 6, nr = 16.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn avx2_6x16_indirect(
    kc: usize,
    a: *const f32,
    b0: *const f32,
    b1: *const f32,
    offs: *const usize,
    tile: *mut f32,
    from_tile: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    if from_tile {
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: the tile holds 6 x 16 values.
            unsafe { *row = [_mm256_loadu_ps(tile.add(r * 16)), _mm256_loadu_ps(tile.add(r * 16 + 8))] };
        }
    }
    for k in 0..kc {
        // SAFETY: k < kc, and the caller checked every read against the source's bounds.
        unsafe {
            let o = *offs.add(k);
            let (x0, x1) = (_mm256_loadu_ps(b0.add(o)), _mm256_loadu_ps(b1.add(o)));
            let ak = a.add(k * 6);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ak.add(r));
                row[0] = _mm256_fmadd_ps(av, x0, row[0]);
                row[1] = _mm256_fmadd_ps(av, x1, row[1]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: the tile holds 6 x 16 values.
        unsafe {
            _mm256_storeu_ps(tile.add(r * 16), row[0]);
            _mm256_storeu_ps(tile.add(r * 16 + 8), row[1]);
        }
    }
}

/// # Safety
/// AVX2 and FMA, and [`super::Kernel::run`]'s contract with mr = 6, nr = 16.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn avx2_6x16(kc: usize, a: *const f32, b: *const f32, tile: *mut f32, from_tile: bool) {
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    if from_tile {
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: the tile holds 6 x 16 values.
            unsafe { *row = [_mm256_loadu_ps(tile.add(r * 16)), _mm256_loadu_ps(tile.add(r * 16 + 8))] };
        }
    }
    for k in 0..kc {
        // SAFETY: k < kc: inside the panels.
        unsafe {
            let bk = b.add(k * 16);
            let (b0, b1) = (_mm256_loadu_ps(bk), _mm256_loadu_ps(bk.add(8)));
            let ak = a.add(k * 6);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ak.add(r));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: the tile holds 6 x 16 values.
        unsafe {
            _mm256_storeu_ps(tile.add(r * 16), row[0]);
            _mm256_storeu_ps(tile.add(r * 16 + 8), row[1]);
        }
    }
}
