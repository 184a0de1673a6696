//! `cutout`: fills a random square with a constant (one of the paper's Figure 5 ops).

use std::sync::Arc;

use rand::Rng;
use serde::Deserialize;
use simclr_core::{
    Context, Image, MapStage, PortType, Problem, Role, Sample, SampleCtx, Stage, StageConfig, StageError,
};

use super::pixel::{check_image, uniform};
use super::{check_p, check_views, for_each_view};

fn one() -> f32 {
    1.0
}
fn default_size() -> [f32; 2] {
    [0.1, 0.5]
}

/// `cutout`: a square of side U(size) x the shorter image side, placed uniformly inside the
/// image, filled with `fill`.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Cutout {
    /// Probability. Default 1.0: the paper's pairwise study (Figure 5) applies each op to every
    /// image, only on one branch (`views: [0]`).
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub p: f32,
    /// Range of the square's side as a fraction of the shorter image side, drawn uniformly.
    /// Default [0.1, 0.5] (the paper gives no numbers).
    #[serde(default = "default_size")]
    pub size: [f32; 2],
    /// The value of every channel inside the square. Default 0 (black).
    #[serde(default)]
    pub fill: u8,
    /// Views to change (default: all).
    #[serde(default)]
    pub views: Option<Vec<u32>>,
}

/// Fills the `side` x `side` square at (x, y) with `fill`.
pub fn fill_square(img: &mut Image, x: u32, y: u32, side: u32, fill: u8) {
    let w3 = img.width as usize * 3;
    let (x3, s3) = (x as usize * 3, side as usize * 3);
    for row in img.data.chunks_exact_mut(w3).skip(y as usize).take(side as usize) {
        row[x3..x3 + s3].fill(fill);
    }
}

impl StageConfig for Cutout {
    const KIND: &'static str = "cutout";
    const ABOUT: &'static str = "fills a random square (10-50% of the side) with a constant";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Views, PortType::Views)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        check_p("p", self.p, out);
        let [a, b] = self.size;
        if !(a >= 0.0 && a <= b && b <= 1.0) {
            out.push(Problem::new(
                "size",
                format!("`size` = [{a}, {b}] is not a range within [0, 1]"),
                "write `size: [low, high]` with 0 <= low <= high <= 1, e.g. [0.1, 0.5]",
            ));
        }
        check_views(self.views.as_deref(), out);
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Map(Arc::new(self.clone())))
    }
}

impl MapStage for Cutout {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        for_each_view(sample, self.views.as_deref(), ctx, |img, rng| {
            check_image(img)?;
            let go = rng.random::<f32>() < self.p;
            let frac = uniform(rng, self.size[0], self.size[1]);
            let short = img.width.min(img.height);
            let side = ((frac * short as f32).round() as u32).min(short);
            if !go || side == 0 {
                return Ok(());
            }
            let x = rng.random_range(0..=img.width - side);
            let y = rng.random_range(0..=img.height - side);
            fill_square(img, x, y, side, self.fill);
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
    fn fills_exactly_one_square_of_the_drawn_size() {
        let s: Cutout = serde_json::from_value(serde_json::json!({"fill": 0})).unwrap();
        let img = Image { width: 40, height: 30, data: vec![200; 40 * 30 * 3] };
        for i in 0..50 {
            let out = run(&s, vec![img.clone()], 4, i).remove(0);
            let filled: Vec<(usize, usize)> = (0..30)
                .flat_map(|y| (0..40).map(move |x| (x, y)))
                .filter(|&(x, y)| out.data[(y * 40 + x) * 3] == 0)
                .collect();
            let (x0, y0) = filled[0];
            let (x1, y1) = *filled.last().unwrap();
            let side = x1 - x0 + 1;
            assert_eq!(y1 - y0 + 1, side, "square");
            assert_eq!(filled.len(), side * side, "one solid block");
            assert!((3..=15).contains(&side), "side {side} of 30");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn stage_keeps_sizes(img in image(64), seed in any::<u64>()) {
            let s: Cutout = serde_json::from_value(serde_json::json!({"size": [0.0, 1.0], "fill": 9})).unwrap();
            let out = run(&s, vec![img.clone()], seed, 0);
            prop_assert!(well_formed(&out));
            prop_assert_eq!((out[0].width, out[0].height), (img.width, img.height));
        }
    }
}
