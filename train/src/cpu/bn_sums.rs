//! BatchNorm's per-channel sums, in f64 in 8 fixed lanes: lane `l` takes the values at
//! `j = l (mod 8)` of each image's run of the channel, in image order, and the last `r mod 8`
//! values of a run go to lanes `0..`; the lanes are then added in a fixed tree. So the sums are
//! the same bits on every CPU and for any thread count.
//!
//! The x86 forms hold the 8 lanes in vector registers and do the very same operations (no
//! fused multiply-add), so they give the portable loop's bits. (The compiler left that loop
//! scalar: 4.6% + 2.3% of a ResNet-18 step's cycles went to it.)

/// (sum, sum of squares) of channel `ch` of an n x c x r tensor.
pub(super) fn channel_sums(x: &[f32], n: usize, c: usize, r: usize, ch: usize) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if r >= 8 {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { x86::channel_sums_avx512(x, n, c, r, ch) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { x86::channel_sums_avx2(x, n, c, r, ch) };
        }
    }
    portable_channel_sums(x, n, c, r, ch)
}

/// (sum of g, sum of g (x - mean)) of channel `ch`, g = dy masked by the ReLU: `dy` where
/// `y > 0`, else 0 (`y` empty: no ReLU).
#[allow(clippy::too_many_arguments)]
pub(super) fn grad_sums(
    dy: &[f32],
    y: &[f32],
    x: &[f32],
    n: usize,
    c: usize,
    r: usize,
    ch: usize,
    mean: f64,
) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if r >= 8 {
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vl") {
            // SAFETY: the CPU has AVX-512F and VL (checked just above).
            return unsafe { x86::grad_sums_avx512(dy, y, x, n, c, r, ch, mean) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { x86::grad_sums_avx2(dy, y, x, n, c, r, ch, mean) };
        }
    }
    portable_grad_sums(dy, y, x, n, c, r, ch, mean)
}

/// The reference form of [`channel_sums`] (any CPU).
fn portable_channel_sums(x: &[f32], n: usize, c: usize, r: usize, ch: usize) -> (f64, f64) {
    let mut s = [0f64; 8];
    let mut q = [0f64; 8];
    for i in 0..n {
        let block = &x[(i * c + ch) * r..][..r];
        let mut chunks = block.chunks_exact(8);
        for v in &mut chunks {
            for l in 0..8 {
                let f = f64::from(v[l]);
                s[l] += f;
                q[l] += f * f;
            }
        }
        tail_sums(chunks.remainder(), &mut s, &mut q);
    }
    (lanes(s), lanes(q))
}

/// The last `r mod 8` values of a run into lanes `0..` (sum and sum of squares).
#[inline(always)]
fn tail_sums(rest: &[f32], s: &mut [f64; 8], q: &mut [f64; 8]) {
    for (l, v) in rest.iter().enumerate() {
        let f = f64::from(*v);
        s[l] += f;
        q[l] += f * f;
    }
}

/// The reference form of [`grad_sums`] (any CPU).
#[allow(clippy::too_many_arguments)]
fn portable_grad_sums(
    dy: &[f32],
    y: &[f32],
    x: &[f32],
    n: usize,
    c: usize,
    r: usize,
    ch: usize,
    mean: f64,
) -> (f64, f64) {
    let mut s = [0f64; 8];
    let mut q = [0f64; 8];
    let full = r / 8 * 8;
    for i in 0..n {
        let at = (i * c + ch) * r;
        let (d, xb) = (&dy[at..][..r], &x[at..][..r]);
        let yb = if y.is_empty() { &[][..] } else { &y[at..][..r] };
        let mut j = 0;
        while j < full {
            for l in 0..8 {
                let g = f64::from(masked(d[j + l], yb, j + l));
                s[l] += g;
                q[l] += g * (f64::from(xb[j + l]) - mean);
            }
            j += 8;
        }
        tail_grad_sums(d, yb, xb, full, mean, &mut s, &mut q);
    }
    (lanes(s), lanes(q))
}

