//! `Pipeline`: a pipeline file's data stages as a Python iterable of batches.
//!
//! Iterating runs the chain of the file's first batch stage (the one `simclr bench` measures)
//! on the pipeline's own worker threads, exactly as the CLI does, with a sink that hands each
//! batch over a bounded channel. The batch's buffers move into NumPy arrays without a copy.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use numpy::ndarray::{Array1, ArrayViewMut4};
use numpy::{PyArray1, PyArray4};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use simclr_core::driver::{build_chain, Mode};
use simclr_core::runtime::epoch_len;
use simclr_core::{
    run_chain, Artifacts, Batch, BufferPool, Chain, Payload, Plan, RunError, RunOptions, RunReport, Sample,
    Sink, StageError, StageInfo, Tensor,
};

use crate::{failed, load, override_strings, PipelineError};

/// Batches produced ahead of the Python loop: enough to hide a slow step's jitter, few enough
/// that memory stays bounded (each batch of the ImageNet recipe is ~77 MB).
const PREFETCH: usize = 2;

/// What the producing thread sends: batches (with their epoch), then how the run ended.
enum Msg {
    Batch(u32, Batch),
    Done(Result<RunReport, RunError>),
}

/// The sink at the end of the chain: forwards each batch to the Python side.
struct ChannelSink {
    tx: Sender<Msg>,
    first_epoch: u32,
    /// One past the last epoch to produce.
    end_epoch: u32,
}

impl Sink for ChannelSink {
    fn epochs(&self) -> u32 {
        self.end_epoch
    }

    fn start_epoch(&self) -> u32 {
        self.first_epoch
    }

    fn consume(&mut self, sample: Sample) -> Result<(), StageError> {
        let Payload::Batch(batch) = sample.payload else {
            return Err(StageError::fatal("expected a batch (the pipeline's batch stage feeds this sink)"));
        };
        // A closed channel means the Python side is gone: stop the run.
        self.tx
            .send(Msg::Batch(sample.epoch, batch))
            .map_err(|_| StageError::fatal("the Python iterator was closed"))
    }
}

/// A run of the chain on its own thread, from some epoch on.
///
/// An iteration that ends at the epoch's last batch leaves the run going: it is already making
/// the next epoch's batches (so the workers never drain between epochs) and the next iteration
/// takes it over if it asks for that epoch (`set_epoch(e + 1)`). Anything else stops it.
struct LiveRun {
    rx: Option<Receiver<Msg>>,
    worker: Option<JoinHandle<()>>,
    interrupt: Arc<AtomicBool>,
    /// A message received but not yet used (the next epoch's first batch).
    pending: Option<Msg>,
}

impl LiveRun {
    /// The next message, waiting with the GIL released; Ctrl-C raises KeyboardInterrupt.
    fn next(&mut self, py: Python<'_>) -> PyResult<Msg> {
        if let Some(m) = self.pending.take() {
            return Ok(m);
        }
        let Some(rx) = self.rx.as_ref() else {
            return Err(PipelineError::new_err("internal error: the pipeline was stopped"));
        };
        loop {
            match py.detach(|| rx.recv_timeout(Duration::from_millis(100))) {
                Ok(m) => return Ok(m),
                Err(RecvTimeoutError::Timeout) => py.check_signals()?,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(PipelineError::new_err(
                        "internal error: the pipeline thread ended without a result",
                    ))
                }
            }
        }
    }

    /// Stops the run and waits for its threads.
    fn stop(&mut self, py: Python<'_>) {
        self.interrupt.store(true, Ordering::SeqCst);
        // Dropping the receiver makes a sink blocked on a full channel fail, so the run ends.
        self.rx = None;
        self.pending = None;
        if let Some(h) = self.worker.take() {
            py.detach(|| {
                let _ = h.join();
            });
        }
    }
}

impl Drop for LiveRun {
    fn drop(&mut self) {
        if self.worker.is_some() {
            Python::attach(|py| self.stop(py));
        }
    }
}

/// Where an iteration that ended on an epoch boundary leaves its run: (next epoch, run).
type Carry = Arc<Mutex<Option<(u32, LiveRun)>>>;

