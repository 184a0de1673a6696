//! `synthetic_shapes`: the embedded dataset, drawn from the seed (no files).
//!
//! Each image shows one shape (the class) at a random position, scale and rotation, in a
//! random colour, over a random textured background. By default colour is drawn independently
//! of the class, so, as in the paper, a network that skips colour distortion can match the two
//! views of an image by their colour histogram instead of learning shapes. `class_color` ties
//! the shape's colour to its class instead, as classes of natural images have typical colours:
//! then the label also uses information that colour distortion removes, which is what the
//! paper's projection-head result (Figure 8, Table 3) rests on.

use std::f32::consts::{PI, TAU};
use std::sync::Arc;

use rand::Rng;
use serde::Deserialize;
use simclr_core::rng::{stage_key, StreamKey};
use simclr_core::{
    Context, Image, Payload, PortType, Problem, Role, Sample, SampleCtx, Source, SourceOptions, Stage,
    StageConfig, StageError,
};

/// The shapes, in class order.
pub const SHAPES: &[&str] = &["circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent"];

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SynthSplit {
    #[default]
    Train,
    /// Other images of the same distribution (held out).
    Test,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyntheticShapes {
    /// Images per epoch (default 2000).
    #[serde(default = "default_count")]
    pub count: u64,
    /// Side in pixels (default 32).
    #[serde(default = "default_size")]
    pub size: u32,
    /// Number of shape classes, 2..=8 (default 6).
    #[serde(default = "default_classes")]
    pub classes: u32,
    /// `train` (default) or `test`: disjoint images from the same distribution.
    #[serde(default)]
    pub split: SynthSplit,
    /// Seed of the dataset itself (default: the pipeline seed); keep it fixed across an
    /// ablation so only the method changes.
    #[serde(default)]
    pub data_seed: Option<u64>,
    /// Contrast of the background texture, 0 (flat) to 1 (full; default): lower values make
    /// the shapes stand out, for short demo-scale runs.
    #[serde(default = "full")]
    pub texture: f32,
    /// How much a shape's colour follows its class, 0 (independent: default) to 1 (one fixed
    /// colour per class). Between, the colour is that mix of a random colour and the class's
    /// own (8 hues around the colour wheel), like classes of natural images whose colours vary
    /// around a typical one (grass, sky). Only the shape's colour: the background stays random.
    #[serde(default)]
    pub class_color: f32,
}

fn default_count() -> u64 {
    2000
}
fn default_size() -> u32 {
    32
}
fn default_classes() -> u32 {
    6
}
fn full() -> f32 {
    1.0
}

impl StageConfig for SyntheticShapes {
    const KIND: &'static str = "synthetic_shapes";
    const ABOUT: &'static str = "source: generated images of coloured shapes on textures (no files)";
    const ROLE: Role = Role::Source;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Nothing, PortType::Views)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        if !(2..=SHAPES.len() as u32).contains(&self.classes) {
            out.push(Problem::new(
                "classes",
                format!("`classes` must be from 2 to {}", SHAPES.len()),
                "use e.g. `classes: 6`",
            ));
        }
        if !(8..=1024).contains(&self.size) {
            out.push(Problem::new("size", "`size` must be from 8 to 1024 pixels", "use e.g. `size: 32`"));
        }
        if self.count == 0 {
            out.push(Problem::new("count", "`count` must be positive", "use e.g. `count: 2000`"));
        }
        if !(0.0..=1.0).contains(&self.texture) {
            out.push(Problem::new("texture", "`texture` must be from 0 to 1", "use e.g. `texture: 0.5`"));
        }
        if !(0.0..=1.0).contains(&self.class_color) {
            out.push(Problem::new(
                "class_color",
                "`class_color` must be from 0 to 1",
                "use 0 (colour independent of the class) or e.g. `class_color: 0.5`",
            ));
        }
    }
    fn build(&self, cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Source(Arc::new(Shapes {
            count: self.count,
            size: self.size,
            classes: self.classes,
            look: Look { texture: self.texture, class_color: self.class_color },
            seed: self.data_seed.unwrap_or(cx.seed),
            offset: match self.split {
                SynthSplit::Train => 0,
                SynthSplit::Test => 1 << 40,
            },
            opts: cx.source,
        })))
    }
}

struct Shapes {
    count: u64,
    size: u32,
    look: Look,
    classes: u32,
    seed: u64,
    offset: u64,
    opts: SourceOptions,
}

