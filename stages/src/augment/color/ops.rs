//! The colour ops, on planar RGB f32 buffers in [0, 1] (see the module docs of `color`):
//! each one pass of branch-free arithmetic, compiled for AVX2 and AVX-512 too and picked at run
//! time, with identical bits on every path.

use std::cell::RefCell;

use simclr_core::{multiversion, Image};

use super::{ContrastMean, SaturationMode};
use crate::augment::pixel::{clamp01, fmax, fmin, to_u8, to_unit};

/// The three planes of a planar RGB buffer (`n` reds, `n` greens, `n` blues).
#[inline(always)]
fn planes(buf: &mut [f32]) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let n = buf.len() / 3;
    let (r, rest) = buf.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    (r, g, &mut b[..n])
}

/// Sum of a slice in a fixed order that vectorizes: 16 lanes of f32 partial sums per block of
/// 64Ki values, blocks added in f64.
#[inline(always)]
fn sum(x: &[f32]) -> f64 {
    let mut total = 0f64;
    for part in x.chunks(1 << 16) {
        let mut acc = [0f32; 16];
        let mut blocks = part.chunks_exact(16);
        for blk in &mut blocks {
            for (a, &v) in acc.iter_mut().zip(blk) {
                *a += v;
            }
        }
        for (a, &v) in acc.iter_mut().zip(blocks.remainder()) {
            *a += v;
        }
        total += acc.iter().map(|&a| f64::from(a)).sum::<f64>();
    }
    total
}

// ---------------------------------------------------------------------------------------------
// The ops, on planar RGB f32 buffers in [0, 1]: `n` red values, then `n` green, then `n` blue
// (CHW, the layout tensors use). Planar rather than interleaved because per-pixel ops (hue,
// saturation, grayscale) then vectorize as plain loops: 2x faster than on interleaved pixels.

multiversion! {
    /// Brightness, `v2`: `x * f`, clipped.
    pub fn brightness(buf: &mut [f32], f: f32) {
        for x in buf.iter_mut() {
            *x = clamp01(*x * f);
        }
    }
}

multiversion! {
    /// Brightness, `v1`: `x + d`, clipped.
    pub fn brightness_add(buf: &mut [f32], d: f32) {
        for x in buf.iter_mut() {
            *x = clamp01(*x + d);
        }
    }
}

multiversion! {
    /// Per-channel means of a planar RGB buffer.
    pub fn channel_means(buf: &[f32]) -> [f32; 3] {
        let n = buf.len() / 3;
        let inv = 1.0 / n.max(1) as f64;
        [0, 1, 2].map(|c| (sum(&buf[c * n..(c + 1) * n]) * inv) as f32)
    }
}

multiversion! {
    /// `(x - m) * f + m` with the mean `m` of each channel, clipped.
    pub fn contrast_around(buf: &mut [f32], f: f32, m: [f32; 3]) {
        let (r, g, b) = planes(buf);
        for (plane, m) in [r, g, b].into_iter().zip(m) {
            for x in plane.iter_mut() {
                *x = clamp01((*x - m) * f + m);
            }
        }
    }
}

/// Contrast: `(x - mean) * f + mean`, clipped; the mean is per channel (`channel`) or the mean
/// of the grayscale image with `weights` (`gray`).
pub fn contrast(buf: &mut [f32], f: f32, mean: ContrastMean, weights: [f32; 3]) {
    let m = channel_means(buf);
    let m = match mean {
        ContrastMean::Channel => m,
        ContrastMean::Gray => [weights[0] * m[0] + weights[1] * m[1] + weights[2] * m[2]; 3],
    };
    contrast_around(buf, f, m);
}

multiversion! {
    /// Saturation in HSV: S multiplied by `f` and clipped to [0, 1], H and V kept
    /// (`tf.image.adjust_saturation`). Per channel that is `v - (v - x) * q` with
    /// q = min(f, v / (v - min)): the HSV round trip without computing H.
    pub fn saturation_hsv(buf: &mut [f32], f: f32) {
        let (r, g, b) = planes(buf);
        for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
            let v = fmax(fmax(*r, *g), *b);
            let c = v - fmin(fmin(*r, *g), *b);
            let q = if f * c <= v { f } else { v / c };
            *r = clamp01(v - (v - *r) * q);
            *g = clamp01(v - (v - *g) * q);
            *b = clamp01(v - (v - *b) * q);
        }
    }
}