/// A pipeline file's data stages (source to batch; training and evaluation stages are not
/// run). Iterate it for one epoch of batches: each a dict with `views` (one float32 array of
/// shape (B, C, H, W) per view), `index` (int64, (B,)) and, when the source has labels,
/// `label` (int64, (B,); -1 for a sample without one).
#[pyclass(module = "simclr_pipeline")]
pub struct Pipeline {
    plan: Plan,
    chain: Chain,
    threads: usize,
    epoch: u32,
    rank: u64,
    world_size: u64,
    /// Batches per epoch, when the batch stage knows (it does for `batch`).
    batches: Option<u64>,
    /// Samples per epoch after limit and sharding.
    samples: u64,
    carry: Carry,
}

#[pymethods]
impl Pipeline {
    #[new]
    #[pyo3(signature = (path, overrides = None, threads = None, seed = None, rank = 0, world_size = 1))]
    fn new(
        path: PathBuf,
        overrides: Option<&Bound<'_, PyDict>>,
        threads: Option<usize>,
        seed: Option<u64>,
        rank: u64,
        world_size: u64,
    ) -> PyResult<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(PyValueError::new_err(format!(
                "rank {rank} of world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size"
            )));
        }
        if threads == Some(0) {
            return Err(PyValueError::new_err("threads must be at least 1 (None: all cores)"));
        }
        let mut set = override_strings(overrides)?;
        if let Some(s) = seed {
            set.push(format!("seed={s}"));
        }
        let mut plan = load(&path, &set)?;
        let mut chain = data_chain(&plan, &path)?;
        if world_size > 1 {
            // Each rank reads every world_size-th sample from its rank on: disjoint, and
            // together complete. The shard is an ordinary source option, so a sharded file
            // validates (and errs) as in the CLI.
            let source = &plan.stages[chain.source].id;
            set.push(format!("{source}.shard={{index: {rank}, count: {world_size}}}"));
            plan = load(&path, &set)?;
            chain = data_chain(&plan, &path)?;
        }
        let stages = build_chain(&plan, &chain, Mode::DataOnly, None, &Artifacts::default())
            .map_err(|e| failed(&e))?;
        let (_, source) = &stages.source;
        let samples = epoch_len(source.len(), &source.options());
        let batches = stages.batch.as_ref().and_then(|(_, b)| b.batches(samples));
        let threads = threads.unwrap_or_else(simclr_core::runtime::default_threads);
        Ok(Self {
            plan,
            chain,
            threads,
            epoch: 0,
            rank,
            world_size,
            batches,
            samples,
            carry: Carry::default(),
        })
    }

    /// Batches per epoch (for this rank).
    fn __len__(&self) -> PyResult<usize> {
        let n = self.batches.ok_or_else(|| {
            pyo3::exceptions::PyTypeError::new_err(
                "this pipeline's batch stage does not know its batch count",
            )
        })?;
        usize::try_from(n).map_err(|_| PyValueError::new_err("too many batches"))
    }

    /// The epoch the next iteration yields (it keys the shuffle and every random draw). Call it
    /// before each epoch, as with PyTorch's `DistributedSampler.set_epoch`.
    fn set_epoch(&mut self, epoch: u32) {
        self.epoch = epoch;
    }

    #[getter]
    fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Samples per epoch (for this rank), after `limit` and sharding.
    #[getter]
    fn samples(&self) -> u64 {
        self.samples
    }

    #[getter]
    fn threads(&self) -> usize {
        self.threads
    }

    #[getter]
    fn rank(&self) -> u64 {
        self.rank
    }

    #[getter]
    fn world_size(&self) -> u64 {
        self.world_size
    }

    /// The pipeline's name and seed (after overrides).
    #[getter]
    fn name(&self) -> String {
        self.plan.spec.name.clone()
    }

    #[getter]
    fn seed(&self) -> u64 {
        self.plan.spec.seed
    }

    /// The ids of the stages the iteration runs, source to batch.
    #[getter]
    fn stages(&self) -> Vec<String> {
        let c = &self.chain;
        std::iter::once(c.source)
            .chain(c.maps.iter().copied())
            .chain(c.batch)
            .map(|i| self.plan.stages[i].id.clone())
            .collect()
    }

    fn __iter__(&self, py: Python<'_>) -> PyResult<Batches> {
        self.batches_of(py, false)
    }

    /// Iterates one epoch and also hashes every batch as `simclr bench --digest` does; the
    /// iterator's `digest` is set once it is exhausted.
    fn iter_with_digest(&self, py: Python<'_>) -> PyResult<Batches> {
        self.batches_of(py, true)
    }

    fn __repr__(&self) -> String {
        format!(
            "Pipeline({:?}, stages={}, epoch={}, threads={}, rank={}/{})",
            self.plan.spec.file.display().to_string(),
            self.stages().join(">"),
            self.epoch,
            self.threads,
            self.rank,
            self.world_size
        )
    }
}

