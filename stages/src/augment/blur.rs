//! `gaussian_blur`: the official code's random blur.
//!
//! With probability p, sigma ~ U(0.1, 2.0); the kernel side is 10% of the image side rounded
//! down (`image_size // 10`), radius = side / 2, so 224 -> 22 -> radius 11 -> 23 taps. Weights
//! `exp(-x^2 / (2 sigma^2))`, normalized. Separable: a horizontal then a vertical pass, zero
//! padding by default (TF's `depthwise_conv2d` with `SAME`).
//!
//! Speed: both passes run on f32 with the kernel's symmetry (one multiply per pair of taps), over
//! blocks of 32 outputs whose sums stay in registers across all taps (the vertical pass reads
//! whole rows), compiled for AVX2 or AVX-512 when the CPU has it. Taps whose normalized weight
//! is below 1e-7 (the far tails of small sigmas) are skipped: together they change no output by more than
//! 0.002 of a level before rounding, and they halve the work on average.

use std::cell::RefCell;
use std::sync::Arc;

use rand::Rng;
use serde::Deserialize;
use simclr_core::{
    Context, Image, MapStage, PortType, Problem, Role, Sample, SampleCtx, Stage, StageConfig, StageError,
};

use super::pixel::{check_image, uniform};
use super::{check_p, check_views, for_each_view};
use simclr_core::multiversion;

/// What lies beyond the image's edges.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// Zeros (TF's `SAME` convolution, the official code): edges darken a little.
    #[default]
    Zero,
    /// Mirror without repeating the edge pixel (`dcb|abcd|cba`, torchvision's `reflect`).
    Reflect,
}

fn half() -> f32 {
    0.5
}
fn default_sigma() -> [f32; 2] {
    [0.1, 2.0]
}
fn tenth() -> f64 {
    0.1
}

/// `gaussian_blur`: blur with a random sigma.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GaussianBlur {
    /// Probability per view. Default 0.5 (paper and code, ImageNet; CIFAR-10 uses no blur).
    #[serde(default = "half")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub p: f32,
    /// Range of sigma in pixels, drawn uniformly. Default [0.1, 2.0] (paper and code).
    #[serde(default = "default_sigma")]
    pub sigma: [f32; 2],
    /// Kernel side as a fraction of the shorter image side, rounded down; radius = side / 2.
    /// Default 0.1 (the code's `image_size // 10`: 23 taps at 224).
    #[serde(default = "tenth")]
    pub kernel_fraction: f64,
    /// `zero` (default: TF's `SAME` padding, the code) or `reflect` (torchvision).
    #[serde(default)]
    pub padding: Padding,
    /// Views to blur (default: all).
    #[serde(default)]
    pub views: Option<Vec<u32>>,
}

/// The normalized Gaussian `exp(-x^2 / (2 sigma^2))` at x = -radius..=radius (the official
/// code's filter).
pub fn gaussian_kernel(sigma: f32, radius: usize) -> Vec<f32> {
    let s2 = 2.0 * sigma * sigma;
    let mut k: Vec<f32> = (0..=2 * radius)
        .map(|i| {
            let x = i as f32 - radius as f32;
            (-(x * x) / s2).exp()
        })
        .collect();
    let sum: f32 = k.iter().sum();
    for w in &mut k {
        *w /= sum;
    }
    k
}

/// The kernel radius for an image whose shorter side is `side`: `floor(side * fraction) / 2`.
pub fn kernel_radius(side: u32, fraction: f64) -> usize {
    // The epsilon absorbs fractions not exactly representable (0.7 * 10 = 6.9999...).
    ((f64::from(side) * fraction + 1e-9).floor() as usize) / 2
}

/// The kernel without tails whose weights are below 1e-7.
fn trimmed(k: &[f32]) -> &[f32] {
    let mut t = 0;
    while 2 * t + 1 < k.len() && k[t] < 1e-7 {
        t += 1;
    }
    &k[t..k.len() - t]
}

/// Index `i` mirrored into 0..n (`dcb|abcd|cba`).
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m >= n { period - m } else { m }) as usize
}

