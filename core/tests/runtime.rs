//! The runtime's promises: order, determinism across thread counts, clean stops, bounded memory.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use simclr_core::runtime::{epoch_order, run_chain, ChainStages, RunOptions, StageInfo};
use simclr_core::{MapStage, OnError, RunError, Sample, SampleCtx, Sink, Source, SourceOptions, StageError};

struct Count {
    n: u64,
    opts: SourceOptions,
}

impl Source for Count {
    fn len(&self) -> u64 {
        self.n
    }
    fn options(&self) -> SourceOptions {
        self.opts
    }
    fn read(&self, index: u64, _ctx: &SampleCtx) -> Result<Sample, StageError> {
        Ok(Sample { index, ..Sample::default() })
    }
}

/// Draws from the sample's random stream, so the digest depends on the seeding being right.
struct Noise;

impl MapStage for Noise {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        use rand::Rng;
        let mut rng = ctx.rng(0);
        sample.label = Some(rng.random());
        Ok(())
    }
}

/// Sleeps on chosen samples, or fails on one.
struct Slow {
    sleep_on: Option<u64>,
    fail_on: Option<u64>,
    data_error: bool,
}

impl MapStage for Slow {
    fn apply(&self, sample: &mut Sample, _ctx: &SampleCtx) -> Result<(), StageError> {
        if self.sleep_on == Some(sample.index) {
            std::thread::sleep(Duration::from_millis(300));
        }
        if self.fail_on == Some(sample.index) {
            return Err(if self.data_error {
                StageError::data("bad sample")
            } else {
                StageError::fatal("boom")
            });
        }
        Ok(())
    }
}

/// (index, epoch, label) of each sample the sink saw, in order.
type Seen = Vec<(u64, u32, Option<u32>)>;

#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Seen>>);

impl Sink for Collect {
    fn consume(&mut self, s: Sample) -> Result<(), StageError> {
        if let Ok(mut v) = self.0.lock() {
            v.push((s.index, s.epoch, s.label));
        }
        Ok(())
    }
}

fn info(id: &str) -> StageInfo {
    StageInfo { id: id.into(), kind: id.into(), workers: None, capacity: None }
}

fn chain(n: u64, opts: SourceOptions, maps: Vec<Arc<dyn MapStage>>, sink: Box<dyn Sink>) -> ChainStages {
    ChainStages {
        source: (info("data"), Arc::new(Count { n, opts })),
        maps: maps.into_iter().enumerate().map(|(i, m)| (info(&format!("m{i}")), m)).collect(),
        batch: None,
        sink: (info("sink"), sink),
    }
}

#[test]
fn output_is_in_dataset_order_and_identical_across_thread_counts() {
    let shuffled = SourceOptions { shuffle: true, ..SourceOptions::default() };
    let mut results = Vec::new();
    for (threads, fuse, chunk) in [(1, true, None), (2, true, None), (8, true, Some(3)), (3, false, Some(1))]
    {
        let out = Collect::default();
        let maps: Vec<Arc<dyn MapStage>> =
            vec![Arc::new(Noise), Arc::new(Slow { sleep_on: None, fail_on: None, data_error: false })];
        let opts = RunOptions {
            seed: 7,
            threads,
            fuse,
            chunk,
            digest: true,
            epochs: Some(2),
            ..RunOptions::default()
        };
        let report = run_chain(chain(5000, shuffled, maps, Box::new(out.clone())), &opts).unwrap();
        assert_eq!(report.samples, 10_000);
        let got = out.0.lock().unwrap().clone();
        results.push((report.digest.clone(), got));
    }
    let expected_order: Vec<u64> = (0..2).flat_map(|e| epoch_order(5000, &shuffled, 7, e, "data")).collect();
    assert_eq!(simclr_core::runtime::epoch_len(5000, &shuffled), 5000);
    for (digest, got) in &results {
        assert_eq!(digest, &results[0].0);
        assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), expected_order);
        assert_eq!(got, &results[0].1);
    }
    // Shuffling differs between epochs and actually permutes.
    assert_ne!(expected_order[..5000], expected_order[5000..]);
    assert_ne!(expected_order[..5000].to_vec(), (0..5000).collect::<Vec<u64>>());
}

