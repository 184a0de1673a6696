//! `gaussian_noise`: additive Gaussian noise (one of the paper's Figure 5 ops).

use std::sync::Arc;

use rand::Rng;
use rand_distr::StandardNormal;
use serde::Deserialize;
use simclr_core::{
    Context, Image, MapStage, PortType, Problem, Role, Sample, SampleCtx, Stage, StageConfig, StageError,
    StageRng,
};

use super::pixel::{check_image, to_u8, to_unit, uniform};
use super::{check_p, check_views, for_each_view};

fn one() -> f32 {
    1.0
}
fn default_std() -> [f32; 2] {
    [0.0, 0.1]
}
fn yes() -> bool {
    true
}

/// `gaussian_noise`: adds N(0, std^2) in [0, 1] units, std ~ U(std range) per view, clipped.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GaussianNoise {
    /// Probability. Default 1.0: the paper's pairwise study (Figure 5) applies each op to every
    /// image, only on one branch (`views: [0]`).
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub p: f32,
    /// Range of the noise's standard deviation in [0, 1] units, drawn uniformly per view.
    /// Default [0.0, 0.1] (the paper gives no numbers).
    #[serde(default = "default_std")]
    pub std: [f32; 2],
    /// An independent draw per channel (default true); false adds the same draw to R, G, B.
    #[serde(default = "yes")]
    pub per_channel: bool,
    /// Views to change (default: all).
    #[serde(default)]
    pub views: Option<Vec<u32>>,
}

/// Adds noise of standard deviation `std` (in [0, 1] units) to every value, clipping.
pub fn add_noise(img: &mut Image, std: f32, per_channel: bool, rng: &mut StageRng) {
    if per_channel {
        for v in img.data.iter_mut() {
            let n: f32 = rng.sample(StandardNormal);
            *v = to_u8(to_unit(*v) + std * n);
        }
    } else {
        for px in img.data.chunks_exact_mut(3) {
            let n: f32 = rng.sample(StandardNormal);
            for v in px {
                *v = to_u8(to_unit(*v) + std * n);
            }
        }
    }
}

impl StageConfig for GaussianNoise {
    const KIND: &'static str = "gaussian_noise";
    const ABOUT: &'static str = "adds Gaussian noise, std ~ U(0, 0.1) in [0, 1] units";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Views, PortType::Views)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        check_p("p", self.p, out);
        let [a, b] = self.std;
        if !(a >= 0.0 && a <= b && b <= 1.0) {
            out.push(Problem::new(
                "std",
                format!("`std` = [{a}, {b}] is not a range within [0, 1]"),
                "write `std: [low, high]` with 0 <= low <= high <= 1, e.g. [0.0, 0.1]",
            ));
        }
        check_views(self.views.as_deref(), out);
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Map(Arc::new(self.clone())))
    }
}

impl MapStage for GaussianNoise {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        for_each_view(sample, self.views.as_deref(), ctx, |img, rng| {
            check_image(img)?;
            let go = rng.random::<f32>() < self.p;
            let std = uniform(rng, self.std[0], self.std[1]);
            if go && std > 0.0 {
                add_noise(img, std, self.per_channel, rng);
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
    use rand::SeedableRng;

    #[test]
    fn noise_has_the_requested_spread() {
        let mut img = Image { width: 100, height: 100, data: vec![128; 30_000] };
        let std = 0.05f32;
        add_noise(&mut img, std, true, &mut StageRng::seed_from_u64(3));
        let d: Vec<f64> = img.data.iter().map(|&v| f64::from(v) - 128.0).collect();
        let mean = d.iter().sum::<f64>() / d.len() as f64;
        let sd = (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / d.len() as f64).sqrt();
        let want = f64::from(std) * 255.0;
        assert!(mean.abs() < 0.3, "mean {mean}");
        assert!((sd / want - 1.0).abs() < 0.03, "std {sd}, want {want}");
    }

    #[test]
    fn shared_noise_keeps_gray_pixels_gray() {
        let mut img = Image { width: 20, height: 20, data: vec![100; 1200] };
        add_noise(&mut img, 0.1, false, &mut StageRng::seed_from_u64(4));
        assert!(img.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        assert!(img.data.iter().any(|&v| v != 100));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn stage_keeps_sizes(img in image(64), seed in any::<u64>()) {
            let s: GaussianNoise = serde_json::from_value(serde_json::json!({"std": [0.0, 1.0]})).unwrap();
            let out = run(&s, vec![img.clone()], seed, 0);
            prop_assert!(well_formed(&out));
            prop_assert_eq!((out[0].width, out[0].height), (img.width, img.height));
        }
    }
}
