//! `rotate`: rotation by a multiple of 90 degrees (one of the paper's Figure 5 ops), an exact
//! pixel permutation. Angles are counter-clockwise (as `np.rot90`, `tf.image.rot90`, PIL).

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
fn default_angles() -> Vec<u32> {
    vec![90, 180, 270]
}

/// `rotate`: rotate by an angle drawn uniformly from `angles`.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    /// Probability. Default 1.0: the paper's pairwise study (Figure 5) applies each op to every
    /// image, only on one branch (`views: [0]`).
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub p: f32,
    /// Angles in degrees, counter-clockwise, each 0, 90, 180 or 270. Default [90, 180, 270] (the
    /// paper's {90, 180, 270}). A non-square view rotated by 90 or 270 swaps width and height.
    #[serde(default = "default_angles")]
    pub angles: Vec<u32>,
    /// Views to rotate (default: all).
    #[serde(default)]
    pub views: Option<Vec<u32>>,
}

/// Rotates counter-clockwise by `angle` (0, 90, 180 or 270; anything else is taken mod 360 and
/// rounded down to a multiple of 90).
pub fn rotate(img: &mut Image, angle: u32) {
    let (w, h) = (img.width as usize, img.height as usize);
    let src = &img.data;
    match (angle % 360) / 90 {
        1 => {
            // out (w' = h, h' = w): out[i][j] = in[j][w - 1 - i].
            let mut out = Vec::with_capacity(src.len());
            for i in 0..w {
                let x = w - 1 - i;
                for j in 0..h {
                    out.extend_from_slice(&src[(j * w + x) * 3..(j * w + x) * 3 + 3]);
                }
            }
            *img = Image { width: img.height, height: img.width, data: out };
        }
        2 => {
            let n = img.data.len() / 3;
            for k in 0..n / 2 {
                let (a, b) = (k * 3, (n - 1 - k) * 3);
                for c in 0..3 {
                    img.data.swap(a + c, b + c);
                }
            }
        }
        3 => {
            // out[i][j] = in[h - 1 - j][i].
            let mut out = Vec::with_capacity(src.len());
            for i in 0..w {
                for j in 0..h {
                    let y = h - 1 - j;
                    out.extend_from_slice(&src[(y * w + i) * 3..(y * w + i) * 3 + 3]);
                }
            }
            *img = Image { width: img.height, height: img.width, data: out };
        }
        _ => {}
    }
}

impl StageConfig for Rotate {
    const KIND: &'static str = "rotate";
    const ABOUT: &'static str = "rotates views by an angle drawn from {90, 180, 270} (counter-clockwise)";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Views, PortType::Views)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        check_p("p", self.p, out);
        if self.angles.is_empty() || self.angles.iter().any(|a| ![0, 90, 180, 270].contains(a)) {
            out.push(Problem::new(
                "angles",
                format!("`angles` = {:?} must list angles from 0, 90, 180, 270", self.angles),
                "write e.g. `angles: [90, 180, 270]`",
            ));
        }
        check_views(self.views.as_deref(), out);
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Map(Arc::new(self.clone())))
    }
}

impl MapStage for Rotate {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        for_each_view(sample, self.views.as_deref(), ctx, |img, rng| {
            check_image(img)?;
            let go = rng.random::<f32>() < self.p;
            if go && !self.angles.is_empty() {
                let angle = self.angles[rng.random_range(0..self.angles.len())];
                rotate(img, angle);
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

    fn px(img: &Image, x: usize, y: usize) -> &[u8] {
        let i = (y * img.width as usize + x) * 3;
        &img.data[i..i + 3]
    }

    #[test]
    fn rotations_move_corners_counter_clockwise() {
        let img = noise_image(5, 3, 2);
        let mut r = img.clone();
        rotate(&mut r, 90);
        assert_eq!((r.width, r.height), (3, 5));
        // Counter-clockwise: the top-right corner goes to the top-left.
        assert_eq!(px(&r, 0, 0), px(&img, 4, 0));
        assert_eq!(px(&r, 0, 4), px(&img, 0, 0));
        assert_eq!(px(&r, 2, 4), px(&img, 0, 2));
        let mut r = img.clone();
        rotate(&mut r, 270);
        assert_eq!(px(&r, 0, 0), px(&img, 0, 2));
        assert_eq!(px(&r, 2, 0), px(&img, 0, 0));
        let mut r = img.clone();
        rotate(&mut r, 180);
        assert_eq!(px(&r, 0, 0), px(&img, 4, 2));
        assert_eq!(px(&r, 1, 2), px(&img, 3, 0));
    }

    proptest! {
        #[test]
        fn four_quarter_turns_are_identity(img in image(64)) {
            let mut r = img.clone();
            for _ in 0..4 {
                rotate(&mut r, 90);
                prop_assert!(well_formed(std::slice::from_ref(&r)));
            }
            prop_assert_eq!(&r, &img);
            rotate(&mut r, 90);
            rotate(&mut r, 270);
            prop_assert_eq!(&r, &img);
        }

        #[test]
        fn two_half_turns_are_identity(img in image(64)) {
            let mut r = img.clone();
            rotate(&mut r, 180);
            rotate(&mut r, 180);
            prop_assert_eq!(r, img);
        }

        #[test]
        fn stage_keeps_sizes(img in image(64), seed in any::<u64>()) {
            let s: Rotate = serde_json::from_value(serde_json::json!({})).unwrap();
            let out = run(&s, vec![img.clone()], seed, 0);
            prop_assert!(well_formed(&out));
            let (w, h) = (out[0].width, out[0].height);
            prop_assert!((w, h) == (img.width, img.height) || (w, h) == (img.height, img.width));
        }
    }

    #[test]
    fn check_rejects_other_angles() {
        let cx = Context {
            base_dir: ".".into(),
            seed: 0,
            stage_id: "rot".into(),
            run_dir: None,
            ..Context::default()
        };
        let s: Rotate = serde_json::from_value(serde_json::json!({"angles": [45]})).unwrap();
        let mut out = Vec::new();
        s.check(&cx, &mut out);
        assert_eq!(out.len(), 1);
    }
}
