//! Checkpoints of the `simclr_train` sink: when to write them, and resuming from them.
//!
//! Checkpoints are taken every `checkpoint_every` epochs, every `checkpoint_every_steps` steps
//! (mid-epoch), at the end of training, and on Ctrl-C / SIGTERM (at the last trained step). A
//! mid-epoch checkpoint records how many positions of the epoch's sample order the trained
//! batches consumed (the runtime tells the sink, [`simclr_core::Sink::position`]) and the
//! epoch's running sums; a resumed run's source skips those positions without reading them
//! (seek, not replay) and goes on: sample i of epoch k looks the same whatever came before it
//! (its randomness is keyed by seed, epoch and index), so the resumed run sees exactly the
//! batches the uninterrupted run saw and the losses agree bit for bit. Where the sink is not
//! told positions (a sink driven by hand), Ctrl-C falls back to the end of the last completed
//! epoch and the interrupted epoch is redone. Lines past the checkpoint are removed from
//! `metrics.jsonl` on resume.

use std::path::Path;

use simclr_core::StageError;

use super::{EpochSums, TrainSink};
use crate::checkpoint::{check_config, config_json, Checkpoint, CheckpointMeta, PartialEpoch, VERSION};

/// The sink's checkpoint bookkeeping.
#[derive(Default)]
pub(super) struct CkptState {
    /// The pipeline seed and the stage id, recorded in checkpoints.
    pub seed: u64,
    pub stage: String,
    /// Epochs completed (the absolute number of the next epoch).
    pub epochs_done: u32,
    /// The first epoch this run feeds (after a resume).
    pub start_epoch: u32,
    /// `epochs_done` of the checkpoint on disk, if any.
    pub on_disk: Option<u32>,
    /// The state at the end of the last completed epoch when it is newer than the file.
    pub pending: Option<Checkpoint>,
    /// The runtime's position once the last consumed batch was in: (epoch, positions of its
    /// order consumed). None when the sink is not told (then checkpoints are per epoch).
    pub position: Option<(u32, u64)>,
    /// Positions of `start_epoch` consumed before a mid-epoch resume.
    pub start_offset: u64,
}

fn fatal(e: impl std::fmt::Display) -> StageError {
    StageError::fatal(e.to_string())
}

impl TrainSink {
    /// The current state as a checkpoint: at the end of epoch `epochs_done - 1`, or with
    /// `partial`, `partial.consumed` positions into epoch `epochs_done`.
    fn checkpoint(&self, partial: Option<PartialEpoch>) -> Result<Checkpoint, StageError> {
        let tensors = self
            .engine
            .state_tensors()
            .map_err(|e| StageError::fatal(format!("cannot take a checkpoint: {e}")))?;
        let meta = CheckpointMeta {
            version: VERSION,
            stage: self.ckpt.stage.clone(),
            seed: self.ckpt.seed,
            config: config_json(&self.cfg),
            epochs_done: self.ckpt.epochs_done,
            step: self.step,
            steps_per_epoch: self.steps_per_epoch,
            finished: partial.is_none() && self.ckpt.epochs_done >= self.cfg.epochs,
            partial,
            base_lr: self.base_lr,
        };
        Ok(Checkpoint { meta, tensors })
    }

    fn write_checkpoint(&mut self, c: &Checkpoint) -> Result<(), StageError> {
        let Some(dir) = self.run_dir.as_ref().filter(|_| self.writes()) else { return Ok(()) };
        c.write(dir).map_err(fatal)?;
        self.ckpt.on_disk = Some(c.meta.epochs_done);
        self.ckpt.pending = None;
        Ok(())
    }

    /// Called when epoch `self.epoch` has ended (its metrics line written): checkpoints it
    /// when due (`always` at the end of training), else keeps it in memory for a Ctrl-C.
    pub(super) fn epoch_completed(&mut self, always: bool) -> Result<(), StageError> {
        let Some(epoch) = self.epoch else { return Ok(()) };
        self.ckpt.epochs_done = epoch.saturating_add(1);
        if self.run_dir.is_none() {
            return Ok(());
        }
        let every = self.cfg.checkpoint_every;
        let due = always || (every > 0 && self.ckpt.epochs_done.is_multiple_of(every));
        let c = self.checkpoint(None)?;
        if due {
            self.write_checkpoint(&c)
        } else {
            self.ckpt.pending = Some(c);
            Ok(())
        }
    }

