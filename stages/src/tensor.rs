//! `to_tensor` (per sample, on the workers) and `batch` (in order, on the collector).

use std::mem::MaybeUninit;
use std::sync::Arc;

use serde::Deserialize;
use simclr_core::{
    Batch, Batcher, BufferPool, Context, Image, MapStage, Payload, PortType, Problem, Role, Sample,
    SampleCtx, Stage, StageConfig, StageError, Tensor,
};

/// `to_tensor`: RGB8 views to f32 3 x H x W in [0, 1], optionally normalized.
use crate::augment::color::multiversion;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToTensor {
    /// Per-channel mean to subtract (default none: the official code feeds [0, 1]).
    #[serde(default)]
    pub mean: Option<[f32; 3]>,
    /// Per-channel standard deviation to divide by (with `mean`).
    #[serde(default)]
    pub std: Option<[f32; 3]>,
}

impl StageConfig for ToTensor {
    const KIND: &'static str = "to_tensor";
    const ABOUT: &'static str = "views to f32 C x H x W tensors in [0,1] (optional mean/std)";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Views, PortType::Tensors)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        if self.mean.is_some() != self.std.is_some() {
            out.push(Problem::new("mean", "`mean` and `std` go together", "give both or neither"));
        }
        if self.std.is_some_and(|s| s.iter().any(|&x| x <= 0.0 || !x.is_finite())) {
            out.push(Problem::new(
                "std",
                "`std` values must be positive",
                "e.g. `std: [0.229, 0.224, 0.225]`",
            ));
        }
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        let (mean, std) = (self.mean.unwrap_or([0.0; 3]), self.std.unwrap_or([1.0; 3]));
        Ok(Stage::Map(Arc::new(ToTensorStage { affine: Affine::new(mean, std) })))
    }
}

/// Planar f32 tensor of an RGB8 image, with `(x / 255 - mean) / std` per channel.
pub fn image_to_chw(img: &Image, mean: [f32; 3], std: [f32; 3]) -> Tensor {
    image_to_chw_with(img, &Affine::new(mean, std))
}

/// `x * scale - shift` per channel, with `scale = 1 / (255 std)` and `shift = mean / std`.
struct Affine {
    scale: [f32; 3],
    shift: [f32; 3],
}

impl Affine {
    fn new(mean: [f32; 3], std: [f32; 3]) -> Self {
        Self {
            scale: std::array::from_fn(|c| 1.0 / (255.0 * std[c])),
            shift: std::array::from_fn(|c| mean[c] / std[c]),
        }
    }
}

multiversion! {
    /// Interleaved u8 RGB -> the three f32 planes `r`, `g`, `b` (one multiply and one subtract
    /// per value: the same bits in every build).
    fn deinterleave(src: &[u8], r: &mut [MaybeUninit<f32>], g: &mut [MaybeUninit<f32>], b: &mut [MaybeUninit<f32>], scale: [f32; 3], shift: [f32; 3]) {
        for (((px, r), g), b) in src.chunks_exact(3).zip(r.iter_mut()).zip(g.iter_mut()).zip(b.iter_mut()) {
            r.write(f32::from(px[0]) * scale[0] - shift[0]);
            g.write(f32::from(px[1]) * scale[1] - shift[1]);
            b.write(f32::from(px[2]) * scale[2] - shift[2]);
        }
    }
}

/// Writes the planes straight into the tensor's buffer, without zero-filling it first.
fn image_to_chw_with(img: &Image, f: &Affine) -> Tensor {
    let n = img.pixels();
    let shape = vec![3, img.height as usize, img.width as usize];
    let Some(src) = img.data.get(..3 * n) else {
        // A buffer shorter than its size says (only a hand-made `Image`): the missing values are 0.
        let mut src = img.data.clone();
        src.resize(3 * n, 0);
        return image_to_chw_with(&Image { data: src, ..*img }, f);
    };
    let mut data: Vec<f32> = Vec::with_capacity(3 * n);
    let spare = &mut data.spare_capacity_mut()[..3 * n];
    let (r, rest) = spare.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    deinterleave(src, r, g, b, f.scale, f.shift);
    // SAFETY: `deinterleave` wrote all 3n values: `src` holds exactly n pixels and each of
    // the planes n slots.
    unsafe { data.set_len(3 * n) };
    Tensor { shape, data }
}

/// The built `to_tensor` stage.
struct ToTensorStage {
    affine: Affine,
}

