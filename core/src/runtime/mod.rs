//! The parallel runtime of one chain: feeder -> worker segments -> ordered collector.
//!
//! ```text
//! feeder ──chunks──▶ segment 1 (N workers) ──▶ segment 2 ... ──▶ collector (reorder, sink)
//!    ▲                                                                │
//!    └────────────────────── tokens (bounded window) ◀────────────────┘
//! ```
//! * Channels are bounded crossbeam channels of chunks (a few samples each, to amortize the
//!   hand-off); a full channel blocks its producer (backpressure).
//! * A segment is one or more consecutive per-sample stages run in one worker loop (fusion;
//!   `fuse: false` or an explicit `workers:`/`capacity:` gives a stage its own segment).
//! * The feeder takes a token per chunk and the collector returns it once the chunk leaves the
//!   reorder buffer, so at most `window` chunks exist at once: memory is bounded even when one
//!   slow sample holds back the order.
//! * The first error stops everything: threads see the stop flag between samples and exit,
//!   dropping their channel ends, so a blocked peer wakes with "disconnected". All threads
//!   are joined before `run_chain` returns.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

mod epochs;
pub use epochs::{epoch_len, epoch_order, Share};
use epochs::{epoch_plan, EpochPlan};

use crate::error::{RunError, StageError};
use crate::rng::stage_key;
use crate::sample::Sample;
use crate::stage::{Batcher, MapStage, OnError, SampleCtx, Sink, Source, SourceOptions, TensorWriter};

/// Identity of a stage in metrics and errors.
#[derive(Clone, Debug)]
pub struct StageInfo {
    pub id: String,
    pub kind: String,
    /// Explicit worker count (starts its own segment).
    pub workers: Option<usize>,
    /// Explicit channel capacity in chunks (starts its own segment).
    pub capacity: Option<usize>,
}

/// Everything one chain needs to run.
pub struct ChainStages {
    pub source: (StageInfo, Arc<dyn Source>),
    pub maps: Vec<(StageInfo, Arc<dyn MapStage>)>,
    /// Groups samples into batches before the sink (on the collector thread).
    pub batch: Option<(StageInfo, Box<dyn Batcher>)>,
    pub sink: (StageInfo, Box<dyn Sink>),
}

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub seed: u64,
    /// Worker threads in all (per-sample work); the collector thread comes on top.
    pub threads: usize,
    /// Stop after this many samples (cycling epochs if needed).
    pub max_samples: Option<u64>,
    /// Override the sink's number of epochs.
    pub epochs: Option<u32>,
    pub fuse: bool,
    /// Samples per chunk; `None` = automatic.
    pub chunk: Option<usize>,
    pub digest: bool,
    /// Set from outside (Ctrl-C) to stop after the current samples.
    pub interrupt: Arc<AtomicBool>,
    /// Samples delivered to the sink so far, for progress bars.
    pub progress: Arc<AtomicU64>,
    /// Samples the run will deliver (added to when a chain starts), for progress bars.
    pub progress_total: Arc<AtomicU64>,
    /// The run directory stages write into (metrics, checkpoints).
    pub run_dir: Option<std::path::PathBuf>,
    /// What stages hand to later stages (encoders, evaluation data, final metrics).
    pub artifacts: crate::artifact::Artifacts,
    /// Continue the run in `run_dir`: sinks restore their state ([`Sink::resume`]) and the
    /// data starts at the first sink's [`Sink::start_epoch`].
    pub resume: bool,
    /// Rank 0 of a data-parallel run, or alone (the default): runs everything. The other ranks
    /// run only the data-parallel training chains ([`Sink::share`]): evaluation is rank 0's.
    pub primary: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            threads: default_threads(),
            max_samples: None,
            epochs: None,
            fuse: true,
            chunk: None,
            digest: false,
            interrupt: Arc::new(AtomicBool::new(false)),
            progress: Arc::new(AtomicU64::new(0)),
            progress_total: Arc::new(AtomicU64::new(0)),
            run_dir: None,
            artifacts: crate::artifact::Artifacts::default(),
            resume: false,
            primary: true,
        }
    }
}