impl Source for Shapes {
    fn len(&self) -> u64 {
        self.count
    }
    fn options(&self) -> SourceOptions {
        self.opts
    }
    fn read(&self, index: u64, _ctx: &SampleCtx) -> Result<Sample, StageError> {
        // Keyed by the index alone (not the epoch): the dataset is the same every epoch.
        let key = StreamKey {
            seed: self.seed,
            epoch: 0,
            index: index + self.offset,
            view: 0,
            stage: stage_key("synthetic_shapes"),
        };
        let class = (index % u64::from(self.classes)) as u32;
        let image = draw(self.size, class as usize, self.look, &mut key.rng());
        Ok(Sample { index, label: Some(class), payload: Payload::Views(vec![image]), ..Sample::default() })
    }
}

fn color(rng: &mut impl Rng) -> [f32; 3] {
    [rng.random(), rng.random(), rng.random()]
}

/// How an image is drawn besides its shape: see [`SyntheticShapes`]'s fields of the same names.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Look {
    pub texture: f32,
    pub class_color: f32,
}

/// The colour of class `shape`: 8 saturated hues spaced around the colour wheel.
fn class_rgb(shape: usize) -> [f32; 3] {
    let h = shape as f32 / SHAPES.len() as f32 * 6.0;
    let (v, s) = (0.9f32, 0.85f32);
    let f = |n: f32| {
        let k = (n + h).rem_euclid(6.0);
        v - v * s * k.min(4.0 - k).clamp(0.0, 1.0)
    };
    [f(5.0), f(3.0), f(1.0)]
}

/// Signed distance (negative inside) of a unit-sized shape at point (x, y).
fn distance(shape: usize, x: f32, y: f32) -> f32 {
    let r = (x * x + y * y).sqrt();
    let polygon = |n: f32, apothem: f32| {
        let seg = TAU / n;
        let a = y.atan2(x).rem_euclid(seg) - seg / 2.0;
        r * a.cos() - apothem
    };
    let boxd = |hx: f32, hy: f32| {
        let dx = x.abs() - hx;
        let dy = y.abs() - hy;
        dx.max(dy).min(0.0) + (dx.max(0.0).powi(2) + dy.max(0.0).powi(2)).sqrt()
    };
    match SHAPES[shape] {
        "circle" => r - 0.9,
        "square" => boxd(0.7, 0.7),
        "triangle" => polygon(3.0, 0.5),
        "star" => r - (0.4 + 0.55 * (0.5 + 0.5 * (5.0 * y.atan2(x)).cos()).powf(1.5)),
        "cross" => boxd(0.9, 0.28).min(boxd(0.28, 0.9)),
        "ring" => (r - 0.7).abs() - 0.2,
        "hexagon" => polygon(6.0, 0.8),
        _ => (r - 0.9).max(-(((x - 0.45).powi(2) + y * y).sqrt() - 0.7)), // crescent
    }
}