impl MapStage for ToTensorStage {
    fn apply(&self, sample: &mut Sample, _ctx: &SampleCtx) -> Result<(), StageError> {
        let Payload::Views(views) = &sample.payload else {
            return Err(StageError::fatal("`to_tensor` needs image views"));
        };
        let tensors = views.iter().map(|v| image_to_chw_with(v, &self.affine)).collect();
        sample.payload = Payload::Tensors(tensors);
        Ok(())
    }
}

/// `batch`: groups consecutive samples into N x C x H x W tensors, one per view.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    pub batch_size: usize,
    /// Drop the last, smaller batch of each epoch (default true, as training loaders do).
    #[serde(default = "yes")]
    pub drop_last: bool,
}

fn yes() -> bool {
    true
}

impl StageConfig for BatchConfig {
    const KIND: &'static str = "batch";
    const ABOUT: &'static str = "groups consecutive samples into batches (dataset order)";
    const ROLE: Role = Role::Batch;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Tensors, PortType::Batch)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        if self.batch_size == 0 {
            out.push(Problem::new("batch_size", "`batch_size` must be positive", "e.g. `batch_size: 256`"));
        }
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Batch(Box::new(BatchBuilder::new(self.batch_size, self.drop_last))))
    }
}

/// Collects samples until a batch is full (or the epoch changes).
///
/// Batch buffers come from a pool that dropped batches return to, so in steady state (the sink
/// drops each batch before the next is made) no batch memory is allocated or faulted in.
pub struct BatchBuilder {
    cfg: BatchConfig,
    pending: Vec<Sample>,
    pool: BufferPool,
}

impl BatchBuilder {
    pub fn new(batch_size: usize, drop_last: bool) -> Self {
        Self { cfg: BatchConfig { batch_size, drop_last }, pending: Vec::new(), pool: BufferPool::default() }
    }

    fn assemble(&mut self) -> Result<Option<Sample>, StageError> {
        let samples = std::mem::take(&mut self.pending);
        let Some(first) = samples.first() else { return Ok(None) };
        if samples.len() < self.cfg.batch_size && self.cfg.drop_last {
            return Ok(None);
        }
        let Payload::Tensors(proto) = &first.payload else {
            return Err(StageError::fatal("`batch` needs tensors; put `to_tensor` before it"));
        };
        let n = samples.len();
        let mut views: Vec<Tensor> = proto
            .iter()
            .map(|t| {
                let mut shape = vec![n];
                shape.extend(&t.shape);
                Tensor { shape, data: self.pool.take(n * t.data.len()) }
            })
            .collect();
        let (epoch, index) = (first.epoch, first.index);
        let mut batch = Batch {
            views: Vec::new(),
            indices: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
            pool: Some(self.pool.clone()),
        };
        for s in samples {
            let Payload::Tensors(ts) = s.payload else {
                return Err(StageError::fatal("`batch` needs tensors; put `to_tensor` before it"));
            };
            if ts.len() != views.len() || ts.iter().zip(&views).any(|(t, v)| t.shape[..] != v.shape[1..]) {
                return Err(StageError::fatal(format!(
                    "sample {} has views of another shape than the batch's first; crop/resize all views to one size",
                    s.index
                )));
            }
            for (v, t) in views.iter_mut().zip(ts) {
                v.data.extend_from_slice(&t.data);
            }
            batch.indices.push(s.index);
            batch.labels.push(s.label);
        }
        batch.views = views;
        Ok(Some(Sample { index, epoch, payload: Payload::Batch(batch), ..Sample::default() }))
    }
}

impl Batcher for BatchBuilder {
    fn push(&mut self, sample: Sample) -> Result<Option<Sample>, StageError> {
        let mut out = None;
        if self.pending.first().is_some_and(|p| p.epoch != sample.epoch) {
            out = self.assemble()?;
        }
        self.pending.push(sample);
        if self.pending.len() >= self.cfg.batch_size {
            // At most one batch per push: an epoch change just emitted the partial one, and
            // a fresh batch holds one sample, so both cannot happen at once unless size is 1.
            if out.is_none() {
                out = self.assemble()?;
            }
        }
        Ok(out)
    }

    fn flush(&mut self) -> Result<Option<Sample>, StageError> {
        self.assemble()
    }

    fn worker_batch_size(&self) -> Option<usize> {
        // Larger batches stay on the collector: a chunk of a whole batch per worker in flight
        // would hold several batches in memory (ImageNet's 4,096 x 224 x 224 views: 5 GB each).
        (self.cfg.batch_size <= MAX_WORKER_BATCH).then_some(self.cfg.batch_size)
    }

    fn fork(&self) -> Option<Box<dyn Batcher>> {
        Some(Box::new(Self { cfg: self.cfg.clone(), pending: Vec::new(), pool: self.pool.clone() }))
    }
}

