//! Color augmentations: `color_distort` (SimCLR's composite: jitter with p = 0.8, then grayscale
//! with p = 0.2), `color_jitter` and `random_grayscale`, and the math they share.
//!
//! The math works on planar RGB `f32` buffers with values in [0, 1]: the `n` red values, then
//! the `n` green, then the `n` blue (CHW). Every op clips to [0, 1] afterwards, as the official
//! code does after each op. A stage converts its interleaved u8 view to planar `f32` once (into a
//! per-thread scratch buffer, see [`with_f32`]), runs its ops, and rounds back to u8 once
//! (`(x * 255 + 0.5) as u8`).
//!
//! Speed: each op is one pass over the buffer with branch-free arithmetic, so the compiler
//! vectorizes it, and every hot function is also compiled for AVX2 and AVX-512 and picked at
//! run time. Only elementwise IEEE arithmetic is used (no fused multiply-add, sums in a fixed
//! order), so all builds give identical bits.

use std::cell::RefCell;
use std::sync::Arc;

use rand::Rng;
use serde::Deserialize;
use simclr_core::{
    Context, Image, MapStage, PortType, Problem, Role, Sample, SampleCtx, Stage, StageConfig, StageError,
    StageRng,
};

use super::{check_p, check_views, for_each_view};

pub(crate) use simclr_core::multiversion;

/// Brightness as the official code's `impl` flag.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BrightnessMode {
    /// `simclrv2` (the code's default): multiply by f ~ U(max(0, 1 - b), 1 + b).
    #[default]
    V2,
    /// `simclrv1` (`tf.image.random_brightness`): add d ~ U(-b, b).
    V1,
}

/// The mean that contrast scales around.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ContrastMean {
    /// Per-channel mean (`tf.image.adjust_contrast`, the official code).
    #[default]
    Channel,
    /// Mean of the grayscale image, for all channels (torchvision).
    Gray,
}

/// How saturation is changed.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SaturationMode {
    /// Multiply S in HSV by the factor, clipping S to [0, 1] (`tf.image.adjust_saturation`, the
    /// official code).
    #[default]
    Hsv,
    /// Blend with the grayscale image: `f * x + (1 - f) * gray` (torchvision).
    Blend,
}

/// Luma weights for grayscale.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GrayWeights {
    /// 0.2989, 0.5870, 0.1140 (`tf.image.rgb_to_grayscale`, the official code).
    #[default]
    Tf,
    /// 0.299, 0.587, 0.114 (ITU-R BT.601, PIL and torchvision on PIL images).
    Itu601,
}

