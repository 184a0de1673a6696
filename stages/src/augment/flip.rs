//! `horizontal_flip`: mirrors a view left-right with probability p.

use std::sync::Arc;

use rand::Rng;
use serde::Deserialize;
use simclr_core::{
    Context, Image, MapStage, PortType, Problem, Role, Sample, SampleCtx, Stage, StageConfig, StageError,
};

use super::pixel::check_image;
use super::{check_p, check_views, for_each_view};

fn half() -> f32 {
    0.5
}

/// `horizontal_flip`: mirror left-right.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HorizontalFlip {
    /// Probability of flipping. Default 0.5 (paper and code).
    #[serde(default = "half")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub p: f32,
    /// Views to flip (default: all).
    #[serde(default)]
    pub views: Option<Vec<u32>>,
}

/// Mirrors an image left-right in place.
pub fn flip_horizontal(img: &mut Image) {
    let w3 = img.width as usize * 3;
    if w3 == 0 {
        return;
    }
    let half = img.width as usize / 2 * 3;
    for row in img.data.chunks_exact_mut(w3) {
        let (left, right) = row.split_at_mut(half);
        for (a, b) in left.chunks_exact_mut(3).zip(right.rchunks_exact_mut(3)) {
            let t = [a[0], a[1], a[2]];
            a.copy_from_slice(b);
            b.copy_from_slice(&t);
        }
    }
}

impl StageConfig for HorizontalFlip {
    const KIND: &'static str = "horizontal_flip";
    const ABOUT: &'static str = "mirrors views left-right with probability p (default 0.5)";
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

impl MapStage for HorizontalFlip {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        for_each_view(sample, self.views.as_deref(), ctx, |img, rng| {
            check_image(img)?;
            if rng.random::<f32>() < self.p {
                flip_horizontal(img);
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
    fn flip_mirrors_pixels() {
        let img = noise_image(5, 3, 1);
        let mut f = img.clone();
        flip_horizontal(&mut f);
        for y in 0..3 {
            for x in 0..5 {
                let (i, j) = ((y * 5 + x) * 3, (y * 5 + 4 - x) * 3);
                assert_eq!(f.data[i..i + 3], img.data[j..j + 3]);
            }
        }
    }

    #[test]
    fn flips_about_half_the_views() {
        let s: HorizontalFlip = serde_json::from_value(serde_json::json!({})).unwrap();
        let img = noise_image(4, 2, 3);
        let flipped = (0..1000).filter(|&i| run(&s, vec![img.clone()], 1, i)[0] != img).count();
        assert!((430..=570).contains(&flipped), "{flipped} of 1000");
    }

    proptest! {
        #[test]
        fn flip_twice_is_identity(img in image(64)) {
            let mut f = img.clone();
            flip_horizontal(&mut f);
            prop_assert!(well_formed(std::slice::from_ref(&f)));
            flip_horizontal(&mut f);
            prop_assert_eq!(f, img);
        }

        #[test]
        fn stage_keeps_sizes(img in image(64), seed in any::<u64>()) {
            let s: HorizontalFlip = serde_json::from_value(serde_json::json!({"p": 0.7})).unwrap();
            let out = run(&s, vec![img.clone()], seed, 0);
            prop_assert!(well_formed(&out));
            prop_assert_eq!((out[0].width, out[0].height), (img.width, img.height));
        }
    }
}
