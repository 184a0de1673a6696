//! `to_tensor` (per sample, on the workers) and `batch` (in order, on the collector).

use std::mem::MaybeUninit;
use std::sync::Arc;

use serde::Deserialize;
use simclr_core::{
    Batch, Batcher, BufferPool, Context, Image, MapStage, Payload, PortType, Problem, Role, Sample,
    SampleCtx, Stage, StageConfig, StageError, Tensor, TensorWriter,
};

/// `to_tensor`: RGB8 views to f32 3 x H x W in [0, 1], optionally normalized.
use simclr_core::multiversion;

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
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
    let mut data = Vec::new();
    append_chw(img, f, &mut data);
    Tensor { shape: vec![3, img.height as usize, img.width as usize], data }
}

/// Appends the image's three planes to `dst` (the batch, when `to_tensor` is fused into it).
fn append_chw(img: &Image, f: &Affine, dst: &mut Vec<f32>) {
    let n = img.pixels();
    let Some(src) = img.data.get(..3 * n) else {
        // A buffer shorter than its size says (only a hand-made `Image`): the missing values are 0.
        let mut src = img.data.clone();
        src.resize(3 * n, 0);
        return append_chw(&Image { data: src, ..*img }, f, dst);
    };
    dst.reserve(3 * n);
    let spare = &mut dst.spare_capacity_mut()[..3 * n];
    let (r, rest) = spare.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    deinterleave(src, r, g, b, f.scale, f.shift);
    // SAFETY: `deinterleave` wrote all 3n values after the current end: `src` holds exactly n
    // pixels and each of the planes n slots.
    unsafe { dst.set_len(dst.len() + 3 * n) };
}

/// The built `to_tensor` stage.
struct ToTensorStage {
    affine: Affine,
}

fn needs_views() -> StageError {
    StageError::fatal("`to_tensor` needs image views")
}

impl MapStage for ToTensorStage {
    fn apply(&self, sample: &mut Sample, _ctx: &SampleCtx) -> Result<(), StageError> {
        let Payload::Views(views) = &sample.payload else { return Err(needs_views()) };
        let tensors = views.iter().map(|v| image_to_chw_with(v, &self.affine)).collect();
        sample.payload = Payload::Tensors(tensors);
        Ok(())
    }

    fn as_tensor_writer(&self) -> Option<&dyn TensorWriter> {
        Some(self)
    }
}

impl TensorWriter for ToTensorStage {
    fn shapes(&self, sample: &Sample) -> Result<Vec<Vec<usize>>, StageError> {
        let Payload::Views(views) = &sample.payload else { return Err(needs_views()) };
        Ok(views.iter().map(|v| vec![3, v.height as usize, v.width as usize]).collect())
    }

    fn append(&self, sample: &Sample, view: usize, dst: &mut Vec<f32>) -> Result<(), StageError> {
        let Payload::Views(views) = &sample.payload else { return Err(needs_views()) };
        let img =
            views.get(view).ok_or_else(|| StageError::fatal(format!("the sample has no view {view}")))?;
        append_chw(img, &self.affine, dst);
        Ok(())
    }
}

/// `batch`: groups consecutive samples into N x C x H x W tensors, one per view.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    #[schemars(range(min = 1))]
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
/// Each sample's views are copied into the batch as it arrives, and its tensors are dropped at
/// once: the copy reads them while they are still in cache, and the allocator hands the same
/// block to the next sample's `to_tensor` (holding a whole batch of samples first, as this did,
/// made every copy a read from memory). Batch buffers come from a pool that dropped batches
/// return to, so in steady state (the sink drops each batch before the next is made) no batch
/// memory is allocated or faulted in.
pub struct BatchBuilder {
    cfg: BatchConfig,
    building: Option<Building>,
    pool: BufferPool,
}

/// The batch being filled.
struct Building {
    epoch: u32,
    first_index: u64,
    /// One buffer per view, with room for `batch_size` samples; `shapes` are the per-sample ones.
    views: Vec<Vec<f32>>,
    shapes: Vec<Vec<usize>>,
    indices: Vec<u64>,
    labels: Vec<Option<u32>>,
}

fn needs_tensors() -> StageError {
    StageError::fatal("`batch` needs tensors; put `to_tensor` before it")
}

impl BatchBuilder {
    pub fn new(batch_size: usize, drop_last: bool) -> Self {
        Self { cfg: BatchConfig { batch_size, drop_last }, building: None, pool: BufferPool::default() }
    }