impl GrayWeights {
    pub fn weights(self) -> [f32; 3] {
        match self {
            GrayWeights::Tf => [0.2989, 0.5870, 0.1140],
            GrayWeights::Itu601 => [0.299, 0.587, 0.114],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar helpers (branch-free selects that compile to min/max instructions).

#[inline(always)]
fn fmax(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

#[inline(always)]
fn fmin(a: f32, b: f32) -> f32 {
    if a < b {
        a
    } else {
        b
    }
}

/// Clips to [0, 1]; NaN becomes 0.
#[inline(always)]
pub(crate) fn clamp01(x: f32) -> f32 {
    fmin(fmax(x, 0.0), 1.0)
}

/// A draw from U(lo, hi) (`lo` when the range is empty); never panics.
#[inline]
pub(crate) fn uniform(rng: &mut StageRng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.random::<f32>()
}

/// u8 -> [0, 1] (`b * (1/255)`; rounds back to `b` exactly through [`to_u8`]).
#[inline(always)]
pub fn to_unit(b: u8) -> f32 {
    f32::from(b) * (1.0 / 255.0)
}

/// [0, 1] -> u8, rounding half up (values outside [0, 1], and NaN, are clipped first).
#[inline(always)]
pub fn to_u8(x: f32) -> u8 {
    let y = clamp01(x) * 255.0 + 0.5;
    // SAFETY: y is finite and in [0.5, 255.5], so it fits an i32. (A plain saturating `as u8`
    // does not vectorize and costs 6x more.)
    unsafe { y.to_int_unchecked::<i32>() as u8 }
}

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

/// Checks that a view's buffer matches its size.
pub(crate) fn check_image(img: &Image) -> Result<(), StageError> {
    if img.data.len() != img.pixels() * 3 {
        return Err(StageError::fatal(format!(
            "a {}x{} view has {} bytes, not {}",
            img.width,
            img.height,
            img.data.len(),
            img.pixels() * 3
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Color jitter: four ops in a (random) order.

/// The jitter's settings: each op's maximum change (0 = skip that op) and its variants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Jitter {
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    pub brightness_mode: BrightnessMode,
    pub contrast_mean: ContrastMean,
    pub saturation_mode: SaturationMode,
    pub gray_weights: GrayWeights,
    pub random_order: bool,
}

/// One view's draw of the jitter: factors of brightness (or its offset in `v1`), contrast,
/// saturation, the hue shift, and the order of the ops (0..4 in that numbering).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JitterDraw {
    pub factors: [f32; 4],
    pub order: [usize; 4],
}

fn factor(rng: &mut StageRng, max_delta: f32) -> f32 {
    uniform(rng, (1.0 - max_delta).max(0.0), 1.0 + max_delta)
}

impl Jitter {
    /// The SimCLR jitter at strength `s`: 0.8s, 0.8s, 0.8s, 0.2s.
    pub fn simclr(s: f32) -> Self {
        Jitter {
            brightness: 0.8 * s,
            contrast: 0.8 * s,
            saturation: 0.8 * s,
            hue: 0.2 * s,
            brightness_mode: BrightnessMode::V2,
            contrast_mean: ContrastMean::Channel,
            saturation_mode: SaturationMode::Hsv,
            gray_weights: GrayWeights::Tf,
            random_order: true,
        }
    }

    /// Draws the factors (always all four, in a fixed order) and the order of the ops.
    pub fn draw(&self, rng: &mut StageRng) -> JitterDraw {
        let b = match self.brightness_mode {
            BrightnessMode::V2 => factor(rng, self.brightness),
            BrightnessMode::V1 => uniform(rng, -self.brightness, self.brightness),
        };
        let c = factor(rng, self.contrast);
        let s = factor(rng, self.saturation);
        let h = uniform(rng, -self.hue, self.hue);
        let mut order = [0, 1, 2, 3];
        if self.random_order {
            for i in (1..4).rev() {
                let j = rng.random_range(0..=i);
                order.swap(i, j);
            }
        }
        JitterDraw { factors: [b, c, s, h], order }
    }

    /// Runs the drawn ops in order; ops whose maximum change is 0 are skipped.
    pub fn apply(&self, d: &JitterDraw, buf: &mut [f32]) {
        let w = self.gray_weights.weights();
        for &op in &d.order {
            let f = d.factors[op];
            match op {
                0 if self.brightness > 0.0 => match self.brightness_mode {
                    BrightnessMode::V2 => brightness(buf, f),
                    BrightnessMode::V1 => brightness_add(buf, f),
                },
                1 if self.contrast > 0.0 => contrast(buf, f, self.contrast_mean, w),
                2 if self.saturation > 0.0 => saturation(buf, f, self.saturation_mode, w),
                3 if self.hue > 0.0 => hue(buf, f),
                _ => {}
            }
        }
    }
}

fn check_nonneg(field: &str, v: f32, max: f32, out: &mut Vec<Problem>) {
    if !(0.0..=max).contains(&v) {
        out.push(Problem::new(
            field,
            format!("`{field}` = {v} is out of range"),
            format!("use a value from 0 to {max}"),
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Stages.

fn one() -> f32 {
    1.0
}
fn p_jitter() -> f32 {
    0.8
}
fn p_gray() -> f32 {
    0.2
}
fn yes() -> bool {
    true
}
fn jitter_08() -> f32 {
    0.8
}
fn hue_02() -> f32 {
    0.2
}

/// `color_distort`: SimCLR's color distortion at strength `s` (the paper's Appendix A code):
/// with p = 0.8 a color jitter (brightness, contrast, saturation 0.8s, hue 0.2s, in a random
/// order), then, independently, with p = 0.2 grayscale.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColorDistort {
    /// Strength s. Default 1.0 (the ImageNet recipe; CIFAR-10 uses 0.5, Table 1 sweeps 1/8..1).
    #[serde(default = "one")]
    pub strength: f32,
    /// Probability of the jitter. Default 0.8 (paper and code).
    #[serde(default = "p_jitter")]
    pub p_jitter: f32,
    /// Probability of grayscale, drawn independently of the jitter. Default 0.2 (paper and code).
    #[serde(default = "p_gray")]
    pub p_gray: f32,
    /// `v2` (default, the code's `simclrv2`: multiply by U(max(0, 1-0.8s), 1+0.8s)) or `v1`
    /// (`simclrv1`: add U(-0.8s, 0.8s)).
    #[serde(default)]
    pub brightness: BrightnessMode,
    /// `channel` (default, TF's per-channel mean, the code) or `gray` (torchvision).
    #[serde(default)]
    pub contrast_mean: ContrastMean,
    /// `hsv` (default, TF multiplies S in HSV, the code) or `blend` (torchvision: blend with gray).
    #[serde(default)]
    pub saturation_mode: SaturationMode,
    /// A fresh random order of the four jitter ops per view. Default true (paper and code).
    #[serde(default = "yes")]
    pub random_order: bool,
    /// `tf` (default: 0.2989, 0.5870, 0.1140, the code) or `itu601` (0.299, 0.587, 0.114).
    #[serde(default)]
    pub gray_weights: GrayWeights,
    /// Views to change (default: all).
    #[serde(default)]
    pub views: Option<Vec<u32>>,
}

impl ColorDistort {
    pub fn jitter(&self) -> Jitter {
        Jitter {
            brightness_mode: self.brightness,
            contrast_mean: self.contrast_mean,
            saturation_mode: self.saturation_mode,
            gray_weights: self.gray_weights,
            random_order: self.random_order,
            ..Jitter::simclr(self.strength)
        }
    }
}

impl StageConfig for ColorDistort {
    const KIND: &'static str = "color_distort";
    const ABOUT: &'static str =
        "SimCLR color distortion: jitter (p 0.8, strength s, random order), then grayscale (p 0.2)";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Views, PortType::Views)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        if !(0.0..=2.5).contains(&self.strength) {
            out.push(Problem::new(
                "strength",
                format!("`strength` = {} is out of range", self.strength),
                "use a value from 0 to 2.5 (the hue shift 0.2s must stay within half a turn); the paper uses 1",
            ));
        }
        check_p("p_jitter", self.p_jitter, out);
        check_p("p_gray", self.p_gray, out);
        check_views(self.views.as_deref(), out);
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Map(Arc::new(self.clone())))
    }
}

impl MapStage for ColorDistort {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        let jitter = self.jitter();
        let weights = self.gray_weights.weights();
        for_each_view(sample, self.views.as_deref(), ctx, |img, rng| {
            check_image(img)?;
            let do_jitter = rng.random::<f32>() < self.p_jitter;
            let draw = jitter.draw(rng);
            let do_gray = rng.random::<f32>() < self.p_gray;
            if do_jitter || do_gray {
                with_f32(img, |buf| {
                    if do_jitter {
                        jitter.apply(&draw, buf);
                    }
                    if do_gray {
                        grayscale(buf, weights);
                    }
                });
            }
            Ok(())
        })
    }
}

/// `color_jitter`: the jitter alone, with explicit maximum changes (torchvision's `ColorJitter`
/// inside `RandomApply`). The defaults are SimCLR's at s = 1, so `color_jitter` followed by
/// `random_grayscale` is the same recipe as `color_distort` (except for one more rounding to u8).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColorJitter {
    /// Brightness factor ~ U(max(0, 1-b), 1+b) (`v2`) or offset ~ U(-b, b) (`v1`); 0 = off.
    /// Default 0.8 (SimCLR, s = 1).
    #[serde(default = "jitter_08")]
    pub brightness: f32,
    /// Contrast factor ~ U(max(0, 1-c), 1+c); 0 = off. Default 0.8 (SimCLR, s = 1).
    #[serde(default = "jitter_08")]
    pub contrast: f32,
    /// Saturation factor ~ U(max(0, 1-s), 1+s); 0 = off. Default 0.8 (SimCLR, s = 1).
    #[serde(default = "jitter_08")]
    pub saturation: f32,
    /// Hue shift ~ U(-h, h) of a full turn, at most 0.5; 0 = off. Default 0.2 (SimCLR, s = 1).
    #[serde(default = "hue_02")]
    pub hue: f32,
    /// Probability of applying the jitter. Default 0.8 (SimCLR).
    #[serde(default = "p_jitter")]
    pub p: f32,
    /// A fresh random order of the four ops per view. Default true (SimCLR and torchvision).
    #[serde(default = "yes")]
    pub random_order: bool,
    /// `v2` (default, multiply) or `v1` (add); see `color_distort`.
    #[serde(default)]
    pub brightness_mode: BrightnessMode,
    /// `channel` (default, TF) or `gray` (torchvision).
    #[serde(default)]
    pub contrast_mean: ContrastMean,
    /// `hsv` (default, TF) or `blend` (torchvision).
    #[serde(default)]
    pub saturation_mode: SaturationMode,
    /// Luma weights for `gray` contrast and `blend` saturation: `tf` (default) or `itu601`.
    #[serde(default)]
    pub gray_weights: GrayWeights,
    /// Views to change (default: all).
    #[serde(default)]
    pub views: Option<Vec<u32>>,
}

impl ColorJitter {
    pub fn jitter(&self) -> Jitter {
        Jitter {
            brightness: self.brightness,
            contrast: self.contrast,
            saturation: self.saturation,
            hue: self.hue,
            brightness_mode: self.brightness_mode,
            contrast_mean: self.contrast_mean,
            saturation_mode: self.saturation_mode,
            gray_weights: self.gray_weights,
            random_order: self.random_order,
        }
    }
}

impl StageConfig for ColorJitter {
    const KIND: &'static str = "color_jitter";
    const ABOUT: &'static str = "color jitter (brightness, contrast, saturation, hue) with probability p";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Views, PortType::Views)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        check_nonneg("brightness", self.brightness, 10.0, out);
        check_nonneg("contrast", self.contrast, 10.0, out);
        check_nonneg("saturation", self.saturation, 10.0, out);
        check_nonneg("hue", self.hue, 0.5, out);
        check_p("p", self.p, out);
        check_views(self.views.as_deref(), out);
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Map(Arc::new(self.clone())))
    }
}

impl MapStage for ColorJitter {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        let jitter = self.jitter();
        for_each_view(sample, self.views.as_deref(), ctx, |img, rng| {
            check_image(img)?;
            let go = rng.random::<f32>() < self.p;
            let draw = jitter.draw(rng);
            if go {
                with_f32(img, |buf| jitter.apply(&draw, buf));
            }
            Ok(())
        })
    }
}

/// `random_grayscale`: with probability p, the luma replicated to three channels.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomGrayscale {
    /// Probability. Default 0.2 (SimCLR).
    #[serde(default = "p_gray")]
    pub p: f32,
    /// `tf` (default: 0.2989, 0.5870, 0.1140, the code) or `itu601` (0.299, 0.587, 0.114).
    #[serde(default)]
    pub weights: GrayWeights,
    /// Views to change (default: all).
    #[serde(default)]
    pub views: Option<Vec<u32>>,
}

impl StageConfig for RandomGrayscale {
    const KIND: &'static str = "random_grayscale";
    const ABOUT: &'static str = "grayscale with probability p (luma replicated to 3 channels)";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Views, PortType::Views)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        check_p("p", self.p, out);
        check_views(self.views.as_deref(), out);
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Map(Arc::new(self.clone())))
    }
}

