//! What flows between stages.

use std::sync::{Arc, Mutex};

/// An RGB8 image, rows top to bottom, pixels interleaved (`R G B R G B ...`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl Image {
    pub fn new(width: u32, height: u32) -> Self {
        Self { width, height, data: vec![0; width as usize * height as usize * 3] }
    }

    /// Wraps a buffer, checking its length against the size.
    pub fn from_raw(width: u32, height: u32, data: Vec<u8>) -> Option<Self> {
        (data.len() == width as usize * height as usize * 3).then_some(Self { width, height, data })
    }

    pub fn pixels(&self) -> usize {
        self.width as usize * self.height as usize
    }
}

/// The data a sample carries at a given point of the pipeline.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Payload {
    /// Nothing yet (the `counter` source; a file not read yet).
    #[default]
    Empty,
    /// An encoded file (JPEG, PNG, ...), not decoded yet.
    Encoded(Vec<u8>),
    /// One decoded image, or the views made from it.
    Views(Vec<Image>),
    /// The views as f32 C x H x W tensors (after `to_tensor`).
    Tensors(Vec<Tensor>),
    /// A batch of consecutive samples (after `batch`).
    Batch(Batch),
}

/// A dense f32 tensor, row-major.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// `batch_size` consecutive samples: one N x C x H x W tensor per view.
///
/// When it carries a [`BufferPool`], dropping it hands its views' buffers back to that pool, so
/// the next batch reuses memory that is already mapped instead of faulting in a fresh
/// allocation (a batch of 64 x 2 x 3 x 224 x 224 f32 is 77 MB).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub views: Vec<Tensor>,
    pub indices: Vec<u64>,
    pub labels: Vec<Option<u32>>,
    /// Where the view buffers go when the batch is dropped (`None`: freed).
    pub pool: Option<BufferPool>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            for t in self.views.drain(..) {
                pool.put(t.data);
            }
        }
    }
}

/// Recycled f32 buffers, shared by a producer (the `batch` stage) and whoever drops its output.
#[derive(Clone, Default)]
pub struct BufferPool {
    free: Arc<Mutex<Vec<Vec<f32>>>>,
}

impl BufferPool {
    /// Buffers kept at most; more are freed.
    pub const MAX_KEPT: usize = 8;

    /// An empty buffer with room for `len` values: a returned one if any is large enough.
    pub fn take(&self, len: usize) -> Vec<f32> {
        let reused = self.free.lock().ok().and_then(|mut free| {
            let i = free.iter().position(|v| v.capacity() >= len)?;
            Some(free.swap_remove(i))
        });
        match reused {
            Some(mut v) => {
                v.clear();
                v
            }
            None => Vec::with_capacity(len),
        }
    }

    /// Gives a buffer back.
    pub fn put(&self, buf: Vec<f32>) {
        if buf.capacity() == 0 {
            return;
        }
        if let Ok(mut free) = self.free.lock() {
            if free.len() < Self::MAX_KEPT {
                free.push(buf);
            }
        }
    }

    /// Buffers waiting to be reused.
    pub fn kept(&self) -> usize {
        self.free.lock().map_or(0, |f| f.len())
    }
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BufferPool({} kept)", self.kept())
    }
}

/// Pools hold no data: batches compare equal whatever pool they return to.
impl PartialEq for BufferPool {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

/// One item of the dataset on its way through the pipeline.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Index in the dataset (before shuffling); keys the per-sample random streams.
    pub index: u64,
    pub epoch: u32,
    pub label: Option<u32>,
    /// Where it came from (a file path), for error messages.
    pub name: Option<Arc<str>>,
    pub payload: Payload,
}

impl Sample {
    /// Feeds everything observable about the sample into a hasher (for `--digest`).
    pub fn digest_into(&self, h: &mut xxhash_rust::xxh3::Xxh3) {
        h.update(&self.index.to_le_bytes());
        h.update(&self.epoch.to_le_bytes());
        h.update(&self.label.map_or(u64::MAX, u64::from).to_le_bytes());
        match &self.payload {
            Payload::Empty => h.update(&[0]),
            Payload::Encoded(bytes) => {
                h.update(&[1]);
                h.update(&(bytes.len() as u64).to_le_bytes());
                h.update(bytes);
            }
            Payload::Views(views) => {
                h.update(&[2]);
                h.update(&(views.len() as u64).to_le_bytes());
                for v in views {
                    h.update(&v.width.to_le_bytes());
                    h.update(&v.height.to_le_bytes());
                    h.update(&v.data);
                }
            }
            Payload::Tensors(ts) => {
                h.update(&[3]);
                ts.iter().for_each(|t| digest_tensor(t, h));
            }
            Payload::Batch(b) => {
                h.update(&[4]);
                b.views.iter().for_each(|t| digest_tensor(t, h));
                for (i, l) in b.indices.iter().zip(&b.labels) {
                    h.update(&i.to_le_bytes());
                    h.update(&l.map_or(u64::MAX, u64::from).to_le_bytes());
                }
            }
        }
    }
}

fn digest_tensor(t: &Tensor, h: &mut xxhash_rust::xxh3::Xxh3) {
    h.update(&(t.shape.len() as u64).to_le_bytes());
    for d in &t.shape {
        h.update(&(*d as u64).to_le_bytes());
    }
    for x in &t.data {
        h.update(&x.to_bits().to_le_bytes());
    }
}
