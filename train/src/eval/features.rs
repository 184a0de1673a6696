//! Frozen encoders as artifacts, the evaluation transform, and feature extraction over a
//! labeled source.

use std::sync::Mutex;
use std::time::Instant;

use rayon::prelude::*;
use serde::Deserialize;
use simclr_core::driver::DataSource;
use simclr_core::rng::stage_key;
use simclr_core::{Context, Image, OnError, Payload, Problem, SampleCtx, StageError};
use simclr_stages::augment::crop::crop_resize;
use simclr_stages::tensor::image_to_chw;

use super::linear::Features;
use crate::config::SimclrTrain;
use crate::trainer::Engine;

/// A function from a batch of images (N x 3 x H x W) to their features (N x dim).
pub type EncodeFn<'a> = dyn Fn(&[f32], [usize; 4]) -> Result<Vec<f32>, String> + 'a;

/// Computes the representation h of a batch of images (N x 3 x H x W), frozen.
pub trait Encode: Send {
    fn encode(&self, images: &[f32], shape: [usize; 4]) -> Result<Vec<f32>, String>;
    /// The encoder's weights and running statistics (torchvision names).
    fn tensors(&self) -> Vec<crate::export::NamedTensor>;
}

/// A SimCLR engine seen as a frozen encoder.
pub struct EngineEncoder(pub Box<dyn Engine>);

impl Encode for EngineEncoder {
    fn encode(&self, images: &[f32], shape: [usize; 4]) -> Result<Vec<f32>, String> {
        self.0.encode(images, shape)
    }
    fn tensors(&self) -> Vec<crate::export::NamedTensor> {
        self.0.encoder_tensors()
    }
}

/// A trained (or untrained) encoder handed to evaluation stages under its stage id.
pub struct EncoderArtifact {
    /// The stage that made it.
    pub stage: String,
    /// The name results are filed under: `simclr`, `supervised`, `random_init`.
    pub method: String,
    /// Its architecture (backbone, stem, width, device).
    pub arch: SimclrTrain,
    pub encoder: Mutex<Box<dyn Encode>>,
}

impl EncoderArtifact {
    pub fn tensors(&self) -> Vec<crate::export::NamedTensor> {
        self.encoder.lock().unwrap_or_else(|p| p.into_inner()).tensors()
    }

    pub fn encode(&self, images: &[f32], shape: [usize; 4]) -> Result<Vec<f32>, String> {
        let e = self.encoder.lock().unwrap_or_else(|p| p.into_inner());
        e.encode(images, shape)
    }
}

/// The evaluation transform: images up to 32 px go in as they are; larger ones are centre-cropped
/// to `crop_fraction` of their shorter side and resized to `size` x `size` (bilinear).
#[derive(Clone, Debug, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalTransform {
    /// Side fed to the encoder for images larger than 32 px (default 224).
    #[serde(default = "default_size")]
    pub size: u32,
    /// Fraction of the shorter side kept by the centre crop (default 0.875).
    #[serde(default = "default_crop")]
    pub crop_fraction: f64,
    /// Per-channel mean subtracted after scaling to [0, 1] (default none; match `to_tensor`).
    #[serde(default)]
    pub mean: Option<[f32; 3]>,
    /// Per-channel standard deviation divided by (default none; match `to_tensor`).
    #[serde(default)]
    pub std: Option<[f32; 3]>,
}

fn default_size() -> u32 {
    224
}
fn default_crop() -> f64 {
    0.875
}

impl Default for EvalTransform {
    fn default() -> Self {
        Self { size: 224, crop_fraction: 0.875, mean: None, std: None }
    }
}