#[test]
fn another_seed_gives_another_digest() {
    let run = |seed| {
        let opts = RunOptions { seed, threads: 2, digest: true, ..RunOptions::default() };
        let maps: Vec<Arc<dyn MapStage>> = vec![Arc::new(Noise)];
        run_chain(chain(100, SourceOptions::default(), maps, Box::new(Collect::default())), &opts)
            .unwrap()
            .digest
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn data_errors_follow_the_sources_on_error_policy() {
    let maps = || -> Vec<Arc<dyn MapStage>> {
        vec![Arc::new(Slow { sleep_on: None, fail_on: Some(10), data_error: true })]
    };
    let opts = RunOptions { threads: 2, ..RunOptions::default() };
    let skip = SourceOptions { on_error: OnError::Skip, ..SourceOptions::default() };
    let out = Collect::default();
    let report = run_chain(chain(100, skip, maps(), Box::new(out.clone())), &opts).unwrap();
    assert_eq!(report.samples, 99);
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].index, 10);
    assert!(!out.0.lock().unwrap().iter().any(|x| x.0 == 10));
    let err = run_chain(chain(100, SourceOptions::default(), maps(), Box::new(Collect::default())), &opts);
    assert!(matches!(err, Err(RunError::Sample { sample: 10, .. })));
}

#[test]
fn one_slow_sample_does_not_let_the_reorder_buffer_grow_unbounded() {
    // Sample 0 stalls its worker while the other worker races ahead: without the token
    // window every later chunk would pile up in the reorder buffer.
    let maps: Vec<Arc<dyn MapStage>> =
        vec![Arc::new(Slow { sleep_on: Some(0), fail_on: None, data_error: false })];
    let opts = RunOptions { threads: 2, chunk: Some(1), ..RunOptions::default() };
    let report =
        run_chain(chain(20_000, SourceOptions::default(), maps, Box::new(Collect::default())), &opts)
            .unwrap();
    assert_eq!(report.samples, 20_000);
    assert!(
        report.peak_chunks_in_flight <= report.window_chunks,
        "{} > {}",
        report.peak_chunks_in_flight,
        report.window_chunks
    );
    assert!(report.window_chunks < 64);
}

#[test]
fn a_slow_sink_bounds_the_samples_in_flight() {
    struct SlowSink;
    impl Sink for SlowSink {
        fn consume(&mut self, _s: Sample) -> Result<(), StageError> {
            std::thread::sleep(Duration::from_micros(200));
            Ok(())
        }
    }
    let opts = RunOptions { threads: 2, chunk: Some(2), ..RunOptions::default() };
    let report =
        run_chain(chain(2_000, SourceOptions::default(), vec![], Box::new(SlowSink)), &opts).unwrap();
    assert!(report.peak_chunks_in_flight <= report.window_chunks);
}

#[test]
fn limit_and_shards_partition_the_dataset() {
    let mut all = Vec::new();
    for index in 0..3 {
        let o = SourceOptions {
            limit: Some(10),
            shard: Some(simclr_core::Shard { index, count: 3 }),
            ..SourceOptions::default()
        };
        all.extend(epoch_order(100, &o, 0, 0, "data"));
    }
    all.sort_unstable();
    let lens: u64 = (0..3)
        .map(|index| {
            let o = SourceOptions {
                limit: Some(10),
                shard: Some(simclr_core::Shard { index, count: 3 }),
                ..SourceOptions::default()
            };
            simclr_core::runtime::epoch_len(100, &o)
        })
        .sum();
    assert_eq!(lens, 10);
    assert_eq!(all, (0..10).collect::<Vec<u64>>());
}

/// Batches of index lists, closed at `size` or when the epoch changes (like `batch`).
struct Indices {
    size: usize,
    drop_last: bool,
    pending: Vec<Sample>,
    workers: bool,
}