/// The machine's cores.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Time and item counts of one stage.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StageMetrics {
    pub id: String,
    pub kind: String,
    pub items: u64,
    /// Seconds spent in the stage's own code, summed over its workers.
    pub busy_s: f64,
    /// Seconds its workers waited for input.
    pub starved_s: f64,
    /// Seconds its workers waited for room downstream.
    pub blocked_s: f64,
    pub workers: usize,
}

/// A sample the source's `on_error: skip` dropped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub index: u64,
    pub name: Option<String>,
    pub stage: String,
    pub message: String,
}

/// What a finished run measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RunReport {
    pub samples: u64,
    pub seconds: f64,
    pub stages: Vec<StageMetrics>,
    pub digest: Option<String>,
    pub skipped: Vec<Skipped>,
    /// Most chunks alive at once (bounded by the window).
    pub peak_chunks_in_flight: usize,
    pub window_chunks: usize,
    pub chunk: usize,
}

#[derive(Default)]
struct Counters {
    items: AtomicU64,
    busy_ns: AtomicU64,
    starved_ns: AtomicU64,
    blocked_ns: AtomicU64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

struct Chunk {
    seq: u64,
    items: Vec<Sample>,
    /// Each item's position in its epoch's order (dropped with the item when it is skipped).
    pos: Vec<u64>,
    /// The epoch and the position one past the chunk's last sample: where the run stands once
    /// the chunk is consumed (the chunk's batches, when the workers batched it).
    end: (u32, u64),
    skipped: Vec<Skipped>,
    /// Samples the items stand for, once the workers batched them (a dropped partial batch
    /// still counts, as on the collector).
    batched: Option<u64>,
}

enum Op {
    Read(Arc<dyn Source>),
    Map(Arc<dyn MapStage>),
}

struct OpInfo {
    op: Op,
    info: StageInfo,
    key: u64,
    counters: Arc<Counters>,
}

struct Shared {
    stop: AtomicBool,
    error: Mutex<Option<RunError>>,
    interrupt: Arc<AtomicBool>,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.interrupt.load(Ordering::Relaxed)
    }

    fn fail(&self, e: RunError) {
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn auto_chunk(samples: u64, workers: usize) -> usize {
    // Small enough that the last chunks spread over all workers (at 32 chunks per worker, the
    // workers finish within 1/32 of a worker's share of each other: a short run of heavy
    // samples, 1,000 JPEGs on 2 workers, lost ~5% to the last chunk at 8 per worker), large
    // enough (up to 64 samples) to amortize channel hand-offs for light stages.
    let per_worker = samples / (workers.max(1) as u64 * 32);
    per_worker.clamp(1, 64) as usize
}

/// Runs one chain to completion (or to the first error or interrupt).
pub fn run_chain(chain: ChainStages, opts: &RunOptions) -> Result<RunReport, RunError> {
    let started = Instant::now();
    let ChainStages { source: (source_info, source), maps, mut batch, sink: (sink_info, mut sink) } = chain;
    let src_opts = source.options();
    let share = data_parallel_share(sink.as_ref(), &sink_info, batch.as_mut(), src_opts.on_error)?;
    let plan = epoch_plan(source.as_ref(), batch.as_ref(), sink.as_ref(), &source_info, &sink_info, opts)?;
    let per_epoch = epoch_len(plan.len, &src_opts);
    let total = match &share {
        Some(s) if s.shared_len(per_epoch) == 0 && plan.epochs > 0 => {
            return Err(RunError::Refused {
                stage: sink_info.id.clone(),
                kind: sink_info.kind.clone(),
                message: format!(
                    "an epoch of {per_epoch} samples holds no whole global batch of {} ({} processes x {}); lower `batch_size`",
                    s.block * s.world,
                    s.world,
                    s.block
                ),
            })
        }
        Some(s) => epochs::shared_total(&plan, per_epoch, s, opts.max_samples),
        None => plan.total,
    };
    let EpochPlan { len, first_epoch, offset, epochs, .. } = plan;
    let threads = opts.threads.max(1);
    opts.progress_total.fetch_add(total, Ordering::Relaxed);

    let (segments, seg_workers) = segments(&source, &source_info, maps, opts.fuse, threads);
    let total_workers: usize = seg_workers.iter().sum();
    let last_workers = seg_workers.last().copied().unwrap_or(1);
    let mut forks = worker_batchers(&segments, last_workers, batch.as_ref(), opts.chunk, src_opts.on_error);
    let worker_batch = forks.as_ref().map(|(n, _)| *n);
    let batch_counters = Arc::new(Counters::default());
    let chunk =
        worker_batch.unwrap_or_else(|| opts.chunk.unwrap_or_else(|| auto_chunk(total, threads))).max(1);
    let window = 2 * total_workers + 2 * segments.len() + 2;

    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
        interrupt: opts.interrupt.clone(),
    });
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (token_tx, token_rx) = bounded::<()>(window);
    for _ in 0..window {
        let _ = token_tx.send(());
    }