impl EvalTransform {
    pub fn problems(&self, field: &str) -> Vec<Problem> {
        let mut out = Vec::new();
        if !(1..=4096).contains(&self.size) {
            out.push(Problem::new(
                &format!("{field}.size"),
                "`size` must be from 1 to 4096",
                "e.g. `size: 224`",
            ));
        }
        if !(self.crop_fraction > 0.0 && self.crop_fraction <= 1.0) {
            out.push(Problem::new(
                &format!("{field}.crop_fraction"),
                "`crop_fraction` must be in (0, 1]",
                "e.g. `crop_fraction: 0.875`",
            ));
        }
        if self.std.is_some_and(|s| s.iter().any(|v| !(v.is_finite() && *v > 0.0))) {
            out.push(Problem::new(
                &format!("{field}.std"),
                "`std` entries must be positive",
                "e.g. `std: [0.229, 0.224, 0.225]`",
            ));
        }
        out
    }

    /// The image as the encoder sees it.
    pub fn apply(&self, img: &Image) -> Result<Image, StageError> {
        if img.width.max(img.height) <= 32 {
            return Ok(img.clone());
        }
        let side = ((f64::from(img.width.min(img.height)) * self.crop_fraction).round() as u32).max(1);
        let (x, y) = ((img.width - side) / 2, (img.height - side) / 2);
        crop_resize(
            img,
            (x, y, side, side),
            self.size,
            self.size,
            fast_image_resize::ResizeAlg::Convolution(fast_image_resize::FilterType::Bilinear),
        )
    }

    /// A stable text for cache keys.
    pub fn key(&self) -> String {
        format!("{}:{}:{:?}:{:?}", self.size, self.crop_fraction, self.mean, self.std)
    }
}

/// The encoder artifact of stage `id`, or an error saying what to name instead.
pub fn encoder_of(
    cx: &Context,
    field: &str,
    id: &str,
) -> Result<std::sync::Arc<EncoderArtifact>, StageError> {
    cx.artifacts.get::<EncoderArtifact>(id).ok_or_else(|| {
        StageError::fatal(format!(
            "`{field}: {id}` gave no encoder: name a `simclr_train`, `supervised_train` or `random_init` stage"
        ))
    })
}

/// The data source of stage `id`.
pub fn source_of(cx: &Context, field: &str, id: &str) -> Result<std::sync::Arc<DataSource>, StageError> {
    cx.artifacts.get::<DataSource>(id).ok_or_else(|| {
        StageError::fatal(format!(
            "`{field}: {id}` is not a source stage: name a labeled source (e.g. `cifar10` with `split: test`)"
        ))
    })
}

/// Reads item `index` of `data` as an evaluation image and its label.
pub fn read_one(
    data: &DataSource,
    index: u64,
    seed: u64,
    t: &EvalTransform,
) -> Result<(Image, u32), StageError> {
    let ctx = SampleCtx { seed, stage_key: stage_key(&data.id), epoch: 0, index };
    let sample = data.source.read(index, &ctx)?;
    let img = match sample.payload {
        Payload::Encoded(bytes) => {
            simclr_stages::decode::decode(&bytes, 100_000_000).map_err(StageError::data)?
        }
        Payload::Views(mut v) if !v.is_empty() => v.swap_remove(0),
        _ => return Err(StageError::fatal(format!("source '{}' does not give images", data.id))),
    };
    let Some(label) = sample.label else {
        return Err(StageError::fatal(format!(
            "source '{}' ({}) gives unlabeled images; evaluation needs labels (e.g. a labeled split)",
            data.id, data.kind
        )));
    };
    Ok((t.apply(&img)?, label))
}

