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

use std::sync::Arc;

use rand::Rng;
use serde::Deserialize;
use simclr_core::{
    Context, MapStage, PortType, Problem, Role, Sample, SampleCtx, Stage, StageConfig, StageError, StageRng,
};

use super::pixel::{check_image, uniform};
use super::{check_p, check_views, for_each_view};

mod ops;
#[cfg(test)]
mod tests;

pub use ops::{
    brightness, brightness_add, channel_means, contrast, contrast_around, grayscale, hue, load_planar,
    saturation, saturation_blend, saturation_hsv, store_planar, with_f32,
};

/// Brightness as the official code's `impl` flag.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BrightnessMode {
    /// `simclrv2` (the code's default): multiply by f ~ U(max(0, 1 - b), 1 + b).
    #[default]
    V2,
    /// `simclrv1` (`tf.image.random_brightness`): add d ~ U(-b, b).
    V1,
}

/// The mean that contrast scales around.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ContrastMean {
    /// Per-channel mean (`tf.image.adjust_contrast`, the official code).
    #[default]
    Channel,
    /// Mean of the grayscale image, for all channels (torchvision).
    Gray,
}

/// How saturation is changed.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
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
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
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
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ColorDistort {
    /// Strength s. Default 1.0 (the ImageNet recipe; CIFAR-10 uses 0.5, Table 1 sweeps 1/8..1).
    #[serde(default = "one")]
    #[schemars(range(min = 0.0))]
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
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
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
    #[schemars(range(min = 0.0, max = 1.0))]
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
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RandomGrayscale {
    /// Probability. Default 0.2 (SimCLR).
    #[serde(default = "p_gray")]
    #[schemars(range(min = 0.0, max = 1.0))]
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