    let metrics_ops: Vec<(StageInfo, Arc<Counters>, usize)> = segments
        .iter()
        .zip(&seg_workers)
        .flat_map(|(seg, &w)| seg.iter().map(move |o| (o.info.clone(), o.counters.clone(), w)))
        .collect();

    let mut handles = Vec::new();
    let seed = opts.seed;
    let cap0 = segments[0][0].info.capacity.unwrap_or(seg_workers[0] * 2);
    let (feed_tx, mut rx) = bounded::<Chunk>(cap0);
    let feeder = Feeder {
        source_id: source_info.id.clone(),
        len,
        per_epoch,
        share,
        opts: src_opts,
        seed,
        first_epoch,
        offset,
        epochs,
        total,
        chunk,
        shared: shared.clone(),
        in_flight: in_flight.clone(),
        peak: peak.clone(),
        tokens: token_rx,
        out: feed_tx,
    };
    spawn(&mut handles, &shared, "feeder", move || feeder.run());

    let on_error = src_opts.on_error;
    let n_segments = segments.len();
    for (s, seg) in segments.into_iter().enumerate() {
        let workers = seg_workers[s];
        let cap = seg.last().and_then(|o| o.info.capacity).unwrap_or(workers * 2).max(1);
        let (tx, next_rx) = bounded::<Chunk>(cap);
        let seg = Arc::new(seg);
        for w in 0..workers {
            let rx = rx.clone();
            let tx = tx.clone();
            let seg = seg.clone();
            let shared = shared.clone();
            let name = format!("{}-{w}", seg[0].info.id);
            let shared2 = shared.clone();
            let batcher = match (&mut forks, &batch) {
                (Some((_, f)), Some((binfo, _))) if s + 1 == n_segments => f.pop().map(|b| WorkerBatch {
                    info: binfo.clone(),
                    batcher: b,
                    counters: batch_counters.clone(),
                    out: Vec::new(),
                }),
                _ => None,
            };
            spawn(&mut handles, &shared2, &name, move || {
                worker(&seg, &rx, &tx, &shared, seed, on_error, batcher);
            });
        }
        rx = next_rx;
    }

