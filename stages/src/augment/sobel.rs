//! `sobel`: edge magnitude of the grayscale image (one of the paper's Figure 5 ops).

use std::sync::Arc;

use rand::Rng;
use serde::Deserialize;
use simclr_core::{
    Context, Image, MapStage, PortType, Problem, Role, Sample, SampleCtx, Stage, StageConfig, StageError,
};

use super::color::GrayWeights;
use super::pixel::check_image;
use super::{check_p, check_views, for_each_view};

fn one() -> f32 {
    1.0
}

/// `sobel`: grayscale, then the Sobel gradient magnitude `sqrt(gx^2 + gy^2)` (3x3 kernels, edge
/// pixels repeated at the border), scaled so the image's largest magnitude is 255 (a flat image
/// becomes black), replicated to three channels.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sobel {
    /// Probability. Default 1.0: the paper's pairwise study (Figure 5) applies each op to every
    /// image, only on one branch (`views: [0]`).
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub p: f32,
    /// Luma weights: `tf` (default, 0.2989, 0.5870, 0.1140) or `itu601`.
    #[serde(default)]
    pub gray_weights: GrayWeights,
    /// Views to change (default: all).
    #[serde(default)]
    pub views: Option<Vec<u32>>,
}

/// Replaces the image by its Sobel edge magnitude, normalized to [0, 255].
pub fn sobel(img: &mut Image, weights: [f32; 3]) {
    let (w, h) = (img.width as usize, img.height as usize);
    if w == 0 || h == 0 {
        return;
    }
    let luma: Vec<f32> = img
        .data
        .chunks_exact(3)
        .map(|p| weights[0] * f32::from(p[0]) + weights[1] * f32::from(p[1]) + weights[2] * f32::from(p[2]))
        .collect();
    let at = |x: usize, y: usize| luma[y * w + x];
    let mut mag = Vec::with_capacity(w * h);
    for y in 0..h {
        let (ya, yb) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for x in 0..w {
            let (xa, xb) = (x.saturating_sub(1), (x + 1).min(w - 1));
            let gx =
                (at(xb, ya) + 2.0 * at(xb, y) + at(xb, yb)) - (at(xa, ya) + 2.0 * at(xa, y) + at(xa, yb));
            let gy =
                (at(xa, yb) + 2.0 * at(x, yb) + at(xb, yb)) - (at(xa, ya) + 2.0 * at(x, ya) + at(xb, ya));
            mag.push((gx * gx + gy * gy).sqrt());
        }
    }
    let max = mag.iter().fold(0.0f32, |a, &b| a.max(b));
    let scale = if max > 0.0 { 255.0 / max } else { 0.0 };
    for (px, &m) in img.data.chunks_exact_mut(3).zip(&mag) {
        px.fill((m * scale + 0.5).min(255.0) as u8);
    }
}

impl StageConfig for Sobel {
    const KIND: &'static str = "sobel";
    const ABOUT: &'static str = "Sobel edge magnitude of the grayscale view, normalized to 0..255";
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

impl MapStage for Sobel {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        let w = self.gray_weights.weights();
        for_each_view(sample, self.views.as_deref(), ctx, |img, rng| {
            check_image(img)?;
            if rng.random::<f32>() < self.p {
                sobel(img, w);
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
    fn a_vertical_step_lights_up_its_two_columns_only() {
        let (w, h) = (10usize, 6usize);
        let mut data = Vec::new();
        for _ in 0..h {
            for x in 0..w {
                data.extend_from_slice(if x < 5 { &[20, 20, 20] } else { &[220, 220, 220] });
            }
        }
        let mut img = Image { width: w as u32, height: h as u32, data };
        sobel(&mut img, GrayWeights::Itu601.weights());
        for y in 0..h {
            for x in 0..w {
                let p = &img.data[(y * w + x) * 3..(y * w + x) * 3 + 3];
                assert!(p[0] == p[1] && p[1] == p[2]);
                let want = if x == 4 || x == 5 { 255 } else { 0 };
                assert_eq!(p[0], want, "({x},{y})");
            }
        }
    }

    #[test]
    fn flat_images_become_black() {
        let mut img = Image { width: 7, height: 3, data: vec![90; 63] };
        sobel(&mut img, GrayWeights::Tf.weights());
        assert!(img.data.iter().all(|&v| v == 0));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn stage_keeps_sizes(img in image(64), seed in any::<u64>()) {
            let s: Sobel = serde_json::from_value(serde_json::json!({})).unwrap();
            let out = run(&s, vec![img.clone()], seed, 0);
            prop_assert!(well_formed(&out));
            prop_assert_eq!((out[0].width, out[0].height), (img.width, img.height));
        }
    }
}
