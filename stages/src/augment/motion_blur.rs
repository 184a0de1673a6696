//! `motion_blur_builtin`: the example plugin's motion blur (`plugins/examples/motion_blur`)
//! compiled in, running the same code (`simclr_plugin::motion_blur`) with the same seed per view
//! as the plugin host gives the plugin: one u64 of the view's random stream. A pipeline with this
//! kind and one with the plugin's `motion_blur` (same stage ids) give the same digest, so
//! `simclr bench` of the two measures the plugin boundary's overhead and nothing else.

use std::sync::Arc;

use rand::RngCore;
use serde::Deserialize;
use simclr_core::{
    Context, MapStage, PortType, Problem, Role, Sample, SampleCtx, Stage, StageConfig, StageError,
};
use simclr_plugin::motion_blur::{self, Params};

use super::pixel::check_image;
use super::{check_views, for_each_view};

fn half() -> f64 {
    Params::default().p
}
fn default_length() -> [f64; 2] {
    Params::default().length
}
fn default_angle() -> [f64; 2] {
    Params::default().angle
}

/// `motion_blur_builtin`: directional blur with a random length and angle.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MotionBlurBuiltin {
    /// Probability per view. Default 0.5.
    #[serde(default = "half")]
    pub p: f64,
    /// Range of the length in pixels, drawn uniformly. Default [3, 9].
    #[serde(default = "default_length")]
    pub length: [f64; 2],
    /// Range of the angle in degrees (counter-clockwise), drawn uniformly. Default [0, 180].
    #[serde(default = "default_angle")]
    pub angle: [f64; 2],
    /// Views to blur (default: all).
    #[serde(default)]
    pub views: Option<Vec<u32>>,
}

impl MotionBlurBuiltin {
    fn params(&self) -> Params {
        Params { p: self.p, length: self.length, angle: self.angle }
    }
}

impl StageConfig for MotionBlurBuiltin {
    const KIND: &'static str = "motion_blur_builtin";
    const ABOUT: &'static str =
        "the motion_blur example plugin compiled in (for the plugin-overhead benchmark)";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Views, PortType::Views)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        if let Err(e) = self.params().check() {
            let field =
                ["length", "angle"].into_iter().find(|f| e.starts_with(&format!("`{f}`"))).unwrap_or("p");
            out.push(Problem::new(field, e, "see `motion_blur` in plugins/README.md"));
        }
        check_views(self.views.as_deref(), out);
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Map(Arc::new(self.clone())))
    }
}

impl MapStage for MotionBlurBuiltin {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        let params = self.params();
        for_each_view(sample, self.views.as_deref(), ctx, |img, rng| {
            check_image(img)?;
            let seed = rng.next_u64();
            if img.data.is_empty() {
                return Ok(());
            }
            let mut out = vec![0; img.data.len()];
            motion_blur::apply(&params, seed, &img.data, img.width as usize, img.height as usize, &mut out);
            img.data = out;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::testing::*;

    #[test]
    fn blurs_deterministically_and_keeps_sizes() {
        let s: MotionBlurBuiltin = serde_json::from_value(serde_json::json!({"p": 1.0})).unwrap();
        let img = noise_image(12, 9, 4);
        let a = run(&s, vec![img.clone(), img.clone()], 3, 7);
        assert_eq!(a, run(&s, vec![img.clone(), img.clone()], 3, 7));
        assert!(well_formed(&a));
        assert_ne!(a[0], img);
        assert_ne!(a[0], a[1], "each view draws its own length and angle");
    }

    #[test]
    fn reversed_ranges_are_reported() {
        let s: MotionBlurBuiltin = serde_json::from_value(serde_json::json!({"length": [9, 3]})).unwrap();
        let mut out = Vec::new();
        s.check(&Context::default(), &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].message.contains("minimum above"), "{}", out[0].message);
    }
}