    // Collector: reorder, digest, sink.
    let mut hasher = opts.digest.then(xxhash_rust::xxh3::Xxh3::new);
    let sink_counters = Counters::default();
    let mut reorder: BTreeMap<u64, Chunk> = BTreeMap::new();
    let mut next_seq = 0u64;
    let mut delivered = 0u64;
    let mut skipped = Vec::new();
    let mut last_at: Option<(u32, u64)> = None;
    loop {
        if shared.stopped() {
            break;
        }
        let t = Instant::now();
        let Ok(c) = rx.recv() else { break };
        sink_counters.starved_ns.fetch_add(nanos(t.elapsed()), Ordering::Relaxed);
        reorder.insert(c.seq, c);
        while let Some(c) = reorder.remove(&next_seq) {
            next_seq += 1;
            skipped.extend(c.skipped);
            let t = Instant::now();
            // Batches the workers made stand for their samples.
            let count = u64::from(c.batched.is_none());
            if let Some(n) = c.batched {
                delivered += n;
                opts.progress.fetch_add(n, Ordering::Relaxed);
            }
            let mut pos = c.pos.into_iter();
            for sample in c.items {
                let (index, name, epoch) = (sample.index, sample.name.clone(), sample.epoch);
                // Where the run stands once this item (or the batch it completes) is in.
                let before = last_at;
                let mut at = match (c.batched, pos.next()) {
                    (None, Some(p)) => (epoch, p.saturating_add(1)),
                    _ => c.end,
                };
                last_at = Some(at);
                let out = match batch.as_mut().filter(|_| worker_batch.is_none()) {
                    Some((binfo, b)) => match b.push(sample) {
                        Ok(out) => out,
                        Err(e) => {
                            shared.fail(sample_error(binfo, index, name.as_deref(), e));
                            break;
                        }
                    },
                    None => Some(sample),
                };
                if let Some(out) = out {
                    if let Some(h) = hasher.as_mut() {
                        out.digest_into(h);
                    }
                    // A batch closed by the first sample of the next epoch does not hold it.
                    if out.epoch != epoch && c.batched.is_none() {
                        at = before.unwrap_or(at);
                    }
                    sink.position(at.0, at.1);
                    if let Err(e) = sink.consume(out) {
                        shared.fail(sample_error(&sink_info, index, name.as_deref(), e));
                        break;
                    }
                }
                delivered += count;
                opts.progress.fetch_add(count, Ordering::Relaxed);
            }
            sink_counters.busy_ns.fetch_add(nanos(t.elapsed()), Ordering::Relaxed);
            in_flight.fetch_sub(1, Ordering::SeqCst);
            let _ = token_tx.send(());
            if shared.stopped() {
                break;
            }
        }
    }
    drop(rx);
    drop(token_tx);
    for h in handles {
        if h.join().is_err() {
            shared.fail(RunError::Internal("a worker thread panicked".into()));
        }
    }
    if let Some(e) = shared.error.lock().ok().and_then(|mut e| e.take()) {
        return Err(e);
    }
    if opts.interrupt.load(Ordering::SeqCst) {
        // Let the sink save what it can (a training checkpoint) before reporting the interrupt.
        sink.interrupted().map_err(|e| RunError::Stage {
            stage: sink_info.id.clone(),
            kind: sink_info.kind.clone(),
            message: format!("interrupted, and then: {e}"),
        })?;
        return Err(RunError::Interrupted);
    }
    let t = Instant::now();
    if let Some((binfo, b)) = batch.as_mut().filter(|_| worker_batch.is_none()) {
        let last = b.flush().map_err(|e| RunError::stage(&binfo.id, &binfo.kind, e))?;
        if let Some(out) = last {
            if let Some(h) = hasher.as_mut() {
                out.digest_into(h);
            }
            if let Some((epoch, consumed)) = last_at {
                sink.position(epoch, consumed);
            }
            sink.consume(out).map_err(|e| RunError::stage(&sink_info.id, &sink_info.kind, e))?;
        }
    }
    sink.finish().map_err(|e| RunError::stage(&sink_info.id, &sink_info.kind, e))?;
    sink_counters.busy_ns.fetch_add(nanos(t.elapsed()), Ordering::Relaxed);
    sink_counters.items.store(delivered, Ordering::Relaxed);