impl MapStage for RandomGrayscale {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        let w = self.weights.weights();
        for_each_view(sample, self.views.as_deref(), ctx, |img, rng| {
            check_image(img)?;
            if rng.random::<f32>() < self.p {
                with_f32(img, |buf| grayscale(buf, w));
            }
            Ok(())
        })
    }
}

/// Helpers for the stage tests of this module and its siblings.
#[cfg(test)]
pub(crate) mod testing {
    use proptest::prelude::*;
    use simclr_core::{Image, MapStage, Payload, Sample, SampleCtx};

    pub fn ctx(seed: u64, index: u64) -> SampleCtx {
        SampleCtx { seed, stage_key: 0xA5A5, epoch: 0, index }
    }

    /// Runs a stage on a sample holding `views`, returning the views.
    pub fn run(stage: &dyn MapStage, views: Vec<Image>, seed: u64, index: u64) -> Vec<Image> {
        let mut s = Sample { index, payload: Payload::Views(views), ..Sample::default() };
        stage.apply(&mut s, &ctx(seed, index)).expect("the stage failed");
        match s.payload {
            Payload::Views(v) => v,
            other => panic!("the stage changed the payload to {other:?}"),
        }
    }

    /// Random images from 1x1 to `max` x `max`.
    pub fn image(max: u32) -> impl Strategy<Value = Image> {
        (1..=max, 1..=max).prop_flat_map(|(w, h)| {
            proptest::collection::vec(any::<u8>(), (w * h * 3) as usize)
                .prop_map(move |data| Image::from_raw(w, h, data).unwrap())
        })
    }