    /// The state after the last trained step, mid-epoch: None unless the runtime told the
    /// position of the epoch being trained and a step of it was trained.
    fn mid_epoch(&self) -> Result<Option<Checkpoint>, StageError> {
        let (Some(epoch), Some((at, consumed))) = (self.epoch, self.ckpt.position) else { return Ok(None) };
        if at != epoch || self.sums.steps == 0 || self.run_dir.is_none() {
            return Ok(None);
        }
        let s = &self.sums;
        let partial = PartialEpoch {
            consumed,
            steps: s.steps,
            images: s.images,
            loss: s.loss,
            contrast_acc: s.acc,
            contrast_entropy: s.entropy,
            step_s: s.step_s,
            data_wait_s: s.data_wait_s,
            lr: s.lr,
        };
        let mut c = self.checkpoint(Some(partial))?;
        c.meta.epochs_done = epoch;
        Ok(Some(c))
    }

    /// After each step: a mid-epoch checkpoint every `checkpoint_every_steps` steps.
    pub(super) fn step_completed(&mut self) -> Result<(), StageError> {
        let every = self.cfg.checkpoint_every_steps;
        if every == 0 || !self.step.is_multiple_of(every) {
            return Ok(());
        }
        match self.mid_epoch()? {
            Some(c) => {
                tracing::debug!(
                    "checkpoint at step {} (epoch {}, {} samples in)",
                    c.meta.step,
                    c.meta.epochs_done,
                    c.meta.partial.as_ref().map_or(0, |p| p.consumed)
                );
                self.write_checkpoint(&c)
            }
            None => Ok(()),
        }
    }

    /// Ctrl-C / SIGTERM: write the state after the last trained step (mid-epoch) when the
    /// position is known; else close the current epoch if its last batch was trained (and it
    /// is not the final epoch, which `finish` closes), then write the last completed epoch's
    /// state if the file does not hold it yet.
    pub(super) fn save_on_interrupt(&mut self) -> Result<(), StageError> {
        if let Some(c) = self.mid_epoch()? {
            return self.write_checkpoint(&c);
        }
        let complete = matches!(self.steps_per_epoch, Some(spe) if self.sums.steps >= spe);
        let last = self.epoch.is_some_and(|e| e.saturating_add(1) >= self.cfg.epochs);
        if complete && !last && self.epoch.is_some() {
            self.end_epoch()?;
            self.epoch_completed(true)?;
            self.epoch = None;
        }
        if let Some(c) = self.ckpt.pending.take() {
            self.write_checkpoint(&c)?;
        }
        Ok(())
    }

    /// `simclr run --resume`: restores the state of `run_dir/checkpoint.safetensors`.
    pub(super) fn resume_from_dir(&mut self) -> Result<(), StageError> {
        let Some(dir) = self.run_dir.clone() else {
            return Err(StageError::fatal("resuming needs a run directory (simclr run --resume DIR)"));
        };
        let c = Checkpoint::read(&dir).map_err(fatal)?;
        let path = dir.join(crate::checkpoint::FILE);
        let m = &c.meta;
        check_config(&m.config, &config_json(&self.cfg))
            .map_err(|e| StageError::fatal(format!("{}: {e}", path.display())))?;
        if m.seed != self.ckpt.seed {
            return Err(StageError::fatal(format!(
                "{}: the checkpoint was made with seed {}, the pipeline now has seed {}; resume \
                 with the seed the run started with (`--seed {}`)",
                path.display(),
                m.seed,
                self.ckpt.seed,
                m.seed
            )));
        }
        if m.finished || m.epochs_done >= self.cfg.epochs {
            return Err(StageError::fatal(format!(
                "the run in {} already finished its {} epochs (the encoder is in \
                 encoder.safetensors); nothing to resume: start a new run without --resume",
                dir.display(),
                self.cfg.epochs
            )));
        }
        self.engine.load_state(&c.tensors).map_err(|e| {
            StageError::fatal(format!(
                "{}: does not fit the configured model ({e}); resume with the pipeline the run \
                 started with, or start a new run",
                path.display()
            ))
        })?;
        self.step = m.step;
        self.base_lr = m.base_lr.or(self.base_lr);
        self.steps_per_epoch = m.steps_per_epoch.or(self.cfg.steps_per_epoch);
        self.ckpt.epochs_done = m.epochs_done;
        self.ckpt.start_epoch = m.epochs_done;
        self.ckpt.on_disk = Some(m.epochs_done);
        if let Some(p) = &m.partial {
            // Mid-epoch: the epoch goes on where it stopped, its sums too.
            self.epoch = Some(m.epochs_done);
            self.ckpt.start_offset = p.consumed;
            self.ckpt.position = Some((m.epochs_done, p.consumed));
            self.sums = EpochSums {
                steps: p.steps,
                images: p.images,
                loss: p.loss,
                acc: p.contrast_acc,
                entropy: p.contrast_entropy,
                step_s: p.step_s,
                data_wait_s: p.data_wait_s,
                lr: p.lr,
                started: Some(std::time::Instant::now()),
            };
        }
        let (epoch, step) = (m.epochs_done, m.step);
        if self.writes() {
            truncate_metrics(&dir.join(simclr_core::run_dir::METRICS_FILE), epoch, step)?;
        }
        let consumed = m.partial.as_ref().map_or(0, |p| p.consumed);
        self.write_line(
            serde_json::json!({"type": "resume", "epoch": epoch, "step": step, "consumed": consumed}),
        )
    }
}