    let metric = |info: &StageInfo, c: &Counters, workers: usize| StageMetrics {
        id: info.id.clone(),
        kind: info.kind.clone(),
        items: c.items.load(Ordering::Relaxed),
        busy_s: c.busy_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        starved_s: c.starved_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        blocked_s: c.blocked_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        workers,
    };
    let mut stages: Vec<StageMetrics> = metrics_ops.iter().map(|(i, c, w)| metric(i, c, *w)).collect();
    if let Some((binfo, _)) = &batch {
        if worker_batch.is_some() {
            stages.push(metric(binfo, &batch_counters, last_workers));
        } else {
            // Batching runs inside the collector; its time is part of the sink's line.
            stages.push(StageMetrics {
                id: binfo.id.clone(),
                kind: binfo.kind.clone(),
                items: delivered,
                workers: 1,
                ..StageMetrics::default()
            });
        }
    }
    stages.push(metric(&sink_info, &sink_counters, 1));
    Ok(RunReport {
        samples: delivered,
        seconds: started.elapsed().as_secs_f64(),
        stages,
        digest: hasher.map(|h| format!("{:032x}", h.digest128())),
        skipped,
        peak_chunks_in_flight: peak.load(Ordering::SeqCst),
        window_chunks: window,
        chunk,
    })
}

/// The per-sample stages grouped into segments (consecutive stages fused into one worker loop
/// unless `fuse` is off or a stage asks for its own `workers`/`capacity`), and each segment's
/// worker count (explicit, else an equal share of `threads`).
fn segments(
    source: &Arc<dyn Source>,
    source_info: &StageInfo,
    maps: Vec<(StageInfo, Arc<dyn MapStage>)>,
    fuse: bool,
    threads: usize,
) -> (Vec<Vec<OpInfo>>, Vec<usize>) {
    let mk = |op: Op, info: StageInfo| OpInfo {
        key: stage_key(&info.id),
        op,
        info,
        counters: Arc::new(Counters::default()),
    };
    let mut ops: Vec<OpInfo> = vec![mk(Op::Read(source.clone()), source_info.clone())];
    for (info, m) in maps {
        ops.push(mk(Op::Map(m), info));
    }
    let mut segments: Vec<Vec<OpInfo>> = Vec::new();
    for op in ops {
        let own = !fuse || op.info.workers.is_some() || op.info.capacity.is_some();
        match segments.last_mut() {
            Some(seg) if !own && !seg_is_own(seg, fuse) => seg.push(op),
            _ => segments.push(vec![op]),
        }
    }
    let auto_segments = segments.iter().filter(|s| s[0].info.workers.is_none()).count().max(1);
    let seg_workers = segments
        .iter()
        .map(|s| s[0].info.workers.unwrap_or_else(|| (threads / auto_segments).max(1)))
        .collect();
    (segments, seg_workers)
}

/// Batching in the workers (see `Batcher::worker_batch_size`) when there are several: one
/// collector copying every view into its batch becomes the serial part that stops the
/// workers from scaling (CIFAR, 2 workers: 1.79x -> 1.9x). With one worker too when the
/// stage before `batch` writes its tensors straight into the batch (`to_tensor`): then
/// there is no copy left to hand off, and the worker does all the work. Otherwise one
/// worker leaves the copy to the collector. Only with automatic chunks, and only where
/// no sample can be skipped (a skip would shorten that chunk's batch, where the collector
/// fills it from the next samples). The batches are the same either way.
fn worker_batchers(
    segments: &[Vec<OpInfo>],
    last_workers: usize,
    batch: Option<&(StageInfo, Box<dyn Batcher>)>,
    chunk: Option<usize>,
    on_error: OnError,
) -> Option<(usize, Vec<Box<dyn Batcher>>)> {
    let fusable = segments.last().and_then(|s| s.last()).and_then(tensor_writer).is_some();
    match (batch, chunk, on_error) {
        (Some((_, b)), None, OnError::Fail) if last_workers >= 2 || fusable => b
            .worker_batch_size()
            .and_then(|n| (0..last_workers).map(|_| b.fork()).collect::<Option<Vec<_>>>().map(|f| (n, f))),
        _ => None,
    }
}