impl Indices {
    fn close(&mut self) -> Option<Sample> {
        let samples = std::mem::take(&mut self.pending);
        let first = samples.first()?;
        if samples.len() < self.size && self.drop_last {
            return None;
        }
        let (index, epoch) = (first.index, first.epoch);
        let batch = simclr_core::Batch {
            views: Vec::new(),
            indices: samples.iter().map(|s| s.index).collect(),
            labels: samples.iter().map(|s| s.label).collect(),
            pool: None,
        };
        Some(Sample { index, epoch, payload: simclr_core::Payload::Batch(batch), ..Sample::default() })
    }
}

impl simclr_core::Batcher for Indices {
    fn push(&mut self, sample: Sample) -> Result<Option<Sample>, StageError> {
        let mut out = None;
        if self.pending.first().is_some_and(|p| p.epoch != sample.epoch) {
            out = self.close();
        }
        self.pending.push(sample);
        if self.pending.len() >= self.size && out.is_none() {
            out = self.close();
        }
        Ok(out)
    }
    fn flush(&mut self) -> Result<Option<Sample>, StageError> {
        Ok(self.close())
    }
    fn worker_batch_size(&self) -> Option<usize> {
        self.workers.then_some(self.size)
    }
    fn fork(&self) -> Option<Box<dyn simclr_core::Batcher>> {
        Some(Box::new(Indices { pending: Vec::new(), ..*self }))
    }
}

/// (first index, epoch, indices, labels) of each batch the sink saw, in order.
type SeenBatches = Vec<(u64, u32, Vec<u64>, Vec<Option<u32>>)>;

#[derive(Clone, Default)]
struct CollectBatches(Arc<Mutex<SeenBatches>>);

impl Sink for CollectBatches {
    fn consume(&mut self, s: Sample) -> Result<(), StageError> {
        if let (simclr_core::Payload::Batch(b), Ok(mut v)) = (&s.payload, self.0.lock()) {
            v.push((s.index, s.epoch, b.indices.clone(), b.labels.clone()));
        }
        Ok(())
    }
}

/// With several workers the batches are assembled in the workers (chunks of one batch each);
/// they must be the batches the collector makes alone: same samples, same order, the partial
/// batch at each epoch's end kept or dropped alike, and a `max_samples` cut in the same place.
#[test]
fn batches_made_in_the_workers_equal_the_collectors() {
    let shuffled = SourceOptions { shuffle: true, ..SourceOptions::default() };
    for (drop_last, max_samples) in [(false, None), (true, None), (false, Some(1_234)), (true, Some(1_234))] {
        let mut runs = Vec::new();
        for (threads, workers_may_batch) in [(1, true), (2, false), (2, true), (3, true)] {
            let out = CollectBatches::default();
            let opts = RunOptions {
                seed: 3,
                threads,
                digest: true,
                epochs: Some(3),
                max_samples,
                ..RunOptions::default()
            };
            let mut c = chain(1_000, shuffled, vec![Arc::new(Noise)], Box::new(out.clone()));
            let batcher = Indices { size: 64, drop_last, pending: Vec::new(), workers: workers_may_batch };
            c.batch = Some((info("batch"), Box::new(batcher)));
            let report = run_chain(c, &opts).unwrap();
            let batch_line = report.stages.iter().find(|s| s.id == "batch").unwrap();
            // The worker path was taken where it may be (several workers), not elsewhere.
            assert_eq!(batch_line.workers > 1, threads > 1 && workers_may_batch, "threads {threads}");
            // Samples are counted, not batches; a dropped partial batch's samples too.
            assert_eq!(report.samples, max_samples.unwrap_or(3_000), "threads {threads}");
            let got = out.0.lock().unwrap().clone();
            runs.push((report.digest.clone(), got));
        }
        let (digest, batches) = &runs[0];
        // 1,000 = 15 x 64 + 40: the 40 close each epoch (or are dropped).
        let per_epoch = if drop_last { 15 } else { 16 };
        if max_samples.is_none() {
            assert_eq!(batches.len(), 3 * per_epoch);
        }
        for (d, b) in &runs[1..] {
            assert_eq!(d, digest, "drop_last {drop_last}, max_samples {max_samples:?}");
            assert_eq!(b, batches, "drop_last {drop_last}, max_samples {max_samples:?}");
        }
    }
}