/// Draws one image of class `shape`.
pub fn draw(size: u32, shape: usize, look: Look, rng: &mut impl Rng) -> Image {
    let Look { texture, class_color } = look;
    let s = size as f32;
    let (bg_a, bg_b, fg) = (color(rng), color(rng), color(rng));
    // After the draws, so `class_color: 0` gives the images it always gave.
    let own = class_rgb(shape);
    let fg: [f32; 3] = std::array::from_fn(|c| fg[c] + (own[c] - fg[c]) * class_color);
    let bg_b: [f32; 3] = std::array::from_fn(|c| bg_a[c] + (bg_b[c] - bg_a[c]) * texture);
    let pattern = rng.random_range(0..3u32);
    let freq = rng.random_range(1.5f32..6.0) * TAU / s;
    let angle = rng.random_range(0.0f32..PI);
    let (ca, sa) = (angle.cos(), angle.sin());
    let phase = rng.random_range(0.0f32..TAU);
    let radius = rng.random_range(0.22f32..0.4) * s;
    let cx = rng.random_range(radius..s - radius);
    let cy = rng.random_range(radius..s - radius);
    let rot = rng.random_range(0.0f32..TAU);
    let (cr, sr) = (rot.cos(), rot.sin());
    let mut img = Image::new(size, size);
    for (i, px) in img.data.chunks_exact_mut(3).enumerate() {
        let (x, y) = ((i as u32 % size) as f32 + 0.5, (i as u32 / size) as f32 + 0.5);
        let u = x * ca + y * sa;
        let v = -x * sa + y * ca;
        let t = match pattern {
            0 => 0.5 + 0.5 * (u * freq + phase).sin(),
            1 => {
                if ((u * freq / PI).floor() as i64 + (v * freq / PI).floor() as i64) % 2 == 0 {
                    1.0
                } else {
                    0.0
                }
            }
            _ => 0.5 + 0.25 * (u * freq + phase).sin() + 0.25 * (v * freq * 1.7 - phase).sin(),
        };
        let (dx, dy) = ((x - cx) / radius, (y - cy) / radius);
        let d = distance(shape, dx * cr + dy * sr, -dx * sr + dy * cr);
        // One pixel of anti-aliasing at the edge.
        let alpha = (0.5 - d * radius).clamp(0.0, 1.0);
        for c in 0..3 {
            let bg = bg_a[c] * t + bg_b[c] * (1.0 - t);
            px[c] = ((fg[c] * alpha + bg * (1.0 - alpha)) * 255.0 + 0.5) as u8;
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use simclr_core::rng::StreamKey;

    #[test]
    fn every_shape_has_pixels_inside_and_outside() {
        for (shape, name) in SHAPES.iter().enumerate() {
            let inside = (0..64 * 64)
                .filter(|i| distance(shape, (i % 64) as f32 / 32.0 - 1.0, (i / 64) as f32 / 32.0 - 1.0) < 0.0)
                .count();
            assert!(inside > 200 && inside < 64 * 64 - 200, "{name}: {inside}");
        }
    }

    const PLAIN: Look = Look { texture: 1.0, class_color: 0.0 };

    /// Mean red of 200 images of `class` (16x16).
    fn mean_red(class: usize, look: Look) -> f32 {
        let n = 200;
        (0..n)
            .map(|i| {
                let key = StreamKey { seed: 3, epoch: 0, index: i * 10 + class as u64, view: 0, stage: 1 };
                let img = draw(16, class, look, &mut key.rng());
                img.data.iter().step_by(3).map(|&r| f32::from(r)).sum::<f32>() / 256.0
            })
            .sum::<f32>()
            / n as f32
    }

    #[test]
    fn images_are_reproducible_and_color_is_independent_of_class() {
        let key = |i| StreamKey { seed: 3, epoch: 0, index: i, view: 0, stage: 1 };
        assert_eq!(draw(32, 2, PLAIN, &mut key(5).rng()), draw(32, 2, PLAIN, &mut key(5).rng()));
        assert_ne!(draw(32, 2, PLAIN, &mut key(5).rng()), draw(32, 2, PLAIN, &mut key(6).rng()));
        // Mean colour per class: with colours drawn independently of the class, the class
        // means differ by far less than the spread of single images.
        let (a, b) = (mean_red(0, PLAIN), mean_red(4, PLAIN));
        assert!((a - b).abs() < 12.0, "red means {a} vs {b}");
    }

    #[test]
    fn class_color_ties_the_shape_colour_to_the_class() {
        // Class 0 is red, class 4 cyan: their mean red differs once colour follows the class.
        let tied = Look { texture: 1.0, class_color: 0.8 };
        let (a, b) = (mean_red(0, tied), mean_red(4, tied));
        assert!(a - b > 30.0, "red means {a} vs {b}");
        // At 1 every image of a class has the same shape colour: a filled circle (radius at
        // least 0.22 x 0.9 x 48 = 9.5 px) covers over 150 pixels of exactly the class colour.
        let own = class_rgb(0).map(|c| f32::from((c * 255.0 + 0.5) as u8));
        for i in 0..20 {
            let key = StreamKey { seed: 9, epoch: 0, index: i, view: 0, stage: 1 };
            let img = draw(48, 0, Look { texture: 0.0, class_color: 1.0 }, &mut key.rng());
            let of_class = img
                .data
                .chunks_exact(3)
                .filter(|px| px.iter().zip(own).all(|(&p, o)| f32::from(p) == o))
                .count();
            assert!(of_class > 150, "image {i}: {of_class} pixels of the class colour");
        }
    }

    #[test]
    fn class_color_outside_0_to_1_is_reported() {
        for (v, problems) in [(0.0, 0), (0.4, 0), (1.0, 0), (1.5, 1), (-0.1, 1)] {
            let s: SyntheticShapes = serde_json::from_value(serde_json::json!({"class_color": v})).unwrap();
            let mut out = Vec::new();
            s.check(&Context::default(), &mut out);
            assert_eq!(out.len(), problems, "class_color {v}: {out:?}");
            if problems > 0 {
                assert!(out[0].message.contains("`class_color`"), "{}", out[0].message);
            }
        }
    }

    #[test]
    fn class_colours_are_distinct() {
        for a in 0..SHAPES.len() {
            for b in 0..a {
                let d: f32 = class_rgb(a).iter().zip(class_rgb(b)).map(|(x, y)| (x - y).abs()).sum();
                assert!(d > 0.3, "classes {a} and {b}: {:?} vs {:?}", class_rgb(a), class_rgb(b));
            }
        }
    }
}