/// The feeder thread: each epoch's order (limit, shard, shuffle) cut into chunks of `chunk`
/// samples, each sent once a token is free (at most the window's chunks exist at once), until
/// `total` samples or a stop.
struct Feeder {
    source_id: String,
    len: u64,
    /// Items an epoch yields (after `limit` and `shard`).
    per_epoch: u64,
    /// A data-parallel process's share of each global batch.
    share: Option<Share>,
    opts: SourceOptions,
    seed: u64,
    first_epoch: u32,
    /// Positions of the first epoch to skip (consumed before a resume).
    offset: u64,
    epochs: u32,
    total: u64,
    chunk: usize,
    shared: Arc<Shared>,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    tokens: Receiver<()>,
    out: Sender<Chunk>,
}

impl Feeder {
    fn run(self) {
        let mut seq = 0u64;
        let mut emitted = 0u64;
        'epochs: for epoch in self.first_epoch..self.epochs {
            let mut order = epoch_order(self.len, &self.opts, self.seed, epoch, &self.source_id);
            // Seek, don't replay: the positions consumed before a mid-epoch resume are never read.
            let mut next_pos = if epoch == self.first_epoch { self.offset } else { 0 };
            if next_pos > 0 {
                order.nth(usize::try_from(next_pos - 1).unwrap_or(usize::MAX));
            }
            loop {
                let room = self.total - emitted;
                if room == 0 {
                    break 'epochs;
                }
                let take = self.chunk.min(usize::try_from(room).unwrap_or(usize::MAX));
                let end_pos = self.share.map(|s| s.shared_len(self.per_epoch));
                let mut items = Vec::with_capacity(take);
                let mut pos = Vec::with_capacity(take);
                while items.len() < take {
                    if end_pos.is_some_and(|e| next_pos >= e) {
                        break;
                    }
                    let Some(index) = order.next() else { break };
                    let p = next_pos;
                    next_pos += 1;
                    match self.share {
                        // Another process's block: not read here.
                        Some(s) if !s.owns(p) => continue,
                        // A process is as far as the global batch it helps train.
                        Some(s) => pos.push(s.batch_end(p) - 1),
                        None => pos.push(p),
                    }
                    items.push(Sample { index, epoch, ..Sample::default() });
                }
                if items.is_empty() {
                    break;
                }
                // Wait for a token, but not past a stop: a worker that stops drops its
                // chunk (and so its token), and a worker still waiting for input only
                // returns once this feeder has gone.
                loop {
                    match self.tokens.recv_timeout(Duration::from_millis(20)) {
                        Ok(()) => break,
                        Err(RecvTimeoutError::Timeout) if !self.shared.stopped() => {}
                        Err(_) => break 'epochs,
                    }
                }
                if self.shared.stopped() {
                    break 'epochs;
                }
                let count = items.len() as u64;
                let end = self.share.map_or(next_pos, |s| s.batch_end(next_pos - 1));
                let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.peak.fetch_max(now, Ordering::SeqCst);
                let chunk = Chunk { seq, items, pos, end: (epoch, end), skipped: Vec::new(), batched: None };
                if self.out.send(chunk).is_err() {
                    break 'epochs;
                }
                seq += 1;
                emitted += count;
            }
        }
    }
}

/// The share of a data-parallel sink ([`Sink::share`]): its batch stage split, or why not.
fn data_parallel_share(
    sink: &dyn Sink,
    sink_info: &StageInfo,
    batch: Option<&mut (StageInfo, Box<dyn Batcher>)>,
    on_error: OnError,
) -> Result<Option<Share>, RunError> {
    let Some((rank, world)) = sink.share().filter(|(_, w)| *w > 1) else { return Ok(None) };
    let refuse = |stage: &StageInfo, message: String| RunError::Refused {
        stage: stage.id.clone(),
        kind: stage.kind.clone(),
        message,
    };
    let Some((binfo, b)) = batch else {
        return Err(refuse(
            sink_info,
            format!("a run over {world} processes needs a `batch` stage before this one"),
        ));
    };
    if on_error == OnError::Skip {
        return Err(refuse(
            sink_info,
            format!("the source's `on_error: skip` would give the {world} processes unequal batches; use `on_error: fail` for a multi-process run"),
        ));
    }
    let block = b.split(world).map_err(|m| refuse(binfo, m))?;
    Ok(Some(Share { rank: rank as u64, world: world as u64, block: block as u64 }))
}