multiversion! {
    /// Saturation as a blend with grayscale: `f * x + (1 - f) * gray`, clipped (torchvision).
    pub fn saturation_blend(buf: &mut [f32], f: f32, weights: [f32; 3]) {
        let (r, g, b) = planes(buf);
        let [wr, wg, wb] = weights.map(|w| w * (1.0 - f));
        for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
            let l = wr * *r + wg * *g + wb * *b;
            *r = clamp01(f * *r + l);
            *g = clamp01(f * *g + l);
            *b = clamp01(f * *b + l);
        }
    }
}

/// Saturation by factor `f` (1 = unchanged, 0 = gray).
pub fn saturation(buf: &mut [f32], f: f32, mode: SaturationMode, weights: [f32; 3]) {
    match mode {
        SaturationMode::Hsv => saturation_hsv(buf, f),
        SaturationMode::Blend => saturation_blend(buf, f, weights),
    }
}

multiversion! {
    /// Hue rotation by `shift` of a full turn, clipped: RGB -> HSV (H in [0, 6)), H += 6 shift
    /// (mod 6), HSV -> RGB with the `tf.image` formulas. S and V do not change, so the channels
    /// come back as `min + (max - min) * d(H)`.
    pub fn hue(buf: &mut [f32], shift: f32) {
        // With the shift in [-1/2, 1/2] of a turn, H + 6 shift lies in [-4, 8): two selects wrap it.
        let s6 = (shift - shift.round()) * 6.0;
        let (r, g, b) = planes(buf);
        for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
            let (x, y, z) = (*r, *g, *b);
            let v = fmax(fmax(x, y), z);
            let mn = fmin(fmin(x, y), z);
            let c = v - mn;
            let inv = if c > 0.0 { 1.0 / c } else { 0.0 };
            let h = if v == x {
                (y - z) * inv
            } else if v == y {
                (z - x) * inv + 2.0
            } else {
                (x - y) * inv + 4.0
            };
            let h = h + s6;
            let h = if h < 0.0 { h + 6.0 } else { h };
            let h = if h >= 6.0 { h - 6.0 } else { h };
            *r = clamp01(mn + c * clamp01((h - 3.0).abs() - 1.0));
            *g = clamp01(mn + c * clamp01(2.0 - (h - 2.0).abs()));
            *b = clamp01(mn + c * clamp01(2.0 - (h - 4.0).abs()));
        }
    }
}

multiversion! {
    /// Grayscale: the luma `w . rgb` replicated to the three channels.
    pub fn grayscale(buf: &mut [f32], weights: [f32; 3]) {
        let (r, g, b) = planes(buf);
        let [wr, wg, wb] = weights;
        for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
            let l = clamp01(wr * *r + wg * *g + wb * *b);
            *r = l;
            *g = l;
            *b = l;
        }
    }
}

multiversion! {
    /// Interleaved u8 RGB -> planar f32 in [0, 1].
    pub fn load_planar(src: &[u8], dst: &mut Vec<f32>) {
        if dst.len() != src.len() {
            dst.clear();
            dst.resize(src.len(), 0.0);
        }
        let (r, g, b) = planes(dst);
        for (((px, r), g), b) in src.chunks_exact(3).zip(r.iter_mut()).zip(g.iter_mut()).zip(b.iter_mut()) {
            *r = to_unit(px[0]);
            *g = to_unit(px[1]);
            *b = to_unit(px[2]);
        }
    }
}

multiversion! {
    /// Planar f32 in [0, 1] -> interleaved u8 RGB, rounding half up.
    pub fn store_planar(src: &[f32], dst: &mut [u8]) {
        let n = src.len() / 3;
        let (r, g, b) = (&src[..n], &src[n..2 * n], &src[2 * n..3 * n]);
        for (((px, &r), &g), &b) in dst.chunks_exact_mut(3).zip(r).zip(g).zip(b) {
            px[0] = to_u8(r);
            px[1] = to_u8(g);
            px[2] = to_u8(b);
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on the view as a planar RGB f32 buffer in [0, 1] (a per-thread scratch buffer, so
/// nothing is allocated per call), then writes it back rounded to u8.
pub fn with_f32<R>(img: &mut Image, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| s.take());
    load_planar(&img.data, &mut buf);
    let out = f(&mut buf);
    store_planar(&buf, &mut img.data);
    SCRATCH.with(|s| s.replace(buf));
    out
}