impl Pipeline {
    fn batches_of(&self, py: Python<'_>, digest: bool) -> PyResult<Batches> {
        let carried = self.carry.lock().ok().and_then(|mut c| c.take());
        let run = match carried {
            Some((next, run)) if next == self.epoch && !digest => run,
            other => {
                drop(other); // a run at another epoch: stopped (LiveRun's Drop)
                self.start(py, digest)?
            }
        };
        Ok(Batches { run: Some(run), epoch: self.epoch, digest: None, carry: self.carry.clone() })
    }

    /// Starts a run at the current epoch: for `single`, just that epoch (its digest is the
    /// CLI's); otherwise open-ended, so that the next epochs follow without a pause.
    fn start(&self, py: Python<'_>, single: bool) -> PyResult<LiveRun> {
        let mut stages = py
            .detach(|| build_chain(&self.plan, &self.chain, Mode::DataOnly, None, &Artifacts::default()))
            .map_err(|e| failed(&e))?;
        let (tx, rx) = bounded(PREFETCH);
        let sink_info =
            StageInfo { id: "(python)".into(), kind: "python".into(), workers: None, capacity: None };
        let end_epoch = if single { self.epoch.saturating_add(1) } else { u32::MAX };
        stages.sink =
            (sink_info, Box::new(ChannelSink { tx: tx.clone(), first_epoch: self.epoch, end_epoch }));
        let interrupt = Arc::new(AtomicBool::new(false));
        let opts = RunOptions {
            seed: self.plan.spec.seed,
            threads: self.threads,
            fuse: self.plan.spec.fuse,
            chunk: self.plan.spec.chunk,
            digest: single,
            interrupt: interrupt.clone(),
            ..RunOptions::default()
        };
        let worker = std::thread::Builder::new()
            .name("simclr-pipeline".into())
            .spawn(move || {
                let result = run_chain(stages, &opts);
                let _ = tx.send(Msg::Done(result));
            })
            .map_err(|e| PipelineError::new_err(format!("cannot start the pipeline thread: {e}")))?;
        Ok(LiveRun { rx: Some(rx), worker: Some(worker), interrupt, pending: None })
    }
}

/// The file's first chain with a batch stage: what the iteration runs.
fn data_chain(plan: &Plan, path: &std::path::Path) -> PyResult<Chain> {
    plan.chains().into_iter().find(|c| c.batch.is_some()).ok_or_else(|| {
        PipelineError::new_err(format!(
            "{}: no batch stage: the Python pipeline yields batches; add one after the tensor stage, e.g. `- {{ id: batch, kind: batch, batch_size: 256 }}`",
            path.display()
        ))
    })
}

/// One epoch of batches (from `iter(pipeline)`). Dropping it early stops the pipeline's threads.
#[pyclass(module = "simclr_pipeline")]
pub struct Batches {
    run: Option<LiveRun>,
    epoch: u32,
    digest: Option<String>,
    carry: Carry,
}