    /// Copies the sample's views into the batch being filled (starting one if none is).
    fn add(&mut self, s: Sample) -> Result<(), StageError> {
        let Payload::Tensors(ts) = &s.payload else { return Err(needs_tensors()) };
        let shapes: Vec<Vec<usize>> = ts.iter().map(|t| t.shape.clone()).collect();
        self.add_with(&s, &shapes, |view, dst| {
            if let Some(t) = ts.get(view) {
                dst.extend_from_slice(&t.data);
            }
            Ok(())
        })
    }

    /// Appends one sample whose views have `shapes`, each written by `write(view, buffer)`.
    fn add_with(
        &mut self,
        s: &Sample,
        shapes: &[Vec<usize>],
        mut write: impl FnMut(usize, &mut Vec<f32>) -> Result<(), StageError>,
    ) -> Result<(), StageError> {
        let b = match &mut self.building {
            Some(b) => b,
            None => {
                // Room for the whole batch up front (address space only until written); an
                // absurd `batch_size` reserves less and the buffers grow.
                let room = self.cfg.batch_size.min(1 << 16);
                self.building.insert(Building {
                    epoch: s.epoch,
                    first_index: s.index,
                    views: shapes
                        .iter()
                        .map(|shape| self.pool.take(room.saturating_mul(shape.iter().product())))
                        .collect(),
                    shapes: shapes.to_vec(),
                    indices: Vec::with_capacity(room),
                    labels: Vec::with_capacity(room),
                })
            }
        };
        if shapes != b.shapes.as_slice() {
            return Err(StageError::fatal(format!(
                "sample {} has views of another shape than the batch's first; crop/resize all views to one size",
                s.index
            )));
        }
        for (view, (dst, shape)) in b.views.iter_mut().zip(shapes).enumerate() {
            let before = dst.len();
            write(view, dst)?;
            let expected: usize = shape.iter().product();
            if dst.len() - before != expected {
                return Err(StageError::fatal(format!(
                    "sample {}: view {view} gave {} values for shape {shape:?} ({expected})",
                    s.index,
                    dst.len() - before
                )));
            }
        }
        b.indices.push(s.index);
        b.labels.push(s.label);
        Ok(())
    }

    /// The batch being filled, as a sample (none if empty, or partial under `drop_last`).
    fn finish(&mut self) -> Option<Sample> {
        let b = self.building.take()?;
        let n = b.indices.len();
        if n < self.cfg.batch_size && self.cfg.drop_last {
            for v in b.views {
                self.pool.put(v);
            }
            return None;
        }
        let views = b
            .views
            .into_iter()
            .zip(b.shapes)
            .map(|(data, per)| {
                let mut shape = Vec::with_capacity(per.len() + 1);
                shape.push(n);
                shape.extend(per);
                Tensor { shape, data }
            })
            .collect();
        let batch = Batch { views, indices: b.indices, labels: b.labels, pool: Some(self.pool.clone()) };
        Some(Sample {
            index: b.first_index,
            epoch: b.epoch,
            payload: Payload::Batch(batch),
            ..Sample::default()
        })
    }

    /// Starts a new batch at an epoch change, adds the sample, ends a full batch.
    fn push_with(
        &mut self,
        epoch: u32,
        add: impl FnOnce(&mut Self) -> Result<(), StageError>,
    ) -> Result<Option<Sample>, StageError> {
        let mut out = None;
        if self.building.as_ref().is_some_and(|b| b.epoch != epoch) {
            out = self.finish();
        }
        add(self)?;
        if self.building.as_ref().is_some_and(|b| b.indices.len() >= self.cfg.batch_size) {
            // At most one batch per push: an epoch change just emitted the partial one, and
            // a fresh batch holds one sample, so both cannot happen at once unless size is 1.
            if out.is_none() {
                out = self.finish();
            }
        }
        Ok(out)
    }
}

impl Batcher for BatchBuilder {
    fn split(&mut self, world: usize) -> Result<usize, String> {
        let b = self.cfg.batch_size;
        if world == 0 || !b.is_multiple_of(world) {
            return Err(format!(
                "`batch_size: {b}` is the global batch and must split evenly across {world} processes: use a multiple of {world}"
            ));
        }
        if !self.cfg.drop_last {
            return Err(format!(
                "`drop_last: false` would give the {world} processes unequal last batches: set `drop_last: true` for a multi-process run"
            ));
        }
        self.cfg.batch_size = b / world;
        Ok(self.cfg.batch_size)
    }

    fn batches(&self, items: u64) -> Option<u64> {
        let b = self.cfg.batch_size.max(1) as u64;
        Some(if self.cfg.drop_last { items / b } else { items.div_ceil(b) })
    }

    fn explain_empty(&self, items: u64) -> String {
        format!(
            "an epoch has {items} samples, fewer than `batch_size: {}`, and `drop_last` drops the partial batch; lower `batch_size` to at most {items} or set `drop_last: false`",
            self.cfg.batch_size
        )
    }