/// A `to_tensor` stand-in: index and label as a 2-value tensor, by `apply` or written straight
/// into the batch (when `writer`); counts which way each sample went, and can fail on one.
struct Tens {
    writer: bool,
    fail_on: Option<u64>,
    applied: std::sync::atomic::AtomicUsize,
    written: std::sync::atomic::AtomicUsize,
}

impl Tens {
    fn new(writer: bool, fail_on: Option<u64>) -> Self {
        Self { writer, fail_on, applied: Default::default(), written: Default::default() }
    }
    fn values(&self, s: &Sample) -> Result<Vec<f32>, StageError> {
        if self.fail_on == Some(s.index) {
            return Err(StageError::fatal("cannot make this tensor"));
        }
        Ok(vec![s.index as f32, s.label.unwrap_or(0) as f32])
    }
}

impl MapStage for Tens {
    fn apply(&self, sample: &mut Sample, _ctx: &SampleCtx) -> Result<(), StageError> {
        self.applied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let data = self.values(sample)?;
        sample.payload = simclr_core::Payload::Tensors(vec![simclr_core::Tensor { shape: vec![2], data }]);
        Ok(())
    }
    fn as_tensor_writer(&self) -> Option<&dyn simclr_core::TensorWriter> {
        self.writer.then_some(self as &dyn simclr_core::TensorWriter)
    }
}

impl simclr_core::TensorWriter for Tens {
    fn shapes(&self, _sample: &Sample) -> Result<Vec<Vec<usize>>, StageError> {
        Ok(vec![vec![2]])
    }
    fn append(&self, sample: &Sample, _view: usize, dst: &mut Vec<f32>) -> Result<(), StageError> {
        self.written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        dst.extend(self.values(sample)?);
        Ok(())
    }
}

/// Batches of the samples' tensors, concatenated (through the trait's default `push_via`).
struct Stack {
    size: usize,
    pending: Vec<Sample>,
}

impl simclr_core::Batcher for Stack {
    fn push(&mut self, sample: Sample) -> Result<Option<Sample>, StageError> {
        let mut out = None;
        if self.pending.first().is_some_and(|p| p.epoch != sample.epoch) {
            out = self.flush()?;
        }
        self.pending.push(sample);
        if self.pending.len() >= self.size && out.is_none() {
            out = self.flush()?;
        }
        Ok(out)
    }
    fn flush(&mut self) -> Result<Option<Sample>, StageError> {
        let samples = std::mem::take(&mut self.pending);
        let Some(first) = samples.first() else { return Ok(None) };
        let (index, epoch) = (first.index, first.epoch);
        let mut data = Vec::new();
        for s in &samples {
            let simclr_core::Payload::Tensors(ts) = &s.payload else {
                return Err(StageError::fatal("needs tensors"));
            };
            data.extend(ts.iter().flat_map(|t| t.data.iter().copied()));
        }
        let batch = simclr_core::Batch {
            views: vec![simclr_core::Tensor { shape: vec![samples.len(), 2], data }],
            indices: samples.iter().map(|s| s.index).collect(),
            labels: samples.iter().map(|s| s.label).collect(),
            pool: None,
        };
        Ok(Some(Sample { index, epoch, payload: simclr_core::Payload::Batch(batch), ..Sample::default() }))
    }
    fn worker_batch_size(&self) -> Option<usize> {
        Some(self.size)
    }
    fn fork(&self) -> Option<Box<dyn simclr_core::Batcher>> {
        Some(Box::new(Stack { size: self.size, pending: Vec::new() }))
    }
}

