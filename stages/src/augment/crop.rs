//! `random_resized_crop`: a random crop of random area and aspect ratio, resized to a square.
//!
//! The crop is drawn as torchvision's `RandomResizedCrop.get_params` does, with the official
//! code's 100 attempts and whole-image fallback by default. Resizing uses `fast_image_resize`
//! (SIMD, picked at run time) reading the crop box straight from the source, so nothing is copied
//! before resizing.

use std::cell::RefCell;
use std::sync::Arc;

use fast_image_resize as fr;
use rand::Rng;
use serde::Deserialize;
use simclr_core::{
    Context, Image, MapStage, PortType, Problem, Role, Sample, SampleCtx, Stage, StageConfig, StageError,
    StageRng,
};

use super::pixel::check_image;
use super::{check_views, for_each_view};

/// What to crop when no attempt fits inside the image.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// The whole image (the official code: `tf.image.sample_distorted_bounding_box` returns the
    /// whole box).
    #[default]
    Whole,
    /// A center crop with the aspect ratio clamped into `ratio` (torchvision).
    Center,
}

/// Resampling filter.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// Catmull-Rom bicubic (a = -0.5, as TF's and PIL's bicubic): paper and code.
    #[default]
    Bicubic,
    Bilinear,
    /// Box filter (area averaging).
    Area,
}

fn default_scale() -> [f32; 2] {
    [0.08, 1.0]
}
fn default_ratio() -> [f32; 2] {
    [3.0 / 4.0, 4.0 / 3.0]
}
fn default_attempts() -> u32 {
    100
}

/// `random_resized_crop`: crop a random box, resize it to `size` x `size`.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RandomResizedCrop {
    /// Output side in pixels (required): 224 for ImageNet, 32 for CIFAR-10.
    pub size: u32,
    /// Range of the crop's area as a fraction of the image's, drawn uniformly. Default
    /// [0.08, 1.0] (paper and code).
    #[serde(default = "default_scale")]
    pub scale: [f32; 2],
    /// Range of the crop's aspect ratio (width / height), drawn log-uniformly. Default
    /// [3/4, 4/3] (paper and code).
    #[serde(default = "default_ratio")]
    pub ratio: [f32; 2],
    /// Draws before giving up and using `fallback`. Default 100 (the official code's
    /// `max_attempts`; torchvision uses 10).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// `whole` (default: the whole image, the official code) or `center` (torchvision).
    #[serde(default)]
    pub fallback: Fallback,
    /// `bicubic` (default: paper and code), `bilinear` or `area`.
    #[serde(default)]
    pub interpolation: Interpolation,
    /// Widen the filter when shrinking so every source pixel counts (PIL and torchvision do).
    /// Default false, as the official code (`tf.image.resize_bicubic`: a fixed-size filter,
    /// which aliases when shrinking a lot); `true` gives torchvision's behaviour.
    #[serde(default)]
    pub antialias: bool,
    /// Views to crop (default: all). A view left out keeps its size.
    #[serde(default)]
    pub views: Option<Vec<u32>>,
}