    fn push(&mut self, sample: Sample) -> Result<Option<Sample>, StageError> {
        self.push_with(sample.epoch, |b| b.add(sample))
    }

    fn push_via(&mut self, sample: Sample, writer: &dyn TensorWriter) -> Result<Option<Sample>, StageError> {
        let shapes = writer.shapes(&sample)?;
        self.push_with(sample.epoch, |b| {
            b.add_with(&sample, &shapes, |view, dst| writer.append(&sample, view, dst))
        })
    }

    fn flush(&mut self) -> Result<Option<Sample>, StageError> {
        Ok(self.finish())
    }

    fn worker_batch_size(&self) -> Option<usize> {
        // Larger batches stay on the collector: a chunk of a whole batch per worker in flight
        // would hold several batches in memory (ImageNet's 4,096 x 224 x 224 views: 5 GB each).
        (self.cfg.batch_size <= MAX_WORKER_BATCH).then_some(self.cfg.batch_size)
    }

    fn fork(&self) -> Option<Box<dyn Batcher>> {
        Some(Box::new(Self { cfg: self.cfg.clone(), building: None, pool: self.pool.clone() }))
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

    /// `(first index, epoch, indices, labels, shapes, values)` of each batch.
    type Flat = Vec<(u64, u32, Vec<u64>, Vec<Option<u32>>, Vec<Vec<usize>>, Vec<Vec<f32>>)>;

    fn flatten(out: Vec<Sample>) -> Flat {
        out.into_iter()
            .filter_map(|s| match s.payload {
                Payload::Batch(b) => Some((
                    s.index,
                    s.epoch,
                    b.indices.clone(),
                    b.labels.clone(),
                    b.views.iter().map(|t| t.shape.clone()).collect(),
                    b.views.iter().map(|t| t.data.clone()).collect(),
                )),
                _ => None,
            })
            .collect()
    }

    /// `to_tensor` written straight into the batch (`push_via`, as the runtime fuses them) gives
    /// the batches `apply` then `push` give: values, shapes, epoch splits and `drop_last` alike.
    #[test]
    fn fused_to_tensor_gives_the_batches_apply_gives() {
        let cfg = ToTensor { mean: Some([0.4, 0.5, 0.6]), std: Some([0.2, 0.25, 0.3]) };
        let Ok(Stage::Map(stage)) = cfg.build(&Context::default()) else {
            panic!("to_tensor builds a map stage")
        };
        let writer = stage.as_tensor_writer().expect("to_tensor is a tensor writer");
        let views = |i: u64, epoch: u32| Sample {
            index: i,
            epoch,
            label: Some(i as u32 * 3),
            payload: Payload::Views(
                (0..2)
                    .map(|v| {
                        Image::from_raw(
                            3,
                            2,
                            (0..18).map(|k| (k * 13 + i as u32 * 7 + v * 5) as u8).collect(),
                        )
                    })
                    .collect::<Option<Vec<_>>>()
                    .unwrap(),
            ),
            ..Sample::default()
        };
        let order = [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1), (7, 2), (8, 2), (9, 2), (10, 2)];
        for (size, drop_last) in [(1, false), (3, false), (3, true), (4, false)] {
            let (mut applied, mut fused) =
                (BatchBuilder::new(size, drop_last), BatchBuilder::new(size, drop_last));
            let (mut a, mut f) = (Vec::new(), Vec::new());
            for (i, e) in order {
                let mut s = views(i, e);
                let cx = SampleCtx { seed: 0, stage_key: 0, epoch: e, index: i };
                stage.apply(&mut s, &cx).unwrap();
                a.extend(applied.push(s).unwrap());
                f.extend(fused.push_via(views(i, e), writer).unwrap());
            }
            a.extend(applied.flush().unwrap());
            f.extend(fused.flush().unwrap());
            let (a, f) = (flatten(a), flatten(f));
            assert!(!a.is_empty());
            assert_eq!(a, f, "size {size}, drop_last {drop_last}");
        }
        // Another view size within a batch is an error either way.
        let mut b = BatchBuilder::new(4, false);
        b.push_via(views(0, 0), writer).unwrap();
        let odd = Sample { payload: Payload::Views(vec![Image::new(2, 2), Image::new(2, 2)]), ..views(1, 0) };
        assert!(b.push_via(odd, writer).unwrap_err().to_string().contains("another shape"));
        // Not views: `to_tensor`'s own error.
        let err = BatchBuilder::new(4, false).push_via(Sample::default(), writer).unwrap_err();
        assert!(err.to_string().contains("`to_tensor` needs image views"), "{err}");
    }
}