fn seg_is_own(seg: &[OpInfo], fuse: bool) -> bool {
    !fuse || seg.iter().any(|o| o.info.workers.is_some() || o.info.capacity.is_some())
}

fn spawn(
    handles: &mut Vec<std::thread::JoinHandle<()>>,
    shared: &Shared,
    name: &str,
    f: impl FnOnce() + Send + 'static,
) {
    match std::thread::Builder::new().name(name.chars().take(15).collect()).spawn(f) {
        Ok(h) => handles.push(h),
        Err(e) => shared.fail(RunError::Internal(format!("cannot start a thread: {e}"))),
    }
}

fn sample_error(info: &StageInfo, index: u64, name: Option<&str>, e: StageError) -> RunError {
    if let StageError::Diverged { .. } = e {
        return RunError::stage(&info.id, &info.kind, e);
    }
    RunError::Sample {
        stage: info.id.clone(),
        kind: info.kind.clone(),
        sample: index,
        name: name.map(str::to_string),
        message: e.to_string(),
    }
}

/// A worker's own batcher (the last segment's workers, when batching runs there).
struct WorkerBatch {
    info: StageInfo,
    batcher: Box<dyn Batcher>,
    counters: Arc<Counters>,
    /// The batches finished so far in this chunk (a chunk is one batch's worth of samples).
    out: Vec<Sample>,
}

/// The fused stage's writer, noting whether an error came from it or from the batcher.
struct Tracked<'a> {
    inner: &'a dyn TensorWriter,
    failed: AtomicBool,
}

impl TensorWriter for Tracked<'_> {
    fn shapes(&self, sample: &Sample) -> Result<Vec<Vec<usize>>, StageError> {
        self.inner.shapes(sample).inspect_err(|_| self.failed.store(true, Ordering::Relaxed))
    }
    fn append(&self, sample: &Sample, view: usize, dst: &mut Vec<f32>) -> Result<(), StageError> {
        self.inner.append(sample, view, dst).inspect_err(|_| self.failed.store(true, Ordering::Relaxed))
    }
}

impl WorkerBatch {
    /// Adds one sample, converted by `fused` (the stage before `batch`, and its writer) on the
    /// way if given. False once the run has failed.
    fn push(&mut self, sample: Sample, fused: Option<(&OpInfo, &dyn TensorWriter)>, shared: &Shared) -> bool {
        let (index, name) = (sample.index, sample.name.clone());
        let result = match fused {
            Some((o, w)) => {
                let w = Tracked { inner: w, failed: AtomicBool::new(false) };
                self.batcher
                    .push_via(sample, &w)
                    .map_err(|e| (e, w.failed.load(Ordering::Relaxed).then_some(o)))
            }
            None => self.batcher.push(sample).map_err(|e| (e, None)),
        };
        match result {
            Ok(b) => {
                self.out.extend(b);
                true
            }
            Err((e, from)) => {
                let info = from.map_or(&self.info, |o| &o.info);
                shared.fail(sample_error(info, index, name.as_deref(), e));
                false
            }
        }
    }

    /// The chunk's batches, with the last partial one if it is kept.
    fn finish(&mut self, shared: &Shared) -> Option<Vec<Sample>> {
        match self.batcher.flush() {
            Ok(b) => self.out.extend(b),
            Err(e) => {
                // As on the collector: a failed partial batch names the stage, not a sample.
                shared.fail(RunError::stage(&self.info.id, &self.info.kind, e));
                return None;
            }
        }
        Some(std::mem::take(&mut self.out))
    }
}

/// The stage's tensor writer, if it is a map stage that has one (see `MapStage::as_tensor_writer`).
fn tensor_writer(o: &OpInfo) -> Option<&dyn TensorWriter> {
    match &o.op {
        Op::Map(m) => m.as_tensor_writer(),
        Op::Read(_) => None,
    }
}