#[inline]
fn uniform64(rng: &mut StageRng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Draws a crop box `(x, y, width, height)` of a `w` x `h` image, as torchvision's
/// `RandomResizedCrop.get_params`: area = w*h * U(scale), aspect r = exp(U(ln ratio)),
/// cw = round(sqrt(area * r)), ch = round(sqrt(area / r)) (Python's `round`: half to even);
/// accepted if it fits, then placed uniformly. After `attempts` misses, `fallback`.
/// The box always lies inside the image and is at least 1x1 (for `w`, `h` >= 1).
pub fn sample_crop(
    w: u32,
    h: u32,
    scale: [f32; 2],
    ratio: [f32; 2],
    attempts: u32,
    fallback: Fallback,
    rng: &mut StageRng,
) -> (u32, u32, u32, u32) {
    let area = f64::from(w) * f64::from(h);
    let (lr0, lr1) = (f64::from(ratio[0]).ln(), f64::from(ratio[1]).ln());
    for _ in 0..attempts {
        let target = area * uniform64(rng, f64::from(scale[0]), f64::from(scale[1]));
        let r = uniform64(rng, lr0, lr1).exp();
        let cw = (target * r).sqrt().round_ties_even();
        let ch = (target / r).sqrt().round_ties_even();
        if cw >= 1.0 && cw <= f64::from(w) && ch >= 1.0 && ch <= f64::from(h) {
            let (cw, ch) = (cw as u32, ch as u32);
            let x = rng.random_range(0..=w - cw);
            let y = rng.random_range(0..=h - ch);
            return (x, y, cw, ch);
        }
    }
    match fallback {
        Fallback::Whole => (0, 0, w, h),
        Fallback::Center => {
            let in_ratio = f64::from(w) / f64::from(h);
            let (rmin, rmax) = (f64::from(ratio[0]), f64::from(ratio[1]));
            let (cw, ch) = if in_ratio < rmin {
                (f64::from(w), (f64::from(w) / rmin).round_ties_even())
            } else if in_ratio > rmax {
                ((f64::from(h) * rmax).round_ties_even(), f64::from(h))
            } else {
                (f64::from(w), f64::from(h))
            };
            let cw = (cw as u32).clamp(1, w.max(1));
            let ch = (ch as u32).clamp(1, h.max(1));
            ((w - cw) / 2, (h - ch) / 2, cw, ch)
        }
    }
}

impl Interpolation {
    fn algorithm(self, antialias: bool) -> fr::ResizeAlg {
        let filter = match self {
            Interpolation::Bicubic => fr::FilterType::CatmullRom,
            Interpolation::Bilinear => fr::FilterType::Bilinear,
            Interpolation::Area => fr::FilterType::Box,
        };
        if antialias {
            fr::ResizeAlg::Convolution(filter)
        } else {
            fr::ResizeAlg::Interpolation(filter)
        }
    }
}

thread_local! {
    static RESIZER: RefCell<fr::Resizer> = RefCell::new(fr::Resizer::new());
}

/// Resizes the box `(x, y, cw, ch)` of `img` to `out_w` x `out_h`.
pub fn crop_resize(
    img: &Image,
    (x, y, cw, ch): (u32, u32, u32, u32),
    out_w: u32,
    out_h: u32,
    alg: fr::ResizeAlg,
) -> Result<Image, StageError> {
    let bad = |e: &dyn std::fmt::Display| StageError::fatal(format!("resize failed: {e}"));
    let src = fr::images::ImageRef::new(img.width, img.height, &img.data, fr::PixelType::U8x3)
        .map_err(|e| bad(&e))?;
    let mut out = vec![0u8; out_w as usize * out_h as usize * 3];
    let mut dst =
        fr::images::Image::from_slice_u8(out_w, out_h, &mut out, fr::PixelType::U8x3).map_err(|e| bad(&e))?;
    let options = fr::ResizeOptions::new().resize_alg(alg).crop(
        f64::from(x),
        f64::from(y),
        f64::from(cw),
        f64::from(ch),
    );
    RESIZER.with_borrow_mut(|r| r.resize(&src, &mut dst, &options)).map_err(|e| bad(&e))?;
    Ok(Image { width: out_w, height: out_h, data: out })
}

impl StageConfig for RandomResizedCrop {
    const KIND: &'static str = "random_resized_crop";
    const ABOUT: &'static str = "random crop (area 8-100%, aspect 3/4-4/3) resized to `size` x `size`";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Views, PortType::Views)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        if !(1..=8192).contains(&self.size) {
            out.push(Problem::new("size", "`size` must be from 1 to 8192", "write e.g. `size: 224`"));
        }
        let [s0, s1] = self.scale;
        if !(s0 > 0.0 && s0 <= s1 && s1 <= 1.0) {
            out.push(Problem::new(
                "scale",
                format!("`scale` = [{s0}, {s1}] is not a range within (0, 1]"),
                "write `scale: [low, high]` with 0 < low <= high <= 1, e.g. [0.08, 1.0]",
            ));
        }
        let [r0, r1] = self.ratio;
        if !(r0 > 0.0 && r0 <= r1 && r1.is_finite()) {
            out.push(Problem::new(
                "ratio",
                format!("`ratio` = [{r0}, {r1}] is not a range of positive aspect ratios"),
                "write `ratio: [low, high]` with 0 < low <= high, e.g. [0.75, 1.3333]",
            ));
        }
        if !(1..=10_000).contains(&self.attempts) {
            out.push(Problem::new(
                "attempts",
                "`attempts` must be from 1 to 10000",
                "use 100 (the official code) or 10 (torchvision)",
            ));
        }
        check_views(self.views.as_deref(), out);
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Map(Arc::new(self.clone())))
    }
}