    /// A deterministic pseudo-random image.
    pub fn noise_image(w: u32, h: u32, seed: u64) -> Image {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data = (0..w * h * 3)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        Image::from_raw(w, h, data).unwrap()
    }

    /// Every view's buffer matches its size.
    pub fn well_formed(views: &[Image]) -> bool {
        views.iter().all(|v| v.data.len() == v.width as usize * v.height as usize * 3)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use proptest::prelude::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-6
    }

    fn assert_buf(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(close(g, w), "value {i}: got {g}, want {w}");
        }
    }

    /// A small hand-made image, as pixels.
    fn pixels() -> Vec<[f32; 3]> {
        vec![
            [0.1, 0.5, 0.9],
            [1.0, 0.0, 0.0],
            [0.3, 0.3, 0.3],
            [0.9, 0.8, 0.1],
            [0.0, 0.0, 0.0],
            [1.0, 1.0, 1.0],
            [0.25, 0.75, 0.5],
            [0.6, 0.2, 0.4],
            [0.05, 0.95, 0.45],
            [0.7, 0.7, 0.2],
            [0.2, 0.4, 0.6],
        ]
    }

    /// Pixels -> a planar buffer.
    fn planar(px: &[[f32; 3]]) -> Vec<f32> {
        (0..3).flat_map(|c| px.iter().map(move |p| p[c])).collect()
    }

    /// A planar buffer -> pixels.
    fn unplanar(buf: &[f32]) -> Vec<[f32; 3]> {
        let n = buf.len() / 3;
        (0..n).map(|i| [buf[i], buf[n + i], buf[2 * n + i]]).collect()
    }

    fn sample_buf() -> Vec<f32> {
        planar(&pixels())
    }

    /// Applies `f` to every pixel of `pixels()`, as a planar buffer.
    fn expect(f: impl Fn([f32; 3]) -> [f32; 3]) -> Vec<f32> {
        planar(&pixels().into_iter().map(f).collect::<Vec<_>>())
    }

    #[test]
    fn brightness_multiplies_and_clips() {
        for f in [0.2f32, 0.9, 1.7] {
            let mut buf = sample_buf();
            let want: Vec<f32> = buf.iter().map(|&x| (x * f).clamp(0.0, 1.0)).collect();
            brightness(&mut buf, f);
            assert_buf(&buf, &want);
        }
        let mut buf = sample_buf();
        let want: Vec<f32> = buf.iter().map(|&x| (x - 0.3).clamp(0.0, 1.0)).collect();
        brightness_add(&mut buf, -0.3);
        assert_buf(&buf, &want);
    }

    #[test]
    fn contrast_scales_around_the_channel_or_gray_mean() {
        let w = GrayWeights::Tf.weights();
        let px = pixels();
        let n = px.len() as f32;
        let m: Vec<f32> = (0..3).map(|c| px.iter().map(|p| p[c]).sum::<f32>() / n).collect();
        let gray = w[0] * m[0] + w[1] * m[1] + w[2] * m[2];
        for f in [0.3f32, 1.6] {
            let mut buf = sample_buf();
            contrast(&mut buf, f, ContrastMean::Channel, w);
            assert_buf(&buf, &expect(|p| [0, 1, 2].map(|c| ((p[c] - m[c]) * f + m[c]).clamp(0.0, 1.0))));

            let mut buf = sample_buf();
            contrast(&mut buf, f, ContrastMean::Gray, w);
            assert_buf(&buf, &expect(|p| p.map(|x| ((x - gray) * f + gray).clamp(0.0, 1.0))));
        }
    }

    /// Reference RGB <-> HSV (the textbook formulas, written independently of the fast path).
    fn rgb_to_hsv([r, g, b]: [f32; 3]) -> [f32; 3] {
        let v = r.max(g).max(b);
        let mn = r.min(g).min(b);
        let c = v - mn;
        let s = if v > 0.0 { c / v } else { 0.0 };
        let h = if c == 0.0 {
            0.0
        } else if v == r {
            ((g - b) / c).rem_euclid(6.0)
        } else if v == g {
            (b - r) / c + 2.0
        } else {
            (r - g) / c + 4.0
        };
        [h / 6.0, s, v]
    }

    fn hsv_to_rgb([h, s, v]: [f32; 3]) -> [f32; 3] {
        let h6 = h.rem_euclid(1.0) * 6.0;
        let c = v * s;
        let x = c * (1.0 - ((h6 % 2.0) - 1.0).abs());
        let (r, g, b) = match h6 as u32 {
            0 => (c, x, 0.0),
            1 => (x, c, 0.0),
            2 => (0.0, c, x),
            3 => (0.0, x, c),
            4 => (x, 0.0, c),
            _ => (c, 0.0, x),
        };
        let m = v - c;
        [r + m, g + m, b + m]
    }

    #[test]
    fn saturation_matches_hsv_and_blend_formulas() {
        let w = GrayWeights::Itu601.weights();
        for f in [0.0f32, 0.4, 1.0, 1.8] {
            let mut buf = sample_buf();
            saturation(&mut buf, f, SaturationMode::Hsv, w);
            let want = expect(|p| {
                let [h, s, v] = rgb_to_hsv(p);
                hsv_to_rgb([h, (s * f).clamp(0.0, 1.0), v])
            });
            for (i, (&g, &e)) in buf.iter().zip(&want).enumerate() {
                assert!((g - e).abs() < 1e-5, "f {f} value {i}: got {g}, want {e}");
            }

            let mut buf = sample_buf();
            saturation(&mut buf, f, SaturationMode::Blend, w);
            assert_buf(
                &buf,
                &expect(|p| {
                    let l = w[0] * p[0] + w[1] * p[1] + w[2] * p[2];
                    p.map(|x| (f * x + (1.0 - f) * l).clamp(0.0, 1.0))
                }),
            );
        }
    }

    #[test]
    fn hue_third_turn_maps_red_to_green_to_blue() {
        let (red, green, blue) = ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]);
        let mut buf = planar(&[red, green, blue]);
        hue(&mut buf, 1.0 / 3.0);
        assert_buf(&buf, &planar(&[green, blue, red]));
        hue(&mut buf, -1.0 / 3.0);
        assert_buf(&buf, &planar(&[red, green, blue]));
        hue(&mut buf, 2.0 / 3.0);
        assert_buf(&buf, &planar(&[blue, red, green]));
    }

    #[test]
    fn hue_matches_the_hsv_round_trip() {
        for shift in [-0.5f32, -0.2, 0.07, 0.2, 0.45, 0.5, 1.3] {
            let mut buf = sample_buf();
            hue(&mut buf, shift);
            let want = expect(|p| {
                let [h, s, v] = rgb_to_hsv(p);
                hsv_to_rgb([h + shift, s, v])
            });
            for (i, (&g, &e)) in buf.iter().zip(&want).enumerate() {
                assert!((g - e).abs() < 1e-5, "shift {shift} value {i}: got {g}, want {e}");
            }
        }
    }

    #[test]
    fn grayscale_is_the_weighted_sum() {
        for weights in [GrayWeights::Tf, GrayWeights::Itu601] {
            let w = weights.weights();
            let mut buf = sample_buf();
            grayscale(&mut buf, w);
            for (p, q) in pixels().iter().zip(unplanar(&buf)) {
                let l = w[0] * p[0] + w[1] * p[1] + w[2] * p[2];
                assert!(q.iter().all(|&x| close(x, l.min(1.0))), "{p:?} -> {q:?}, want {l}");
            }
        }
    }

    #[test]
    fn planar_load_and_store_round_trip() {
        let img = noise_image(5, 3, 9);
        let mut buf = Vec::new();
        load_planar(&img.data, &mut buf);
        for (p, q) in img.data.chunks(3).zip(unplanar(&buf)) {
            for c in 0..3 {
                assert!(close(q[c], f32::from(p[c]) / 255.0), "{p:?} -> {q:?}");
            }
        }
        let mut out = vec![0u8; img.data.len()];
        store_planar(&buf, &mut out);
        assert_eq!(out, img.data);
        let mut same = img.clone();
        with_f32(&mut same, |_| ());
        assert_eq!(same, img);
    }

    #[test]
    fn u8_round_trip_is_exact_and_rounds_half_up() {
        for b in 0..=255u8 {
            assert_eq!(to_u8(to_unit(b)), b);
        }
        assert_eq!(to_u8(0.5 / 255.0 + 1e-6), 1);
        assert_eq!(to_u8(0.49 / 255.0), 0);
        assert_eq!(to_u8(1.5), 255);
        assert_eq!(to_u8(-0.5), 0);
    }

    #[test]
    fn channel_means_are_exact_on_a_long_buffer() {
        let n = 100_001;
        let buf: Vec<f32> = (0..3 * n).map(|i| ((i * 7) % 13) as f32 / 13.0).collect();
        let got = channel_means(&buf);
        for (c, &g) in got.iter().enumerate() {
            let want = buf[c * n..(c + 1) * n].iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
            assert!((f64::from(g) - want).abs() < 1e-5, "channel {c}: {g} vs {want}");
        }
    }

    #[test]
    fn jitter_draws_stay_in_range_and_orders_are_permutations() {
        let j = Jitter::simclr(1.0);
        let mut seen_orders = std::collections::HashSet::new();
        for i in 0..2000 {
            let mut rng = ctx(3, i).rng(0);
            let d = j.draw(&mut rng);
            let [b, c, s, h] = d.factors;
            for f in [b, c, s] {
                assert!((0.2..=1.8).contains(&f), "factor {f}");
            }
            assert!((-0.2..=0.2).contains(&h));
            let mut o = d.order;
            o.sort_unstable();
            assert_eq!(o, [0, 1, 2, 3]);
            seen_orders.insert(d.order);
        }
        assert_eq!(seen_orders.len(), 24, "every order of the four ops occurs");
        let fixed = Jitter { random_order: false, ..j };
        assert_eq!(fixed.draw(&mut ctx(3, 0).rng(0)).order, [0, 1, 2, 3]);
    }

    #[test]
    fn distort_rates_follow_p_jitter_and_p_gray() {
        let stage = ColorDistort {
            strength: 1.0,
            p_jitter: 0.8,
            p_gray: 0.2,
            brightness: BrightnessMode::V2,
            contrast_mean: ContrastMean::Channel,
            saturation_mode: SaturationMode::Hsv,
            random_order: true,
            gray_weights: GrayWeights::Tf,
            views: None,
        };
        let img = noise_image(4, 4, 1);
        let (mut changed, mut gray) = (0, 0);
        let n = 1000;
        for i in 0..n {
            let out = run(&stage, vec![img.clone()], 9, i);
            changed += usize::from(out[0] != img);
            gray += usize::from(out[0].data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        }
        // Changed unless neither fires: 1 - 0.2 * 0.8 = 0.84.
        assert!((780..=900).contains(&changed), "changed {changed} of {n}");
        assert!((150..=250).contains(&gray), "gray {gray} of {n}");
    }

    #[test]
    fn distort_is_deterministic_and_views_are_independent() {
        let stage: ColorDistort = serde_json::from_value(serde_json::json!({"p_jitter": 1.0})).unwrap();
        let img = noise_image(9, 7, 2);
        let a = run(&stage, vec![img.clone(), img.clone()], 5, 3);
        let b = run(&stage, vec![img.clone(), img.clone()], 5, 3);
        assert_eq!(a, b);
        assert_ne!(a[0], a[1]);
        let c = run(&stage, vec![img.clone(), img.clone()], 6, 3);
        assert_ne!(a, c);
        let only0: ColorDistort =
            serde_json::from_value(serde_json::json!({"p_jitter": 1.0, "views": [0]})).unwrap();
        let d = run(&only0, vec![img.clone(), img.clone()], 5, 3);
        assert_eq!(d[0], a[0]);
        assert_eq!(d[1], img);
    }

    #[test]
    fn configs_parse_with_defaults_and_reject_unknown_fields() {
        let d: ColorDistort = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(d.jitter(), Jitter::simclr(1.0));
        assert_eq!((d.p_jitter, d.p_gray), (0.8, 0.2));
        let j: ColorJitter = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(j.jitter(), Jitter::simclr(1.0));
        assert!(serde_json::from_value::<ColorDistort>(serde_json::json!({"strenght": 1.0})).is_err());
        assert!(serde_json::from_value::<RandomGrayscale>(serde_json::json!({"weights": "bt709"})).is_err());
        let cx = Context {
            base_dir: ".".into(),
            seed: 0,
            stage_id: "c".into(),
            run_dir: None,
            ..Context::default()
        };
        let bad: ColorJitter = serde_json::from_value(serde_json::json!({"hue": 0.7, "p": 2.0})).unwrap();
        let mut out = Vec::new();
        bad.check(&cx, &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn color_stages_keep_sizes(img in image(64), seed in any::<u64>()) {
            let distort: ColorDistort = serde_json::from_value(serde_json::json!({"p_gray": 0.5})).unwrap();
            let jit: ColorJitter =
                serde_json::from_value(serde_json::json!({"p": 1.0, "brightness_mode": "v1",
                    "contrast_mean": "gray", "saturation_mode": "blend"})).unwrap();
            let gray: RandomGrayscale = serde_json::from_value(serde_json::json!({"p": 1.0})).unwrap();
            for stage in [&distort as &dyn MapStage, &jit, &gray] {
                let out = run(stage, vec![img.clone()], seed, 0);
                prop_assert!(well_formed(&out));
                prop_assert_eq!((out[0].width, out[0].height), (img.width, img.height));
            }
        }
    }
}