fn worker(
    seg: &[OpInfo],
    rx: &Receiver<Chunk>,
    tx: &Sender<Chunk>,
    shared: &Shared,
    seed: u64,
    on_error: OnError,
    mut batcher: Option<WorkerBatch>,
) {
    // The last stage, when it can write its tensors straight into the batch, is not applied
    // but handed to the batcher with each sample (see `MapStage::as_tensor_writer`).
    let fused = seg.last().filter(|_| batcher.is_some()).and_then(|o| Some((o, tensor_writer(o)?)));
    let applied = seg.len() - usize::from(fused.is_some());
    loop {
        let t = Instant::now();
        let Ok(mut chunk) = rx.recv() else { return };
        let waited = nanos(t.elapsed());
        for o in seg {
            o.counters.starved_ns.fetch_add(waited, Ordering::Relaxed);
        }
        let mut keep = Vec::with_capacity(chunk.items.len());
        let mut keep_pos = Vec::with_capacity(chunk.items.len());
        let mut busy = vec![0u64; seg.len()];
        let (mut batch_ns, mut batched) = (0u64, 0u64);
        let positions = std::mem::take(&mut chunk.pos);
        'samples: for (mut sample, pos) in std::mem::take(&mut chunk.items).into_iter().zip(positions) {
            if shared.stopped() {
                return;
            }
            for (k, o) in seg[..applied].iter().enumerate() {
                let cx = SampleCtx { seed, stage_key: o.key, epoch: sample.epoch, index: sample.index };
                let t = Instant::now();
                let result = match &o.op {
                    Op::Read(src) => src.read(sample.index, &cx).map(|mut s| {
                        s.index = sample.index;
                        s.epoch = sample.epoch;
                        sample = s;
                    }),
                    Op::Map(m) => m.apply(&mut sample, &cx),
                };
                busy[k] += nanos(t.elapsed());
                match result {
                    Ok(()) => {}
                    Err(StageError::Data(msg)) if on_error == OnError::Skip => {
                        chunk.skipped.push(Skipped {
                            index: sample.index,
                            name: sample.name.as_deref().map(str::to_string),
                            stage: o.info.id.clone(),
                            message: msg,
                        });
                        continue 'samples;
                    }
                    Err(e) => {
                        shared.fail(sample_error(&o.info, sample.index, sample.name.as_deref(), e));
                        return;
                    }
                }
                o.counters.items.fetch_add(1, Ordering::Relaxed);
            }
            // Into the batch at once, while the sample's tensors are still in cache; a fused
            // stage's time and count are its own.
            let Some(b) = batcher.as_mut() else {
                keep.push(sample);
                keep_pos.push(pos);
                continue;
            };
            let t = Instant::now();
            if !b.push(sample, fused, shared) {
                return;
            }
            match fused {
                Some((o, _)) => {
                    busy[applied] += nanos(t.elapsed());
                    o.counters.items.fetch_add(1, Ordering::Relaxed);
                }
                None => batch_ns += nanos(t.elapsed()),
            }
            batched += 1;
        }
        for (o, b) in seg.iter().zip(busy) {
            o.counters.busy_ns.fetch_add(b, Ordering::Relaxed);
        }
        if let Some(b) = batcher.as_mut() {
            let t = Instant::now();
            let Some(batches) = b.finish(shared) else { return };
            b.counters.busy_ns.fetch_add(batch_ns + nanos(t.elapsed()), Ordering::Relaxed);
            b.counters.items.fetch_add(batched, Ordering::Relaxed);
            chunk.batched = Some(batched);
            chunk.items = batches;
        } else {
            chunk.items = keep;
            chunk.pos = keep_pos;
        }
        let t = Instant::now();
        if tx.send(chunk).is_err() {
            return;
        }
        let blocked = nanos(t.elapsed());
        for o in seg {
            o.counters.blocked_ns.fetch_add(blocked, Ordering::Relaxed);
        }
    }
}