/// Reads, transforms (`augment`, e.g. crop + flip) and encodes the items `indices` of `data`;
/// bad items are skipped (and logged) when the source says `on_error: skip`. Returns the
/// features and how many items were skipped.
pub fn encode_items(
    encode: &EncodeFn<'_>,
    data: &DataSource,
    indices: &[u64],
    t: &EvalTransform,
    seed: u64,
    augment: &(dyn Fn(Image, u64) -> Result<Image, StageError> + Sync),
) -> Result<(Features, u64), StageError> {
    let skip = data.source.options().on_error == OnError::Skip;
    let read: Vec<Result<(Image, u32), StageError>> = indices
        .par_iter()
        .map(|&i| read_one(data, i, seed, t).and_then(|(img, y)| Ok((augment(img, i)?, y))))
        .collect();
    let mut out = Features::default();
    let mut pixels = Vec::new();
    let mut shape: Option<(u32, u32)> = None;
    let mut skipped = 0;
    let (mean, std) = (t.mean.unwrap_or([0.0; 3]), t.std.unwrap_or([1.0; 3]));
    for (r, &i) in read.into_iter().zip(indices) {
        let (img, label) = match r {
            Ok(x) => x,
            Err(StageError::Data(msg)) if skip => {
                tracing::warn!("source '{}': skipped item {i}: {msg}", data.id);
                skipped += 1;
                continue;
            }
            Err(e) => return Err(StageError::fatal(format!("source '{}', item {i}: {e}", data.id))),
        };
        let s = *shape.get_or_insert((img.width, img.height));
        if s != (img.width, img.height) {
            return Err(StageError::fatal(format!(
                "source '{}': item {i} is {}x{} but earlier ones are {}x{}; images above 32 px \
                 are resized by `transform.size`, smaller ones must all have one size",
                data.id, img.width, img.height, s.0, s.1
            )));
        }
        pixels.extend(image_to_chw(&img, mean, std).data);
        out.y.push(label);
        out.index.push(i);
    }
    if let (Some((w, h)), n @ 1..) = (shape, out.y.len()) {
        out.x = encode(&pixels, [n, 3, h as usize, w as usize]).map_err(StageError::fatal)?;
        out.dim = out.x.len() / n;
    }
    Ok((out, skipped))
}

/// Items of `data` an evaluation reads: the whole source, or its `limit`.
pub fn eval_len(data: &DataSource) -> u64 {
    let n = data.source.len();
    data.source.options().limit.map_or(n, |l| l.min(n))
}

/// Runs `encode` (named `who` in messages) over every item of `data` (in index order, `batch`
/// at a time).
pub fn extract(
    who: &str,
    encode: &EncodeFn<'_>,
    data: &DataSource,
    t: &EvalTransform,
    seed: u64,
    batch: usize,
) -> Result<Features, StageError> {
    let start = Instant::now();
    let indices: Vec<u64> = (0..eval_len(data)).collect();
    let mut out = Features::default();
    let mut skipped = 0u64;
    for chunk in indices.chunks(batch.max(1)) {
        let (f, s) = encode_items(encode, data, chunk, t, seed, &|img, _| Ok(img))?;
        skipped += s;
        if !f.is_empty() {
            out.dim = f.dim;
            out.x.extend(f.x);
            out.y.extend(f.y);
            out.index.extend(f.index);
        }
    }
    if out.is_empty() {
        return Err(StageError::fatal(format!("source '{}' gave no images to evaluate on", data.id)));
    }
    tracing::info!(
        "features of '{}' by '{}': {} x {} in {:.1} s{}",
        data.id,
        who,
        out.len(),
        out.dim,
        start.elapsed().as_secs_f64(),
        if skipped > 0 { format!(" ({skipped} bad items skipped)") } else { String::new() }
    );
    Ok(out)
}

/// Features of `data` under `encoder`, computed once per run and shared by the stages that ask.
pub fn cached_features(
    cx: &Context,
    encoder_id: &str,
    data_id: &str,
    data_field: &str,
    t: &EvalTransform,
) -> Result<std::sync::Arc<Features>, StageError> {
    let key = format!("features:{encoder_id}:{data_id}:{}", t.key());
    if let Some(f) = cx.artifacts.get::<Features>(&key) {
        return Ok(f);
    }
    let encoder = encoder_of(cx, "encoder", encoder_id)?;
    let data = source_of(cx, data_field, data_id)?;
    let f = extract(&encoder.stage, &|x, shape| encoder.encode(x, shape), &data, t, cx.seed, 256)?;
    cx.artifacts.put(&key, f);
    cx.artifacts.get::<Features>(&key).ok_or_else(|| StageError::fatal("feature cache lost its entry"))
}