/// Drops the lines a resumed run will write again: steps from `step` on, epochs from `epoch`
/// on (those of a partial epoch abandoned by Ctrl-C). Atomic: a temporary file, then a rename.
fn truncate_metrics(path: &Path, epoch: u32, step: u64) -> Result<(), StageError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StageError::fatal(format!("cannot read {}: {e}", path.display()))),
    };
    // A line cut short by a kill -9 is dropped (it can only be the last).
    let keep = |line: &str| {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { return false };
        match v["type"].as_str() {
            Some("step") => v["step"].as_u64().is_some_and(|s| s < step),
            Some("epoch") => v["epoch"].as_u64().is_some_and(|e| e < u64::from(epoch)),
            _ => true,
        }
    };
    let kept: Vec<&str> = text.lines().filter(|l| keep(l)).collect();
    if kept.len() == text.lines().count() {
        return Ok(());
    }
    let mut text = kept.join("\n");
    text.push('\n');
    simclr_core::run_dir::write_atomic(path, text.as_bytes())
        .map_err(|e| StageError::fatal(format!("cannot rewrite {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use simclr_core::{Batch, Context, Payload, Sample, Sink, Stage, StageConfig, Tensor};

    use crate::checkpoint::{Checkpoint, FILE};
    use crate::SimclrTrain;

    fn cfg(extra: serde_json::Value) -> SimclrTrain {
        let mut v = serde_json::json!({
            "width": 0.125, "epochs": 3, "warmup_epochs": 1,
            "head": {"hidden_dim": 16, "out_dim": 8},
            "optimizer": {"lr": 1.0, "lr_scaling": "none"}
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        serde_json::from_value(v).unwrap()
    }

    /// Batch `b` of epoch `epoch`: 4 pairs of 8 x 8 pseudo-images, the same in every run.
    fn batch(epoch: u32, b: u64) -> Sample {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(u64::from(epoch) * 100 + b);
        let len = 4 * 3 * 8 * 8;
        let a: Vec<f32> = (0..len).map(|_| rng.random::<f32>()).collect();
        let v: Vec<f32> = a.iter().map(|x| (x + 0.1 * rng.random::<f32>()).min(1.0)).collect();
        let shape = vec![4, 3, 8, 8];
        let views = vec![Tensor { shape: shape.clone(), data: a }, Tensor { shape, data: v }];
        let payload =
            Payload::Batch(Batch { views, indices: (0..4).collect(), labels: vec![None; 4], pool: None });
        Sample { index: b, epoch, payload, ..Sample::default() }
    }

    fn sink(c: &SimclrTrain, dir: &std::path::Path, seed: u64) -> Box<dyn Sink> {
        let cx = Context {
            seed,
            stage_id: "train".into(),
            run_dir: Some(dir.to_path_buf()),
            ..Context::default()
        };
        match c.build(&cx).unwrap() {
            Stage::Sink(s) => s,
            _ => panic!("not a sink"),
        }
    }

    fn feed(s: &mut dyn Sink, epochs: std::ops::Range<u32>, batches: u64) {
        for e in epochs {
            for b in 0..batches {
                s.consume(batch(e, b)).unwrap();
            }
        }
    }

    /// (step or epoch, loss) of metrics lines.
    type Losses = Vec<(u64, f64)>;

    /// (step, loss) of every step line and (epoch, loss) of every epoch line.
    fn losses(dir: &std::path::Path) -> (Losses, Losses) {
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let (mut steps, mut epochs) = (Vec::new(), Vec::new());
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let loss = v["loss"].as_f64().unwrap_or(f64::NAN);
            match v["type"].as_str() {
                Some("step") => steps.push((v["step"].as_u64().unwrap(), loss)),
                Some("epoch") => epochs.push((v["epoch"].as_u64().unwrap(), loss)),
                _ => {}
            }
        }
        (steps, epochs)
    }

    /// `checkpoint_every_steps` writes mid-epoch checkpoints at the position the runtime told;
    /// a full disk fails the step with the path and the reason, and the previous checkpoint
    /// stays readable.
    #[cfg(target_os = "linux")]
    #[test]
    fn step_checkpoints_record_the_position_and_a_full_disk_keeps_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sink(&cfg(serde_json::json!({"checkpoint_every_steps": 2})), dir.path(), 7);
        s.position(0, 4);
        s.consume(batch(0, 0)).unwrap();
        assert!(!dir.path().join(FILE).exists(), "a checkpoint after 1 step");
        s.position(0, 8);
        s.consume(batch(0, 1)).unwrap();
        let m = Checkpoint::read(dir.path()).unwrap().meta;
        let p = m.partial.clone().unwrap();
        assert_eq!((m.epochs_done, m.step, p.consumed, p.steps), (0, 2, 8, 2), "{m:?}");

        std::os::unix::fs::symlink("/dev/full", dir.path().join(format!("{FILE}.tmp"))).unwrap();
        s.position(0, 12);
        s.consume(batch(0, 2)).unwrap();
        s.position(0, 16);
        let e = s.consume(batch(0, 3)).unwrap_err().to_string();
        assert!(
            e.contains(&dir.path().join(FILE).display().to_string()) && e.contains("disk is full"),
            "{e}"
        );
        let back = Checkpoint::read(dir.path()).unwrap().meta;
        assert_eq!(back, m, "the previous checkpoint is intact");
    }

    #[test]
    fn interrupted_mid_epoch_then_resumed_matches_an_uninterrupted_run_bit_for_bit() {
        let whole = tempfile::tempdir().unwrap();
        let mut s = sink(&cfg(serde_json::json!({})), whole.path(), 7);
        feed(s.as_mut(), 0..3, 3);
        s.finish().unwrap();
        let (want_steps, want_epochs) = losses(whole.path());
        assert_eq!((want_steps.len(), want_epochs.len()), (9, 3));

        // checkpoint_every 0: nothing on disk until the interrupt, which saves epoch 0's end.
        let cut = tempfile::tempdir().unwrap();
        let mut s = sink(&cfg(serde_json::json!({"checkpoint_every": 0})), cut.path(), 7);
        feed(s.as_mut(), 0..1, 3);
        s.consume(batch(1, 0)).unwrap();
        s.consume(batch(1, 1)).unwrap();
        assert!(!cut.path().join(FILE).exists(), "checkpoint_every 0 wrote before the end");
        s.interrupted().unwrap();
        drop(s);
        let c = Checkpoint::read(cut.path()).unwrap();
        assert_eq!((c.meta.epochs_done, c.meta.step, c.meta.steps_per_epoch), (1, 3, Some(3)));
        assert!(!c.meta.finished);

        // Resume (checkpoint_every may change): epoch 1 from its start.
        let mut s = sink(&cfg(serde_json::json!({"checkpoint_every": 1})), cut.path(), 7);
        assert_eq!(s.start_epoch(), 0);
        s.resume().unwrap();
        assert_eq!(s.start_epoch(), 1);
        feed(s.as_mut(), 1..3, 3);
        s.finish().unwrap();
        let (steps, epochs) = losses(cut.path());
        assert_eq!(steps, want_steps, "step losses: the partial epoch's lines are dropped, the rest agree");
        assert_eq!(epochs, want_epochs);
        let enc = |d: &std::path::Path| std::fs::read(d.join("encoder.safetensors")).unwrap();
        assert_eq!(enc(cut.path()), enc(whole.path()), "same encoder bytes");
        let ck = |d: &std::path::Path| std::fs::read(d.join(FILE)).unwrap();
        assert_eq!(ck(cut.path()), ck(whole.path()), "same final checkpoint bytes");
        let text = std::fs::read_to_string(cut.path().join("metrics.jsonl")).unwrap();
        assert_eq!(text.matches(r#""type":"resume""#).count(), 1, "{text}");
    }

    #[test]
    fn resume_errors_name_the_file_and_the_fix() {
        let c = cfg(serde_json::json!({}));
        let err = |s: &mut Box<dyn Sink>| s.resume().unwrap_err().to_string();

        let empty = tempfile::tempdir().unwrap();
        let e = err(&mut sink(&c, empty.path(), 7));
        assert!(e.contains("holds no checkpoint.safetensors") && e.contains("without --resume"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let mut s = sink(&c, dir.path(), 7);
        feed(s.as_mut(), 0..1, 2);
        s.consume(batch(1, 0)).unwrap(); // closes epoch 0: checkpoint_every 1 writes it
        drop(s);
        assert_eq!(Checkpoint::read(dir.path()).unwrap().meta.epochs_done, 1);

        let e = err(&mut sink(&cfg(serde_json::json!({"width": 0.25})), dir.path(), 7));
        assert!(e.contains("different architecture") && e.contains("`width`: 0.125"), "{e}");
        assert!(e.contains("checkpoint.safetensors") && e.contains("pipeline.yaml"), "{e}");
        let e = err(&mut sink(&cfg(serde_json::json!({"optimizer": {"lr": 0.5}})), dir.path(), 7));
        assert!(e.contains("different training config") && e.contains("`optimizer`"), "{e}");
        let e = err(&mut sink(&c, dir.path(), 8));
        assert!(e.contains("seed 7") && e.contains("--seed 7"), "{e}");
        // device, log_every and checkpoint_every may change.
        let mut ok = sink(&cfg(serde_json::json!({"log_every": 5, "checkpoint_every": 2})), dir.path(), 7);
        ok.resume().unwrap();
        feed(ok.as_mut(), 1..3, 2);
        ok.finish().unwrap();
        let e = err(&mut sink(&c, dir.path(), 7));
        assert!(e.contains("already finished its 3 epochs") && e.contains("new run"), "{e}");

        std::fs::write(dir.path().join(FILE), b"not a checkpoint at all").unwrap();
        let e = err(&mut sink(&c, dir.path(), 7));
        assert!(e.contains("damaged") && e.contains(FILE), "{e}");
    }

    #[test]
    fn checkpoint_round_trip_restores_model_optimizer_and_counters() {
        for kind in ["lars", "adamw"] {
            let c = cfg(serde_json::json!({"optimizer": {"kind": kind, "lr": 0.1, "lr_scaling": "none"}}));
            let mut a = crate::make_engine(&c, 3).unwrap();
            let step = |e: &mut Box<dyn crate::Engine>, b: u64| {
                let Payload::Batch(x) = batch(0, b).payload else { unreachable!() };
                e.step(&x.views[0].data, &x.views[1].data, [4, 3, 8, 8], 0.1).unwrap().loss
            };
            step(&mut a, 0);
            step(&mut a, 1);
            let saved = a.state_tensors().unwrap();
            let momenta = saved.iter().filter(|t| t.name.starts_with("optim.encoder.")).count();
            assert!(momenta > 0, "{kind}: no optimizer state saved");
            let dir = tempfile::tempdir().unwrap();
            let meta = crate::checkpoint::CheckpointMeta {
                version: crate::checkpoint::VERSION,
                stage: "train".into(),
                seed: 3,
                config: crate::checkpoint::config_json(&c),
                epochs_done: 1,
                step: 2,
                steps_per_epoch: Some(2),
                finished: false,
                partial: Some(crate::checkpoint::PartialEpoch {
                    consumed: 8,
                    steps: 2,
                    loss: 0.1 + 0.2,
                    lr: 1.0 / 3.0,
                    ..Default::default()
                }),
                base_lr: Some(0.3 * 4.0 / 256.0),
            };
            Checkpoint { meta: meta.clone(), tensors: saved.clone() }.write(dir.path()).unwrap();
            let back = Checkpoint::read(dir.path()).unwrap();
            assert_eq!(back.meta, meta);
            let mut b = crate::make_engine(&c, 99).unwrap();
            b.load_state(&back.tensors).unwrap();
            assert_eq!(b.steps(), 2);
            let mut got = b.state_tensors().unwrap();
            let mut want = saved;
            got.sort_by(|x, y| x.name.cmp(&y.name));
            want.sort_by(|x, y| x.name.cmp(&y.name));
            assert_eq!(got.len(), want.len(), "{kind}: tensors after load");
            if let Some((g, _)) = got.iter().zip(&want).find(|(g, w)| g != w) {
                panic!("{kind}: {} differs after load", g.name);
            }
            assert_eq!(step(&mut a, 2).to_bits(), step(&mut b, 2).to_bits(), "{kind}: next step");

            // Another architecture does not load, and says which tensors disagree.
            let wide = cfg(serde_json::json!({"width": 0.25}));
            let e = crate::make_engine(&wide, 1).unwrap().load_state(&back.tensors).unwrap_err();
            assert!(e.contains("has shape"), "{e}");
        }
    }
}