/// Batch sizes up to this are assembled in the workers (see [`Batcher::worker_batch_size`]).
const MAX_WORKER_BATCH: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(index: u64, epoch: u32, value: u8) -> Sample {
        let img = Image { width: 2, height: 1, data: vec![value, 0, 255, value, 0, 255] };
        let t = image_to_chw(&img, [0.0; 3], [1.0; 3]);
        Sample {
            index,
            epoch,
            label: Some(index as u32),
            payload: Payload::Tensors(vec![t.clone(), t]),
            ..Sample::default()
        }
    }

    #[test]
    fn to_tensor_is_planar_and_normalized() {
        let img = Image { width: 2, height: 1, data: vec![255, 0, 51, 0, 255, 102] };
        let t = image_to_chw(&img, [0.0; 3], [1.0; 3]);
        assert_eq!(t.shape, vec![3, 1, 2]);
        let want = [255.0, 0.0, 0.0, 255.0, 51.0, 102.0].map(|x: f32| x / 255.0);
        assert!(t.data.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{:?}", t.data);
        let t = image_to_chw(&img, [0.5; 3], [0.5; 3]);
        assert!((t.data[0] - 1.0).abs() < 1e-6 && (t.data[1] + 1.0).abs() < 1e-6);
    }

    #[test]
    fn dropped_batches_return_their_buffers() {
        let mut b = BatchBuilder::new(2, false);
        assert!(b.push(sample(0, 0, 1)).unwrap().is_none());
        let first = b.push(sample(1, 0, 2)).unwrap().unwrap();
        let ptr = match &first.payload {
            Payload::Batch(batch) => batch.views[0].data.as_ptr(),
            _ => panic!("not a batch"),
        };
        assert_eq!(b.pool.kept(), 0);
        drop(first);
        assert_eq!(b.pool.kept(), 2);
        assert!(b.push(sample(2, 0, 3)).unwrap().is_none());
        let second = b.push(sample(3, 0, 4)).unwrap().unwrap();
        let Payload::Batch(batch) = &second.payload else { panic!("not a batch") };
        assert!(batch.views.iter().any(|v| v.data.as_ptr() == ptr), "a returned buffer is reused");
        // Same contents as a fresh buffer would hold.
        assert!((batch.views[0].data[0] - 3.0 / 255.0).abs() < 1e-7);
        assert_eq!(batch.views[0].data.len(), 2 * 6);
        assert_eq!(batch.indices, vec![2, 3]);
    }

    #[test]
    fn to_tensor_matches_the_per_pixel_formula() {
        let data: Vec<u8> = (0..=255u8).flat_map(|x| [x, x.wrapping_mul(7), 255 - x]).collect();
        let img = Image { width: 16, height: 16, data };
        let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
        let t = image_to_chw(&img, mean, std);
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let want = f32::from(px[c]) * (1.0 / (255.0 * std[c])) - mean[c] / std[c];
                assert_eq!(t.data[c * 256 + i].to_bits(), want.to_bits());
            }
        }
    }

    #[test]
    fn a_short_buffer_is_not_a_panic() {
        let img = Image { width: 2, height: 2, data: vec![255; 6] };
        let t = image_to_chw(&img, [0.0; 3], [1.0; 3]);
        assert_eq!(t.data.len(), 12);
        assert_eq!((t.data[0], t.data[3]), (1.0, 0.0));
    }

    #[test]
    fn batches_keep_order_and_split_at_epochs() {
        let mut b = BatchBuilder::new(2, false);
        let mut out = Vec::new();
        for (i, e) in [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1)] {
            out.extend(b.push(sample(i, e, i as u8)).unwrap());
        }
        out.extend(b.flush().unwrap());
        let shapes: Vec<Vec<u64>> = out
            .iter()
            .map(|s| match &s.payload {
                Payload::Batch(b) => b.indices.clone(),
                _ => vec![],
            })
            .collect();
        assert_eq!(shapes, vec![vec![0, 1], vec![2], vec![3, 4]]);
        let Payload::Batch(first) = &out[0].payload else { panic!("not a batch") };
        assert_eq!(first.views[0].shape, vec![2, 3, 1, 2]);
        assert_eq!(first.views[0].data[6], 1.0 / 255.0); // sample 1's first red value
        let mut dropping = BatchBuilder::new(2, true);
        let kept: Vec<Sample> = (0..3).filter_map(|i| dropping.push(sample(i, 0, 0)).unwrap()).collect();
        assert_eq!(kept.len(), 1);
        assert!(dropping.flush().unwrap().is_none());
    }
}