#[pymethods]
impl Batches {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(run) = self.run.as_mut() else { return Ok(None) };
        let msg = match run.next(py) {
            Ok(m) => m,
            Err(e) => {
                self.close(py);
                return Err(e);
            }
        };
        match msg {
            Msg::Batch(epoch, batch) if epoch == self.epoch => to_dict(py, batch).map(Some),
            Msg::Batch(epoch, batch) => {
                // The next epoch has begun: this one is complete. Keep the run (and the batch)
                // for an iteration of that epoch.
                if let Some(mut run) = self.run.take() {
                    run.pending = Some(Msg::Batch(epoch, batch));
                    // A run parked earlier is dropped (stopped, which waits for its thread with
                    // the GIL released) only after the lock is released: holding it there
                    // could deadlock with a thread taking the GIL and then this lock.
                    let replaced = self.carry.lock().ok().and_then(|mut c| c.replace((epoch, run)));
                    drop(replaced);
                }
                Ok(None)
            }
            Msg::Done(result) => {
                self.close(py);
                match result {
                    Ok(report) => {
                        self.digest = report.digest;
                        Ok(None)
                    }
                    Err(e) => Err(failed(&e)),
                }
            }
        }
    }

    /// The hash of every batch of the epoch (`simclr bench --digest`'s), once exhausted, for
    /// an iterator from `Pipeline.iter_with_digest()`; else None.
    #[getter]
    fn digest(&self) -> Option<String> {
        self.digest.clone()
    }

    #[getter]
    fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Stops the pipeline now (also done when the iterator is garbage-collected).
    fn close(&mut self, py: Python<'_>) {
        if let Some(mut run) = self.run.take() {
            run.stop(py);
        }
    }
}

/// The memory of one view array: a batch's buffer, handed back to the batch stage's pool when
/// the last NumPy array (or torch tensor) using it is gone, so the next batch reuses memory
/// that is already mapped. Fresh buffers of a large batch (2 x 38 MB for 64 ImageNet pairs) are
/// `mmap`ed and faulted in page by page: about a third of the pipeline's time in a measurement.
#[pyclass(module = "simclr_pipeline", frozen)]
pub struct RustBuffer {
    data: Vec<f32>,
    pool: Option<BufferPool>,
}

impl Drop for RustBuffer {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.put(std::mem::take(&mut self.data));
        }
    }
}

/// A view tensor as a NumPy array whose base is a [`RustBuffer`] owning the data (no copy).
fn view_array<'py>(
    py: Python<'py>,
    t: Tensor,
    pool: Option<BufferPool>,
) -> PyResult<Bound<'py, PyArray4<f32>>> {
    let [b, c, h, w] = t.shape[..] else {
        return Err(PipelineError::new_err(format!(
            "a batch view has shape {:?}, not (B, C, H, W): the stage before `batch` must be `to_tensor`",
            t.shape
        )));
    };
    if t.data.len() != b * c * h * w {
        return Err(PipelineError::new_err(format!(
            "internal error: a batch view of shape {:?} holds {} values",
            t.shape,
            t.data.len()
        )));
    }
    let mut data = t.data;
    // Taken before the Vec moves into its owner (its heap buffer does not move with it), and
    // as a mutable pointer: NumPy arrays are writable, so no shared Rust borrow of the data
    // may exist while Python holds them.
    let ptr = data.as_mut_ptr();
    let owner = Bound::new(py, RustBuffer { data, pool })?;
    // SAFETY: `ptr` points to the b*c*h*w values (checked above) of the buffer `owner` holds;
    // `owner` becomes the array's base object, so the buffer lives as long as the array and
    // any view of it, and Rust does not touch the values again until `owner` is dropped.
    let view = unsafe { ArrayViewMut4::from_shape_ptr((b, c, h, w), ptr) };
    // SAFETY: as above: the container is the buffer's owner and is never reallocated.
    Ok(unsafe { PyArray4::borrow_from_array(&view, owner.into_any()) })
}

/// A batch as a dict of NumPy arrays that own the Rust buffers (no copy).
fn to_dict(py: Python<'_>, mut batch: Batch) -> PyResult<Bound<'_, PyDict>> {
    let views = PyList::empty(py);
    // Taking the views leaves the batch nothing to hand back to its pool on drop: each
    // array's RustBuffer does that instead, once Python is done with it.
    let pool = batch.pool.clone();
    for t in std::mem::take(&mut batch.views) {
        views.append(view_array(py, t, pool.clone())?)?;
    }
    let d = PyDict::new(py);
    d.set_item("views", views)?;
    let index: Vec<i64> = batch.indices.iter().map(|&i| i64::try_from(i).unwrap_or(i64::MAX)).collect();
    d.set_item("index", PyArray1::from_owned_array(py, Array1::from(index)))?;
    if batch.labels.iter().any(Option::is_some) {
        let label: Vec<i64> = batch.labels.iter().map(|l| l.map_or(-1, i64::from)).collect();
        d.set_item("label", PyArray1::from_owned_array(py, Array1::from(label)))?;
    }
    Ok(d)
}