impl MapStage for RandomResizedCrop {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        let alg = self.interpolation.algorithm(self.antialias);
        for_each_view(sample, self.views.as_deref(), ctx, |img, rng| {
            check_image(img)?;
            if img.width == 0 || img.height == 0 {
                return Err(StageError::data("the image is empty"));
            }
            let crop =
                sample_crop(img.width, img.height, self.scale, self.ratio, self.attempts, self.fallback, rng);
            *img = crop_resize(img, crop, self.size, self.size, alg)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::testing::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> StageRng {
        StageRng::seed_from_u64(seed)
    }

    const SCALE: [f32; 2] = [0.08, 1.0];
    const RATIO: [f32; 2] = [3.0 / 4.0, 4.0 / 3.0];

    /// E[area fraction | accepted] on a square image, by numerical integration: a draw (a, u)
    /// with a ~ U(0.08, 1), u = ln r ~ U(-L, L) fits iff |u| <= min(-ln a, L).
    fn expected_square_area_fraction() -> f64 {
        let l = (4.0f64 / 3.0).ln();
        let (lo, hi, n) = (0.08f64, 1.0f64, 100_000);
        let (mut num, mut den) = (0.0, 0.0);
        for i in 0..n {
            let a = lo + (hi - lo) * (i as f64 + 0.5) / n as f64;
            let accept = (-a.ln()).min(l) / l;
            num += a * accept;
            den += accept;
        }
        num / den
    }

    #[test]
    fn area_fractions_follow_the_accepted_distribution() {
        let mut r = rng(11);
        let n = 10_000;
        let mut sum = 0.0;
        for _ in 0..n {
            let (x, y, cw, ch) = sample_crop(1000, 1000, SCALE, RATIO, 100, Fallback::Whole, &mut r);
            assert!(x + cw <= 1000 && y + ch <= 1000);
            let frac = f64::from(cw) * f64::from(ch) / 1e6;
            assert!((0.079..=1.0).contains(&frac), "area fraction {frac}");
            sum += frac;
        }
        let mean = sum / n as f64;
        let want = expected_square_area_fraction();
        assert!((mean - want).abs() < 0.01, "mean area fraction {mean}, expected {want}");
    }

    #[test]
    fn log_aspect_is_uniform_when_nothing_is_rejected() {
        // With areas up to half the image every draw fits, so ln(cw/ch) is uniform.
        let mut r = rng(12);
        let (lo, hi) = (f64::from(RATIO[0]).ln(), f64::from(RATIO[1]).ln());
        let mut bins = [0u32; 10];
        let n = 10_000;
        for _ in 0..n {
            let (_, _, cw, ch) = sample_crop(1000, 1000, [0.08, 0.5], RATIO, 100, Fallback::Whole, &mut r);
            let u = (f64::from(cw) / f64::from(ch)).ln();
            let b = (((u - lo) / (hi - lo)) * 10.0).floor().clamp(0.0, 9.0) as usize;
            bins[b] += 1;
        }
        for (i, &c) in bins.iter().enumerate() {
            let share = f64::from(c) / n as f64;
            assert!((0.08..=0.12).contains(&share), "bin {i} holds {share:.3} of draws: {bins:?}");
        }
    }

    #[test]
    fn fallbacks_when_nothing_fits() {
        // A 1000x10 strip: a 3/4..4/3 crop of >= 8% of its area cannot fit in 10 rows.
        let mut r = rng(1);
        assert_eq!(sample_crop(1000, 10, SCALE, RATIO, 100, Fallback::Whole, &mut r), (0, 0, 1000, 10));
        // Center: width clamped to 10 * 4/3 = 13, centered.
        assert_eq!(
            sample_crop(1000, 10, SCALE, RATIO, 100, Fallback::Center, &mut r),
            ((1000 - 13) / 2, 0, 13, 10)
        );
        assert_eq!(
            sample_crop(10, 1000, SCALE, RATIO, 100, Fallback::Center, &mut r),
            (0, (1000 - 13) / 2, 10, 13)
        );
    }

    proptest! {
        #[test]
        fn crops_lie_inside_the_image(w in 1u32..2000, h in 1u32..2000, seed in any::<u64>(),
                                      center in any::<bool>(), attempts in 1u32..20) {
            let fallback = if center { Fallback::Center } else { Fallback::Whole };
            let mut r = rng(seed);
            let (x, y, cw, ch) = sample_crop(w, h, SCALE, RATIO, attempts, fallback, &mut r);
            prop_assert!(cw >= 1 && ch >= 1);
            prop_assert!(x + cw <= w && y + ch <= h, "{:?} in {}x{}", (x, y, cw, ch), w, h);
        }
    }

    fn stage(size: u32) -> RandomResizedCrop {
        serde_json::from_value(serde_json::json!({ "size": size })).unwrap()
    }

    #[test]
    fn output_is_square_and_deterministic() {
        let img = noise_image(61, 47, 4);
        let s = stage(24);
        let a = run(&s, vec![img.clone(), img.clone()], 7, 5);
        let b = run(&s, vec![img.clone(), img.clone()], 7, 5);
        assert_eq!(a, b);
        for v in &a {
            assert_eq!((v.width, v.height, v.data.len()), (24, 24, 24 * 24 * 3));
        }
        assert_ne!(a[0], a[1], "the two views draw different crops");
        assert_ne!(run(&s, vec![img.clone()], 7, 6)[0], a[0]);
    }

    #[test]
    fn a_full_crop_at_the_same_size_is_a_copy() {
        let img = noise_image(16, 16, 5);
        let s: RandomResizedCrop =
            serde_json::from_value(serde_json::json!({"size": 16, "scale": [1.0, 1.0], "ratio": [1.0, 1.0]}))
                .unwrap();
        assert_eq!(run(&s, vec![img.clone()], 1, 1)[0], img);
    }

    #[test]
    fn resizing_a_flat_image_keeps_it_flat() {
        for interpolation in ["bicubic", "bilinear", "area"] {
            for antialias in [true, false] {
                let img = Image { width: 50, height: 30, data: [10u8, 200, 77].repeat(1500) };
                let s: RandomResizedCrop = serde_json::from_value(serde_json::json!(
                    {"size": 20, "interpolation": interpolation, "antialias": antialias}))
                .unwrap();
                let out = run(&s, vec![img], 3, 3);
                assert!(out[0].data.chunks(3).all(|p| p == [10, 200, 77]), "{interpolation}");
            }
        }
    }

    #[test]
    fn check_reports_bad_ranges() {
        let cx = Context {
            base_dir: ".".into(),
            seed: 0,
            stage_id: "crop".into(),
            run_dir: None,
            ..Context::default()
        };
        let s: RandomResizedCrop = serde_json::from_value(
            serde_json::json!({"size": 0, "scale": [0.5, 0.2], "ratio": [0.0, 1.0], "attempts": 0, "views": []}),
        )
        .unwrap();
        let mut out = Vec::new();
        s.check(&cx, &mut out);
        assert_eq!(out.len(), 5, "{out:?}");
        assert!(
            serde_json::from_value::<RandomResizedCrop>(serde_json::json!({})).is_err(),
            "size is required"
        );
        assert!(
            serde_json::from_value::<RandomResizedCrop>(serde_json::json!({"size": 4, "sise": 4})).is_err()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_image_gives_a_size_by_size_view(img in image(64), size in 1u32..40, seed in any::<u64>()) {
            let out = run(&stage(size), vec![img], seed, 0);
            prop_assert!(well_formed(&out));
            prop_assert_eq!((out[0].width, out[0].height), (size, size));
        }
    }
}