/// Every batch's tensor values, in order.
#[derive(Clone, Default)]
struct CollectValues(Arc<Mutex<Vec<Vec<f32>>>>);

impl Sink for CollectValues {
    fn consume(&mut self, s: Sample) -> Result<(), StageError> {
        if let (simclr_core::Payload::Batch(b), Ok(mut v)) = (&s.payload, self.0.lock()) {
            v.push(b.views.iter().flat_map(|t| t.data.iter().copied()).collect());
        }
        Ok(())
    }
}

fn tensor_chain(tens: Arc<Tens>, sink: Box<dyn Sink>) -> ChainStages {
    let shuffled = SourceOptions { shuffle: true, ..SourceOptions::default() };
    let mut c = chain(500, shuffled, vec![Arc::new(Noise), tens], sink);
    c.batch = Some((info("batch"), Box::new(Stack { size: 32, pending: Vec::new() })));
    c
}

/// A stage that can write its tensors straight into the batch is handed to the batcher in the
/// workers (with one worker too) instead of being applied: the batches are the bits `apply`
/// and the collector give, at every thread count; with manual chunks the collector batches
/// and the stage is applied as usual.
#[test]
fn a_tensor_writer_fused_into_the_batch_gives_the_same_batches() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut runs = Vec::new();
    for (threads, writer, chunk) in
        [(1, false, None), (1, true, None), (2, true, None), (3, true, None), (2, true, Some(7))]
    {
        let out = CollectValues::default();
        let tens = Arc::new(Tens::new(writer, None));
        let opts =
            RunOptions { seed: 5, threads, chunk, digest: true, epochs: Some(2), ..RunOptions::default() };
        let report = run_chain(tensor_chain(tens.clone(), Box::new(out.clone())), &opts).unwrap();
        assert_eq!(report.samples, 1_000);
        let fused = writer && chunk.is_none();
        assert_eq!(tens.written.load(Relaxed), if fused { 1_000 } else { 0 }, "threads {threads}, {chunk:?}");
        assert_eq!(tens.applied.load(Relaxed), if fused { 0 } else { 1_000 }, "threads {threads}, {chunk:?}");
        let m1 = report.stages.iter().find(|s| s.id == "m1").unwrap();
        assert_eq!(m1.items, 1_000, "the fused stage still counts its samples");
        let values = out.0.lock().unwrap().clone();
        assert_eq!(values.len(), 2 * 16, "500 = 15 x 32 + 20, per epoch");
        runs.push((report.digest.clone(), values));
    }
    for (digest, values) in &runs[1..] {
        assert_eq!(digest, &runs[0].0);
        assert_eq!(values, &runs[0].1);
    }
}

/// An error from the fused stage names that stage and the sample, not `batch`.
#[test]
fn a_fused_stage_error_names_the_stage() {
    for threads in [1, 2] {
        let tens = Arc::new(Tens::new(true, Some(123)));
        let opts = RunOptions { seed: 5, threads, ..RunOptions::default() };
        let err = run_chain(tensor_chain(tens, Box::new(CollectValues::default())), &opts).unwrap_err();
        match err {
            RunError::Sample { stage, sample, .. } => assert_eq!((stage.as_str(), sample), ("m1", 123)),
            other => panic!("expected the stage's error, got {other}"),
        }
    }
}

/// Counts the samples it is applied to.
#[derive(Default)]
struct Counted(std::sync::atomic::AtomicU64);

