//! Tone curves: `solarize` and `equalize` (PIL `ImageOps` semantics), per channel.

use std::sync::Arc;

use rand::Rng;
use serde::Deserialize;
use simclr_core::{
    Context, Image, MapStage, PortType, Problem, Role, Sample, SampleCtx, Stage, StageConfig, StageError,
};

use super::pixel::check_image;
use super::{check_p, check_views, for_each_view};

fn one() -> f32 {
    1.0
}
fn half() -> f32 {
    0.5
}

/// `solarize`: inverts every value at or above `threshold`.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Solarize {
    /// Probability. Default 1.0, like the Figure 5 ops (BYOL-style recipes use 0.2 on one branch).
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub p: f32,
    /// Threshold in [0, 1] units: values v with v / 255 >= threshold become 255 - v. Default 0.5
    /// (= PIL's default 128).
    #[serde(default = "half")]
    pub threshold: f32,
    /// Views to change (default: all).
    #[serde(default)]
    pub views: Option<Vec<u32>>,
}

/// `equalize`: per-channel histogram equalization, exactly as PIL's `ImageOps.equalize`.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Equalize {
    /// Probability. Default 1.0, like the Figure 5 ops.
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub p: f32,
    /// Views to change (default: all).
    #[serde(default)]
    pub views: Option<Vec<u32>>,
}

/// Solarizes in place: v -> 255 - v where v / 255 >= threshold.
pub fn solarize(img: &mut Image, threshold: f32) {
    let lut: [u8; 256] =
        std::array::from_fn(|i| if i as f32 / 255.0 >= threshold { 255 - i as u8 } else { i as u8 });
    for v in &mut img.data {
        *v = lut[usize::from(*v)];
    }
}

/// The equalizing lookup table of one channel's histogram (PIL's algorithm: step = (number of
/// pixels - count of the last non-empty bin) / 256; identity when step is 0 or at most one bin is
/// used).
pub fn equalize_lut(hist: &[u32; 256]) -> [u8; 256] {
    let identity = std::array::from_fn(|i| i as u8);
    let used: Vec<u64> = hist.iter().filter(|&&c| c > 0).map(|&c| u64::from(c)).collect();
    if used.len() <= 1 {
        return identity;
    }
    let step = (used.iter().sum::<u64>() - used[used.len() - 1]) / 256;
    if step == 0 {
        return identity;
    }
    let mut lut = [0u8; 256];
    let mut n = step / 2;
    for (l, &c) in lut.iter_mut().zip(hist) {
        *l = (n / step).min(255) as u8;
        n += u64::from(c);
    }
    lut
}

/// Equalizes each channel in place.
pub fn equalize(img: &mut Image) {
    let mut hist = [[0u32; 256]; 3];
    for px in img.data.chunks_exact(3) {
        for c in 0..3 {
            hist[c][usize::from(px[c])] += 1;
        }
    }
    let luts = hist.map(|h| equalize_lut(&h));
    for px in img.data.chunks_exact_mut(3) {
        for c in 0..3 {
            px[c] = luts[c][usize::from(px[c])];
        }
    }
}

impl StageConfig for Solarize {
    const KIND: &'static str = "solarize";
    const ABOUT: &'static str = "inverts values at or above `threshold` (default 0.5)";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Views, PortType::Views)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        check_p("p", self.p, out);
        if !(0.0..=1.0).contains(&self.threshold) {
            out.push(Problem::new(
                "threshold",
                format!("`threshold` = {} is not in [0, 1]", self.threshold),
                "use e.g. 0.5 (values are in [0, 1] units)",
            ));
        }
        check_views(self.views.as_deref(), out);
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Map(Arc::new(self.clone())))
    }
}

impl MapStage for Solarize {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        for_each_view(sample, self.views.as_deref(), ctx, |img, rng| {
            check_image(img)?;
            if rng.random::<f32>() < self.p {
                solarize(img, self.threshold);
            }
            Ok(())
        })
    }
}

impl StageConfig for Equalize {
    const KIND: &'static str = "equalize";
    const ABOUT: &'static str = "per-channel histogram equalization (PIL ImageOps.equalize)";
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

impl MapStage for Equalize {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        for_each_view(sample, self.views.as_deref(), ctx, |img, rng| {
            check_image(img)?;
            if rng.random::<f32>() < self.p {
                equalize(img);
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
    fn solarize_inverts_from_the_threshold_up() {
        let mut img = Image {
            width: 5,
            height: 1,
            data: vec![0, 0, 0, 127, 127, 127, 128, 128, 128, 200, 200, 200, 255, 255, 255],
        };
        let orig = img.clone();
        solarize(&mut img, 0.5);
        for (&a, &b) in orig.data.iter().zip(&img.data) {
            assert_eq!(b, if a >= 128 { 255 - a } else { a });
        }
        solarize(&mut img, 1.01);
        assert_eq!(img.data[12], 0, "a threshold above 1 changes nothing");
    }

    #[test]
    fn equalize_follows_pil() {
        // Two equal halves at 10 and 20: step = (512 - 256) / 256 = 1, so 10 -> 0 and 20 -> 256
        // (clipped to 255).
        let mut data = vec![10u8; 256 * 3];
        data.extend(vec![20u8; 256 * 3]);
        let mut img = Image { width: 32, height: 16, data };
        equalize(&mut img);
        assert!(img.data[..768].iter().all(|&v| v == 0));
        assert!(img.data[768..].iter().all(|&v| v == 255));

        // Too few pixels for a step: unchanged (PIL's behavior).
        let mut small = noise_image(8, 8, 1);
        let orig = small.clone();
        equalize(&mut small);
        assert_eq!(small, orig);
    }

    #[test]
    fn equalize_stretches_a_narrow_range_monotonically() {
        let data: Vec<u8> = (0..64 * 64 * 3).map(|i| 100 + ((i / 3) % 11) as u8).collect();
        let mut img = Image { width: 64, height: 64, data };
        let orig = img.clone();
        equalize(&mut img);
        let (lo, hi) = (img.data.iter().min().copied().unwrap(), img.data.iter().max().copied().unwrap());
        assert_eq!(lo, 0);
        assert!(hi >= 230, "max {hi}");
        for (a, b) in orig.data.iter().zip(&img.data).zip(orig.data.iter().zip(&img.data).skip(3)) {
            if a.0 < b.0 {
                assert!(a.1 <= b.1, "order kept");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn stages_keep_sizes(img in image(64), seed in any::<u64>()) {
            let sol: Solarize = serde_json::from_value(serde_json::json!({})).unwrap();
            let eq: Equalize = serde_json::from_value(serde_json::json!({})).unwrap();
            for s in [&sol as &dyn MapStage, &eq] {
                let out = run(s, vec![img.clone()], seed, 0);
                prop_assert!(well_formed(&out));
                prop_assert_eq!((out[0].width, out[0].height), (img.width, img.height));
            }
        }
    }
}