#[derive(Default)]
struct Scratch {
    tmp: Vec<f32>,
    pad: Vec<f32>,
    offsets: Vec<(usize, usize)>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Output values computed per block: their sums stay in registers across all taps.
const L: usize = 32;

multiversion! {
    /// Horizontal pass: rows of `data` (u8, width `w`) into `tmp` (f32), padded per `reflect_pad`.
    fn blur_rows(data: &[u8], w: usize, k: &[f32], reflect_pad: bool, tmp: &mut [f32], pad: &mut Vec<f32>) {
        let r = k.len() / 2;
        let (w3, kc, side) = (w * 3, k[r], &k[..r]);
        pad.clear();
        pad.resize((w + 2 * r) * 3, 0.0);
        for (row, out) in data.chunks_exact(w3).zip(tmp.chunks_exact_mut(w3)) {
            for (d, &s) in pad[3 * r..3 * r + w3].iter_mut().zip(row) {
                *d = f32::from(s);
            }
            if reflect_pad {
                for p in 0..r {
                    let (left, right) = (reflect(p as isize - r as isize, w), reflect((w + p) as isize, w));
                    for c in 0..3 {
                        pad[3 * p + c] = f32::from(row[3 * left + c]);
                        pad[3 * (r + w + p) + c] = f32::from(row[3 * right + c]);
                    }
                }
            }
            let mut i = 0;
            while i + L <= w3 {
                let c: &[f32; L] = pad[3 * r + i..3 * r + i + L].try_into().unwrap();
                let mut acc = [0f32; L];
                for l in 0..L {
                    acc[l] = kc * c[l];
                }
                for (j, &kj) in side.iter().enumerate() {
                    let (oa, ob) = (3 * j + i, 3 * (2 * r - j) + i);
                    let a: &[f32; L] = pad[oa..oa + L].try_into().unwrap();
                    let b: &[f32; L] = pad[ob..ob + L].try_into().unwrap();
                    for l in 0..L {
                        acc[l] += kj * (a[l] + b[l]);
                    }
                }
                out[i..i + L].copy_from_slice(&acc);
                i += L;
            }
            for (i, o) in out.iter_mut().enumerate().skip(i) {
                let mut s = kc * pad[3 * r + i];
                for (j, &kj) in side.iter().enumerate() {
                    s += kj * (pad[3 * j + i] + pad[3 * (2 * r - j) + i]);
                }
                *o = s;
            }
        }
    }
}

/// Pixel units -> u8, rounding half up.
///
/// SAFETY: `x` must be finite and in [0, 255.4]: a sum of u8 values with non-negative weights
/// summing to at most 1.0001 (checked by [`blur_image`]).
#[inline(always)]
unsafe fn round_u8(x: f32) -> u8 {
    // A plain saturating `as u8` (or clamping first) makes the vertical pass 1.5x slower.
    // SAFETY: the caller's contract: `x` is finite and in [0, 255.4], so `x + 0.5` fits an i32.
    unsafe { (x + 0.5).to_int_unchecked::<i32>() as u8 }
}

multiversion! {
    /// Vertical pass: `tmp` (h rows of `w3` f32, then a row of zeros) into `data` (u8). Rows
    /// beyond the edges are the zero row or mirrored rows.
    fn blur_cols(tmp: &[f32], w3: usize, h: usize, k: &[f32], reflect_pad: bool, data: &mut [u8], offsets: &mut Vec<(usize, usize)>) {
        let r = k.len() / 2;
        let (kc, side) = (k[r], &k[..r]);
        let start = |y: isize| -> usize {
            if (0..h as isize).contains(&y) {
                y as usize * w3
            } else if reflect_pad {
                reflect(y, h) * w3
            } else {
                h * w3
            }
        };
        for (y, out) in data.chunks_exact_mut(w3).enumerate() {
            let (y, c0) = (y as isize, y * w3);
            offsets.clear();
            offsets.extend((0..r).map(|j| (start(y - (r - j) as isize), start(y + (r - j) as isize))));
            let mut i = 0;
            while i + L <= w3 {
                let c: &[f32; L] = tmp[c0 + i..c0 + i + L].try_into().unwrap();
                let mut acc = [0f32; L];
                for l in 0..L {
                    acc[l] = kc * c[l];
                }
                for (&kj, &(oa, ob)) in side.iter().zip(offsets.iter()) {
                    let a: &[f32; L] = tmp[oa + i..oa + i + L].try_into().unwrap();
                    let b: &[f32; L] = tmp[ob + i..ob + i + L].try_into().unwrap();
                    for l in 0..L {
                        acc[l] += kj * (a[l] + b[l]);
                    }
                }
                let o: &mut [u8; L] = (&mut out[i..i + L]).try_into().unwrap();
                for l in 0..L {
                    // SAFETY: see `blur_image`.
                    o[l] = unsafe { round_u8(acc[l]) };
                }
                i += L;
            }
            for (i, o) in out.iter_mut().enumerate().skip(i) {
                let mut s = kc * tmp[c0 + i];
                for (&kj, &(oa, ob)) in side.iter().zip(offsets.iter()) {
                    s += kj * (tmp[oa + i] + tmp[ob + i]);
                }
                // SAFETY: see `blur_image`.
                *o = unsafe { round_u8(s) };
            }
        }
    }
}

/// Blurs an image with the separable kernel `k` in both directions.
///
/// Panics unless `k` has odd length and finite, non-negative weights summing to at most 1.0001
/// (as [`gaussian_kernel`] makes): that bound keeps every output in [0, 255].
pub fn blur_image(img: &mut Image, k: &[f32], padding: Padding) {
    assert!(
        k.len() % 2 == 1 && k.iter().all(|w| w.is_finite() && *w >= 0.0) && k.iter().sum::<f32>() <= 1.0001,
        "a blur kernel needs odd length and non-negative weights summing to at most 1"
    );
    let (w, h) = (img.width as usize, img.height as usize);
    if k.len() < 3 || w == 0 || h == 0 || img.data.len() != w * h * 3 {
        return;
    }
    let reflect_pad = padding == Padding::Reflect;
    let n = w * h * 3;
    let mut s = SCRATCH.with(|c| c.take());
    s.tmp.resize(n + w * 3, 0.0);
    s.tmp[n..].fill(0.0);
    blur_rows(&img.data, w, k, reflect_pad, &mut s.tmp[..n], &mut s.pad);
    blur_cols(&s.tmp, w * 3, h, k, reflect_pad, &mut img.data, &mut s.offsets);
    SCRATCH.with(|c| c.replace(s));
}

impl StageConfig for GaussianBlur {
    const KIND: &'static str = "gaussian_blur";
    const ABOUT: &'static str = "Gaussian blur with probability p, sigma ~ U(0.1, 2), kernel 10% of the side";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Views, PortType::Views)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        check_p("p", self.p, out);
        let [s0, s1] = self.sigma;
        if !(s0 > 0.0 && s0 <= s1 && s1 <= 100.0) {
            out.push(Problem::new(
                "sigma",
                format!("`sigma` = [{s0}, {s1}] is not a range of positive sigmas"),
                "write `sigma: [low, high]` with 0 < low <= high <= 100, e.g. [0.1, 2.0]",
            ));
        }
        if !(self.kernel_fraction > 0.0 && self.kernel_fraction <= 1.0) {
            out.push(Problem::new(
                "kernel_fraction",
                format!("`kernel_fraction` = {} is not in (0, 1]", self.kernel_fraction),
                "use 0.1 (the official code: a tenth of the image side)",
            ));
        }
        check_views(self.views.as_deref(), out);
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Map(Arc::new(self.clone())))
    }
}