impl MapStage for Counted {
    fn apply(&self, _: &mut Sample, _: &SampleCtx) -> Result<(), StageError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// (epoch, sample indices) of each item a sink consumed.
type SeenItems = Vec<(u32, Vec<u64>)>;

/// A sink resumed at (epoch, offset) that records what it consumed and the positions it was
/// told.
#[derive(Clone, Default)]
struct Resumed {
    start: (u32, u64),
    seen: Arc<Mutex<SeenItems>>,
    told: Arc<Mutex<Vec<(u32, u64)>>>,
}

impl Sink for Resumed {
    fn start_epoch(&self) -> u32 {
        self.start.0
    }
    fn start_offset(&self) -> u64 {
        self.start.1
    }
    fn position(&mut self, epoch: u32, consumed: u64) {
        self.told.lock().unwrap().push((epoch, consumed));
    }
    fn consume(&mut self, s: Sample) -> Result<(), StageError> {
        let indices = match &s.payload {
            simclr_core::Payload::Batch(b) => b.indices.clone(),
            _ => vec![s.index],
        };
        self.seen.lock().unwrap().push((s.epoch, indices));
        Ok(())
    }
}

/// Mid-epoch resume: the source starts `offset` positions into the first epoch without reading
/// the positions before (seek, not replay), delivers exactly the rest of the uninterrupted
/// run's samples, and the sink is told how far each consumed item brought the run, for every
/// way of batching (none, on the collector, in the workers) and with a skipped sample.
#[test]
fn a_sink_resumed_mid_epoch_gets_the_rest_and_nothing_before_is_read() {
    let shuffled = SourceOptions { shuffle: true, ..SourceOptions::default() };
    let order: Vec<Vec<u64>> = (0..3).map(|e| epoch_order(100, &shuffled, 9, e, "data").collect()).collect();
    // (batch size, workers may batch, threads, skip sample)
    for (batch, in_workers, threads, skip) in [
        (None, false, 2, None),
        (Some(10), false, 1, None),
        (Some(10), true, 2, None),
        (Some(10), false, 2, Some(7)),
    ] {
        let what = format!("batch {batch:?}, in workers {in_workers}, threads {threads}, skip {skip:?}");
        let counted = Arc::new(Counted::default());
        let sink = Resumed { start: (1, 37), ..Resumed::default() };
        let on_error = if skip.is_some() { OnError::Skip } else { OnError::Fail };
        let opts_src = SourceOptions { on_error, ..shuffled };
        let maps: Vec<Arc<dyn MapStage>> =
            vec![counted.clone(), Arc::new(Slow { sleep_on: None, fail_on: skip, data_error: true })];
        let mut c = chain(100, opts_src, maps, Box::new(sink.clone()));
        if let Some(size) = batch {
            let batcher = Indices { size, drop_last: false, pending: Vec::new(), workers: in_workers };
            c.batch = Some((info("batch"), Box::new(batcher)));
        }
        let opts = RunOptions { seed: 9, threads, epochs: Some(3), ..RunOptions::default() };
        let report = run_chain(c, &opts).unwrap();
        let read = counted.0.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(read, 63 + 100, "{what}: only the positions after the checkpoint are read");

        // Exactly the samples after position 37 of epoch 1, then epoch 2 (minus the skipped one).
        let want: Vec<(u32, u64)> = order[1][37..]
            .iter()
            .map(|&i| (1, i))
            .chain(order[2].iter().map(|&i| (2, i)))
            .filter(|&(_, i)| Some(i) != skip)
            .collect();
        let seen = sink.seen.lock().unwrap().clone();
        let got: Vec<(u32, u64)> = seen.iter().flat_map(|(e, ix)| ix.iter().map(move |&i| (*e, i))).collect();
        assert_eq!(got, want, "{what}");
        assert_eq!(report.samples, want.len() as u64, "{what}");

        // One told position per consumed item: where its last sample lies in its epoch's order
        // (+1), so they go forward within an epoch and each epoch ends at 100.
        let told = sink.told.lock().unwrap().clone();
        assert_eq!(told.len(), seen.len(), "{what}");
        for ((e, ix), (te, p)) in seen.iter().zip(&told) {
            assert_eq!(e, te, "{what}");
            let last = order[*e as usize].iter().position(|i| Some(i) == ix.last()).unwrap() as u64;
            assert_eq!(*p, last + 1, "{what}: {ix:?}");
        }
        assert!(told.contains(&(1, 100)) && told.last() == Some(&(2, 100)), "{what}: {told:?}");
    }
}