/// Values `full..` of a run into lanes `0..` (see [`grad_sums`]).
#[inline(always)]
fn tail_grad_sums(
    d: &[f32],
    y: &[f32],
    x: &[f32],
    full: usize,
    mean: f64,
    s: &mut [f64; 8],
    q: &mut [f64; 8],
) {
    for l in 0..d.len() - full {
        let g = f64::from(masked(d[full + l], y, full + l));
        s[l] += g;
        q[l] += g * (f64::from(x[full + l]) - mean);
    }
}

/// The ReLU-masked gradient: `dy` where `y > 0`, else 0 (`y` empty: no ReLU).
#[inline(always)]
pub(super) fn masked(dy: f32, y: &[f32], j: usize) -> f32 {
    if y.is_empty() || y[j] > 0.0 {
        dy
    } else {
        0.0
    }
}

/// The 8 lanes summed in a fixed order.
#[inline(always)]
fn lanes(v: [f64; 8]) -> f64 {
    ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{lanes, tail_grad_sums, tail_sums};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn channel_sums_avx512(
        x: &[f32],
        n: usize,
        c: usize,
        r: usize,
        ch: usize,
    ) -> (f64, f64) {
        let (mut s, mut q) = (_mm512_setzero_pd(), _mm512_setzero_pd());
        let full = r / 8 * 8;
        for i in 0..n {
            let block = &x[(i * c + ch) * r..][..r];
            let p = block.as_ptr();
            let mut j = 0;
            while j < full {
                // SAFETY: j + 8 <= full <= block.len().
                let f = _mm512_cvtps_pd(unsafe { _mm256_loadu_ps(p.add(j)) });
                s = _mm512_add_pd(s, f);
                q = _mm512_add_pd(q, _mm512_mul_pd(f, f));
                j += 8;
            }
            if full < r {
                let (mut sa, mut qa) = ([0f64; 8], [0f64; 8]);
                // SAFETY: the arrays hold 8 f64s.
                unsafe { (_mm512_storeu_pd(sa.as_mut_ptr(), s), _mm512_storeu_pd(qa.as_mut_ptr(), q)) };
                tail_sums(&block[full..], &mut sa, &mut qa);
                // SAFETY: as above.
                unsafe { (s, q) = (_mm512_loadu_pd(sa.as_ptr()), _mm512_loadu_pd(qa.as_ptr())) };
            }
        }
        let (mut sa, mut qa) = ([0f64; 8], [0f64; 8]);
        // SAFETY: the arrays hold 8 f64s.
        unsafe { (_mm512_storeu_pd(sa.as_mut_ptr(), s), _mm512_storeu_pd(qa.as_mut_ptr(), q)) };
        (lanes(sa), lanes(qa))
    }

    /// # Safety
    /// AVX-512F and AVX-512VL.
    #[target_feature(enable = "avx512f,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn grad_sums_avx512(
        dy: &[f32],
        y: &[f32],
        x: &[f32],
        n: usize,
        c: usize,
        r: usize,
        ch: usize,
        mean: f64,
    ) -> (f64, f64) {
        let (mut s, mut q) = (_mm512_setzero_pd(), _mm512_setzero_pd());
        let mv = _mm512_set1_pd(mean);
        let full = r / 8 * 8;
        for i in 0..n {
            let at = (i * c + ch) * r;
            let (d, xb) = (&dy[at..][..r], &x[at..][..r]);
            let yb = if y.is_empty() { &[][..] } else { &y[at..][..r] };
            let mut j = 0;
            while j < full {
                // SAFETY: j + 8 <= full <= r, the length of d, xb and (if not empty) yb.
                let (dv, xv) =
                    unsafe { (_mm256_loadu_ps(d.as_ptr().add(j)), _mm256_loadu_ps(xb.as_ptr().add(j))) };
                let gv = if yb.is_empty() {
                    dv
                } else {
                    // SAFETY: as above. `>` ordered: a NaN y masks, as in `masked`.
                    let yv = unsafe { _mm256_loadu_ps(yb.as_ptr().add(j)) };
                    _mm256_maskz_mov_ps(_mm256_cmp_ps_mask::<_CMP_GT_OQ>(yv, _mm256_setzero_ps()), dv)
                };
                let g = _mm512_cvtps_pd(gv);
                s = _mm512_add_pd(s, g);
                q = _mm512_add_pd(q, _mm512_mul_pd(g, _mm512_sub_pd(_mm512_cvtps_pd(xv), mv)));
                j += 8;
            }
            if full < r {
                let (mut sa, mut qa) = ([0f64; 8], [0f64; 8]);
                // SAFETY: the arrays hold 8 f64s.
                unsafe { (_mm512_storeu_pd(sa.as_mut_ptr(), s), _mm512_storeu_pd(qa.as_mut_ptr(), q)) };
                tail_grad_sums(d, yb, xb, full, mean, &mut sa, &mut qa);
                // SAFETY: as above.
                unsafe { (s, q) = (_mm512_loadu_pd(sa.as_ptr()), _mm512_loadu_pd(qa.as_ptr())) };
            }
        }
        let (mut sa, mut qa) = ([0f64; 8], [0f64; 8]);
        // SAFETY: the arrays hold 8 f64s.
        unsafe { (_mm512_storeu_pd(sa.as_mut_ptr(), s), _mm512_storeu_pd(qa.as_mut_ptr(), q)) };
        (lanes(sa), lanes(qa))
    }

    /// Lanes 0-3 and 4-7 as two vectors.
    type Lanes = (__m256d, __m256d);

    #[target_feature(enable = "avx2")]
    fn store(v: Lanes) -> [f64; 8] {
        let mut a = [0f64; 8];
        // SAFETY: the array holds 8 f64s.
        unsafe { (_mm256_storeu_pd(a.as_mut_ptr(), v.0), _mm256_storeu_pd(a.as_mut_ptr().add(4), v.1)) };
        a
    }

    #[target_feature(enable = "avx2")]
    fn load(a: &[f64; 8]) -> Lanes {
        // SAFETY: the array holds 8 f64s.
        unsafe { (_mm256_loadu_pd(a.as_ptr()), _mm256_loadu_pd(a.as_ptr().add(4))) }
    }

    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn channel_sums_avx2(x: &[f32], n: usize, c: usize, r: usize, ch: usize) -> (f64, f64) {
        let z = _mm256_setzero_pd();
        let (mut s, mut q) = ((z, z), (z, z));
        let full = r / 8 * 8;
        for i in 0..n {
            let block = &x[(i * c + ch) * r..][..r];
            let p = block.as_ptr();
            let mut j = 0;
            while j < full {
                // SAFETY: j + 8 <= full <= block.len().
                let (lo, hi) = unsafe { (_mm_loadu_ps(p.add(j)), _mm_loadu_ps(p.add(j + 4))) };
                let (f0, f1) = (_mm256_cvtps_pd(lo), _mm256_cvtps_pd(hi));
                s = (_mm256_add_pd(s.0, f0), _mm256_add_pd(s.1, f1));
                q = (_mm256_add_pd(q.0, _mm256_mul_pd(f0, f0)), _mm256_add_pd(q.1, _mm256_mul_pd(f1, f1)));
                j += 8;
            }
            if full < r {
                let (mut sa, mut qa) = (store(s), store(q));
                tail_sums(&block[full..], &mut sa, &mut qa);
                (s, q) = (load(&sa), load(&qa));
            }
        }
        (lanes(store(s)), lanes(store(q)))
    }

    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn grad_sums_avx2(
        dy: &[f32],
        y: &[f32],
        x: &[f32],
        n: usize,
        c: usize,
        r: usize,
        ch: usize,
        mean: f64,
    ) -> (f64, f64) {
        let z = _mm256_setzero_pd();
        let (mut s, mut q) = ((z, z), (z, z));
        let mv = _mm256_set1_pd(mean);
        let full = r / 8 * 8;
        for i in 0..n {
            let at = (i * c + ch) * r;
            let (d, xb) = (&dy[at..][..r], &x[at..][..r]);
            let yb = if y.is_empty() { &[][..] } else { &y[at..][..r] };
            let mut j = 0;
            while j < full {
                // SAFETY: j + 8 <= full <= r, the length of d, xb and (if not empty) yb.
                let (dv, xv) =
                    unsafe { (_mm256_loadu_ps(d.as_ptr().add(j)), _mm256_loadu_ps(xb.as_ptr().add(j))) };
                let gv = if yb.is_empty() {
                    dv
                } else {
                    // SAFETY: as above. `>` ordered: a NaN y masks, as in `masked`; the mask's
                    // zero lanes are +0.0, as `masked` returns.
                    let yv = unsafe { _mm256_loadu_ps(yb.as_ptr().add(j)) };
                    _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(yv, _mm256_setzero_ps()), dv)
                };
                let (g0, g1) = (
                    _mm256_cvtps_pd(_mm256_castps256_ps128(gv)),
                    _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(gv)),
                );
                let (x0, x1) = (
                    _mm256_cvtps_pd(_mm256_castps256_ps128(xv)),
                    _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(xv)),
                );
                s = (_mm256_add_pd(s.0, g0), _mm256_add_pd(s.1, g1));
                q = (
                    _mm256_add_pd(q.0, _mm256_mul_pd(g0, _mm256_sub_pd(x0, mv))),
                    _mm256_add_pd(q.1, _mm256_mul_pd(g1, _mm256_sub_pd(x1, mv))),
                );
                j += 8;
            }
            if full < r {
                let (mut sa, mut qa) = (store(s), store(q));
                tail_grad_sums(d, yb, xb, full, mean, &mut sa, &mut qa);
                (s, q) = (load(&sa), load(&qa));
            }
        }
        (lanes(store(s)), lanes(store(q)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Values with the cases the mask must get right: zeros of both signs, negatives, NaN-free.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len)
            .map(|_| match rng.random_range(0..10) {
                0 => 0.0,
                1 => -0.0,
                _ => rng.random_range(-3.0f32..3.0) * 10f32.powi(rng.random_range(-3..4)),
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Whichever form this CPU picks gives the reference loop's bits.
        #[test]
        fn the_cpus_form_gives_the_reference_bits(n in 1usize..5, c in 1usize..4, r in 1usize..70, seed in 0u64..1000, relu: bool) {
            let len = n * c * r;
            let (x, dy, y) = (values(len, seed), values(len, seed + 1), values(len, seed + 2));
            let y = if relu { y } else { Vec::new() };
            for ch in 0..c {
                let (a, b) = (channel_sums(&x, n, c, r, ch), portable_channel_sums(&x, n, c, r, ch));
                prop_assert_eq!((a.0.to_bits(), a.1.to_bits()), (b.0.to_bits(), b.1.to_bits()));
                let mean = a.0 / (n * r) as f64;
                let (a, b) = (grad_sums(&dy, &y, &x, n, c, r, ch, mean), portable_grad_sums(&dy, &y, &x, n, c, r, ch, mean));
                prop_assert_eq!((a.0.to_bits(), a.1.to_bits()), (b.0.to_bits(), b.1.to_bits()));
                // The AVX2 form too, where an AVX-512 CPU would pick the other one.
                #[cfg(target_arch = "x86_64")]
                if r >= 8 && std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    let (a2, c2) = unsafe {
                        (x86::grad_sums_avx2(&dy, &y, &x, n, c, r, ch, mean), x86::channel_sums_avx2(&x, n, c, r, ch))
                    };
                    let c1 = portable_channel_sums(&x, n, c, r, ch);
                    prop_assert_eq!((a2.0.to_bits(), a2.1.to_bits()), (b.0.to_bits(), b.1.to_bits()));
                    prop_assert_eq!((c2.0.to_bits(), c2.1.to_bits()), (c1.0.to_bits(), c1.1.to_bits()));
                }
            }
        }
    }

    #[test]
    fn the_relu_mask_drops_the_gradient_where_y_is_not_positive() {
        // r = 16: the vector path on x86. y > 0 on even positions only.
        let (n, c, r) = (2, 1, 16);
        let dy = vec![1.0f32; n * r];
        let x: Vec<f32> = (0..n * r).map(|v| v as f32).collect();
        let y: Vec<f32> = (0..n * r).map(|v| if v % 2 == 0 { 1.0 } else { -0.0 }).collect();
        let (s, q) = grad_sums(&dy, &y, &x, n, c, r, 0, 0.0);
        assert_eq!(s, 16.0);
        assert_eq!(q, (0..n * r).step_by(2).map(|v| v as f64).sum::<f64>());
        let (s, _) = grad_sums(&dy, &[], &x, n, c, r, 0, 0.0);
        assert_eq!(s, 32.0);
    }
}