impl MapStage for GaussianBlur {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        for_each_view(sample, self.views.as_deref(), ctx, |img, rng| {
            check_image(img)?;
            let go = rng.random::<f32>() < self.p;
            let sigma = uniform(rng, self.sigma[0], self.sigma[1]);
            let radius = kernel_radius(img.width.min(img.height), self.kernel_fraction);
            if go && radius > 0 {
                let k = gaussian_kernel(sigma, radius);
                blur_image(img, trimmed(&k), self.padding);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::testing::*;
    use proptest::prelude::*;

    #[test]
    fn kernel_is_normalized_symmetric_with_variance_sigma_squared() {
        for sigma in [0.1f32, 0.5, 1.0, 2.0] {
            let k = gaussian_kernel(sigma, 11);
            assert_eq!(k.len(), 23);
            assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            for i in 0..11 {
                assert_eq!(k[i], k[22 - i]);
            }
            assert!(k.windows(2).take(11).all(|p| p[0] <= p[1]), "rises to the center");
        }
        for sigma in [1.0f32, 2.0] {
            let r = 30;
            let k = gaussian_kernel(sigma, r);
            let var: f32 = k.iter().enumerate().map(|(i, &w)| w * (i as f32 - r as f32).powi(2)).sum();
            assert!((var / (sigma * sigma) - 1.0).abs() < 0.02, "sigma {sigma}: variance {var}");
        }
    }

    #[test]
    fn kernel_size_follows_the_official_code() {
        assert_eq!(kernel_radius(224, 0.1), 11);
        assert_eq!(kernel_radius(32, 0.1), 1);
        assert_eq!(kernel_radius(19, 0.1), 0);
        for side in 1..3000 {
            assert_eq!(kernel_radius(side, 0.1), (side as usize / 10) / 2, "side {side}");
        }
    }

    #[test]
    fn trimming_drops_only_negligible_tails() {
        let k = gaussian_kernel(0.5, 11);
        let t = trimmed(&k);
        assert!(t.len() % 2 == 1 && t.len() < k.len());
        let dropped: f32 = k.iter().sum::<f32>() - t.iter().sum::<f32>();
        assert!(dropped < 2e-6, "{dropped}");
        for sigma in [0.1f32, 0.7, 1.0, 2.0, 3.0] {
            let k = gaussian_kernel(sigma, 11);
            let t = trimmed(&k);
            let cut = (k.len() - t.len()) / 2;
            assert!(k[..cut].iter().all(|&w| w < 1e-7), "sigma {sigma}: only tiny taps go");
            assert!(t.len() == 1 || t[0] >= 1e-7, "sigma {sigma}: the kept edge tap counts");
        }
        assert_eq!(trimmed(&gaussian_kernel(3.0, 11)).len(), 23);
    }

    #[test]
    fn reflect_mirrors_without_repeating_the_edge() {
        let got: Vec<usize> = (-4..8).map(|i| reflect(i, 4)).collect();
        assert_eq!(got, [2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1]);
        assert_eq!(reflect(-3, 1), 0);
    }

    #[test]
    fn constant_image_is_unchanged_with_reflect_padding() {
        for sigma in [0.3f32, 1.0, 2.0] {
            let mut img = Image { width: 30, height: 24, data: [7u8, 128, 255].repeat(30 * 24) };
            let want = img.clone();
            blur_image(&mut img, &gaussian_kernel(sigma, 5), Padding::Reflect);
            assert_eq!(img, want);
            // Zero padding darkens the corner but not the middle.
            blur_image(&mut img, &gaussian_kernel(sigma, 5), Padding::Zero);
            assert!(img.data[2] < 255);
            let mid = (12 * 30 + 15) * 3;
            assert_eq!(img.data[mid..mid + 3], [7, 128, 255]);
        }
    }

    /// The blur against a direct 2-D convolution.
    #[test]
    fn separable_blur_matches_direct_convolution() {
        let (w, h) = (13usize, 9usize);
        let img = noise_image(w as u32, h as u32, 8);
        for padding in [Padding::Zero, Padding::Reflect] {
            let k = gaussian_kernel(1.3, 3);
            let r = 3isize;
            let mut got = img.clone();
            blur_image(&mut got, &k, padding);
            for y in 0..h as isize {
                for x in 0..w as isize {
                    for c in 0..3 {
                        let mut s = 0.0f64;
                        for dy in -r..=r {
                            for dx in -r..=r {
                                let (sx, sy) = (x + dx, y + dy);
                                let v = match padding {
                                    Padding::Zero
                                        if sx < 0 || sy < 0 || sx >= w as isize || sy >= h as isize =>
                                    {
                                        0.0
                                    }
                                    Padding::Zero => {
                                        f64::from(img.data[(sy as usize * w + sx as usize) * 3 + c])
                                    }
                                    Padding::Reflect => {
                                        f64::from(img.data[(reflect(sy, h) * w + reflect(sx, w)) * 3 + c])
                                    }
                                };
                                s += f64::from(k[(dy + r) as usize]) * f64::from(k[(dx + r) as usize]) * v;
                            }
                        }
                        let g = f64::from(got.data[(y as usize * w + x as usize) * 3 + c]);
                        assert!((g - s).abs() <= 0.5 + 1e-3, "{padding:?} ({x},{y},{c}): {g} vs {s}");
                    }
                }
            }
        }
    }

    #[test]
    fn blurs_about_half_the_views_and_is_deterministic() {
        let s: GaussianBlur = serde_json::from_value(serde_json::json!({})).unwrap();
        let img = noise_image(40, 40, 6);
        let outs: Vec<Image> = (0..400).map(|i| run(&s, vec![img.clone()], 2, i).remove(0)).collect();
        let blurred = outs.iter().filter(|o| **o != img).count();
        assert!((160..=240).contains(&blurred), "{blurred} of 400");
        assert_eq!(outs[17], run(&s, vec![img.clone()], 2, 17)[0]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn stage_keeps_sizes(img in image(64), seed in any::<u64>(), reflect in any::<bool>()) {
            let s: GaussianBlur = serde_json::from_value(serde_json::json!({
                "p": 1.0, "kernel_fraction": 0.5, "padding": if reflect { "reflect" } else { "zero" }
            })).unwrap();
            let out = run(&s, vec![img.clone()], seed, 0);
            prop_assert!(well_formed(&out));
            prop_assert_eq!((out[0].width, out[0].height), (img.width, img.height));
        }
    }
}
