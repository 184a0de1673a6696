//! [`MultiEngine`]: the trainer on every device of this process, one thread and one rank each.
//!
//! The sink hands it the process's share of each global batch; it splits the share by rows
//! between its devices (device l gets rows `l*n/L..(l+1)*n/L` of both views) and runs one step
//! on each, in parallel; the ranks meet in the collective calls of the step.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use super::collective::CollectivePeer;
use super::{process_group, timeout, PeerHandle};
use crate::config::SimclrTrain;
use crate::device::DeviceSpec;
use crate::export::NamedTensor;
use crate::trainer::{make_engine_on, Engine, StepError, StepStats};

enum Cmd {
    Step { v1: Vec<f32>, v2: Vec<f32>, shape: [usize; 4], lr: f64 },
    EncoderTensors,
    Encode { images: Vec<f32>, shape: [usize; 4] },
    State,
    Load(Arc<Vec<NamedTensor>>),
    Steps,
    Leave,
}

enum Out {
    Step(Result<StepStats, StepError>),
    Tensors(Vec<NamedTensor>),
    Encoded(Result<Vec<f32>, String>),
    State(Result<Vec<NamedTensor>, String>),
    Loaded(Result<(), String>),
    Steps(u64),
    /// The thread's engine (and its peer) is gone.
    Gone,
}

struct Worker {
    tx: Sender<Cmd>,
    rx: Receiver<Out>,
}

/// Several ranks in this process (`devices:`), or this process's rank(s) of a process group.
pub struct MultiEngine {
    workers: Vec<Worker>,
    steps: u64,
    name: String,
}

impl MultiEngine {
    /// Starts one rank per local device and waits until the whole group has joined.
    pub fn start(cfg: &SimclrTrain, seed: u64) -> Result<Self, String> {
        let devices = cfg.local_devices();
        let locals = devices.len();
        let group = process_group();
        let world = locals * group.map_or(1, |g| g.world);
        if world > 1 && cfg.global_bn() {
            if let Some(d) = devices.iter().find(|d| DeviceSpec::parse(d).ok() != Some(DeviceSpec::Cpu)) {
                return Err(format!(
                    "`batch_norm: global` across devices runs on the CPU backend only in this version, and `{d}` is not the CPU; set `batch_norm: local` (each device's statistics)"
                ));
            }
        }
        let mut workers = Vec::with_capacity(locals);
        let mut ready = Vec::with_capacity(locals);
        for (l, device) in devices.iter().enumerate() {
            let (tx, cmd_rx) = channel::<Cmd>();
            let (out_tx, rx) = channel::<Out>();
            let (ready_tx, ready_rx) = channel::<Result<(), String>>();
            let (cfg, device, group) = (cfg.clone(), device.clone(), group.cloned());
            std::thread::Builder::new()
                .name(format!("simclr-rank-{l}"))
                .spawn(move || {
                    let engine = CollectivePeer::join(l, locals, group.as_ref(), timeout())
                        .map_err(|e| e.to_string())
                        .and_then(|p| check_group(&p, fingerprint(&cfg, seed, locals)).map(|()| p))
                        .and_then(|p| {
                            make_engine_on(&cfg, &device, seed, Some(PeerHandle::new(Arc::new(p))))
                        });
                    match engine {
                        Ok(engine) => {
                            if ready_tx.send(Ok(())).is_ok() {
                                serve(engine, &cmd_rx, &out_tx);
                            }
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|e| format!("cannot start a training thread: {e}"))?;
            workers.push(Worker { tx, rx });
            ready.push(ready_rx);
        }
        for r in ready {
            r.recv().map_err(|_| "a training thread stopped while starting".to_string())??;
        }
        let first = group.map_or(0, |g| g.rank * locals);
        let name = match locals {
            1 => format!("{} (rank {first} of {world})", devices.join(", ")),
            _ => format!("{} (ranks {first}-{} of {world})", devices.join(", "), first + locals - 1),
        };
        tracing::info!("data-parallel training: {name}");
        Ok(Self { workers, steps: 0, name })
    }

    fn ask_first(&self, cmd: Cmd) -> Option<Out> {
        let w = self.workers.first()?;
        w.tx.send(cmd).ok()?;
        w.rx.recv().ok()
    }
}

/// What must be the same on every rank: the training config (less the device names, which may
/// differ between machines), the seed and the devices per process.
fn fingerprint(cfg: &SimclrTrain, seed: u64, locals: usize) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut json = crate::checkpoint::config_json(cfg);
    if let Some(m) = json.as_object_mut() {
        for k in ["device", "devices", "log_every", "checkpoint_every", "checkpoint_every_steps"] {
            m.remove(k);
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    json.to_string().hash(&mut h);
    (seed, locals).hash(&mut h);
    h.finish()
}

/// Right after joining: every rank is there exactly once and trains the same thing. Two
/// processes started with the same `--rank`, or with another `--set`/`--seed`/device count,
/// would otherwise train silently wrong (rows counted twice, different initial weights).
fn check_group(p: &CollectivePeer, fingerprint: u64) -> Result<(), String> {
    use super::Peer;
    let (r, w) = (p.rank(), p.world());
    let mut buf = vec![0f64; 2 * w];
    buf[r] = 1.0;
    // 52 bits: exact in an f64.
    buf[w + r] = (fingerprint >> 12) as f64;
    p.all_reduce_sum_f64(&mut buf).map_err(|e| e.to_string())?;
    if let Some(k) = (0..w).find(|&k| buf[k] != 1.0) {
        return Err(format!(
            "rank {k} joined the group {} times: start each process with its own --rank (0 to world size - 1) and the same --world-size",
            buf[k]
        ));
    }
    if let Some(k) = (0..w).find(|&k| buf[w + k] != buf[w + r]) {
        return Err(format!(
            "rank {k} trains something else than rank {r} (another pipeline, --set, --seed or number of devices): start every rank with the same command, only --rank differing"
        ));
    }
    Ok(())
}

fn serve(mut engine: Box<dyn Engine>, cmds: &Receiver<Cmd>, out: &Sender<Out>) {
    while let Ok(cmd) = cmds.recv() {
        let reply = match cmd {
            Cmd::Step { v1, v2, shape, lr } => Out::Step(engine.step(&v1, &v2, shape, lr)),
            Cmd::EncoderTensors => Out::Tensors(engine.encoder_tensors()),
            Cmd::Encode { images, shape } => Out::Encoded(engine.encode(&images, shape)),
            Cmd::State => Out::State(engine.state_tensors()),
            Cmd::Load(t) => Out::Loaded(engine.load_state(&t)),
            Cmd::Steps => Out::Steps(engine.steps()),
            Cmd::Leave => {
                engine.leave_group();
                Out::Loaded(Ok(()))
            }
        };
        if out.send(reply).is_err() {
            break;
        }
    }
    drop(engine);
    let _ = out.send(Out::Gone);
}

impl Drop for MultiEngine {
    /// Waits (a little) for every rank to leave the group, so that a later training in this
    /// process can form a new one.
    fn drop(&mut self) {
        let rxs: Vec<Receiver<Out>> = self.workers.drain(..).map(|w| w.rx).collect();
        for rx in rxs {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                match rx.recv_timeout(left) {
                    Ok(Out::Gone) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }
}

const GONE: &str = "a training thread stopped";

impl Engine for MultiEngine {
    fn step(
        &mut self,
        view1: &[f32],
        view2: &[f32],
        shape: [usize; 4],
        lr: f64,
    ) -> Result<StepStats, StepError> {
        let locals = self.workers.len();
        let [n, c, h, w] = shape;
        if n % locals != 0 {
            return Err(StepError::Other(format!(
                "a batch of {n} pairs does not split evenly across {locals} devices: use a `batch_size` that the number of devices (times the world size) divides"
            )));
        }
        let part = n / locals;
        let per = part * c * h * w;
        if view1.len() != n * c * h * w || view2.len() != view1.len() {
            return Err(StepError::Other(format!("view tensors do not hold {n} x {c} x {h} x {w} values")));
        }
        for (l, wk) in self.workers.iter().enumerate() {
            let cmd = Cmd::Step {
                v1: view1[l * per..(l + 1) * per].to_vec(),
                v2: view2[l * per..(l + 1) * per].to_vec(),
                shape: [part, c, h, w],
                lr,
            };
            wk.tx.send(cmd).map_err(|_| StepError::Other(GONE.into()))?;
        }
        let mut first = None;
        for wk in &self.workers {
            let r = match wk.rx.recv() {
                Ok(Out::Step(r)) => r,
                _ => Err(StepError::Other(GONE.into())),
            };
            // The cause, not its echo: a rank's own failure before the others' timeouts.
            let timeout = |r: &Result<StepStats, StepError>| matches!(r, Err(StepError::Other(m)) if m.contains("got no answer"));
            first = match (first, r) {
                (None, r) => Some(r),
                (Some(Ok(_)), Err(e)) => Some(Err(e)),
                (Some(f), r @ Err(_)) if timeout(&f) && !timeout(&r) => Some(r),
                (f, _) => f,
            };
        }
        let r = first.unwrap_or_else(|| Err(StepError::Other(GONE.into())));
        if r.is_ok() {
            self.steps += 1;
        }
        r
    }

    fn encoder_tensors(&self) -> Vec<NamedTensor> {
        match self.ask_first(Cmd::EncoderTensors) {
            Some(Out::Tensors(t)) => t,
            _ => Vec::new(),
        }
    }

    fn encode(&self, images: &[f32], shape: [usize; 4]) -> Result<Vec<f32>, String> {
        match self.ask_first(Cmd::Encode { images: images.to_vec(), shape }) {
            Some(Out::Encoded(r)) => r,
            _ => Err(GONE.into()),
        }
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn device_name(&self) -> String {
        self.name.clone()
    }

    fn state_tensors(&self) -> Result<Vec<NamedTensor>, String> {
        match self.ask_first(Cmd::State) {
            Some(Out::State(r)) => r,
            _ => Err(GONE.into()),
        }
    }

    fn leave_group(&mut self) {
        for wk in &self.workers {
            let _ = wk.tx.send(Cmd::Leave);
        }
        for wk in &self.workers {
            let _ = wk.rx.recv();
        }
        // Only the first device encodes from here on.
        self.workers.truncate(1);
    }

    fn load_state(&mut self, tensors: &[NamedTensor]) -> Result<(), String> {
        let shared = Arc::new(tensors.to_vec());
        for wk in &self.workers {
            wk.tx.send(Cmd::Load(shared.clone())).map_err(|_| GONE.to_string())?;
        }
        // Every reply is read before any error is returned: the next command's answers stay in step.
        let replies: Vec<Result<(), String>> = self
            .workers
            .iter()
            .map(|wk| match wk.rx.recv() {
                Ok(Out::Loaded(r)) => r,
                _ => Err(GONE.into()),
            })
            .collect();
        replies.into_iter().collect::<Result<Vec<()>, String>>()?;
        if let Some(Out::Steps(s)) = self.ask_first(Cmd::Steps) {
            self.steps = s;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn cfg(devices: usize, bn: &str) -> SimclrTrain {
        let mut v = serde_json::json!({
            "width": 0.125, "epochs": 3, "warmup_epochs": 0,
            "head": {"hidden_dim": 16, "out_dim": 8},
            "optimizer": {"kind": "lars", "lr": 1.0, "lr_scaling": "none"},
            "batch_norm": bn,
        });
        if devices > 1 {
            v["devices"] = serde_json::json!(vec!["cpu"; devices]);
        }
        serde_json::from_value(v).unwrap()
    }

    fn batch(seed: u64, n: usize, side: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let len = n * 3 * side * side;
        let a: Vec<f32> = (0..len).map(|_| rng.random::<f32>()).collect();
        let b: Vec<f32> = a.iter().map(|x| (x + 0.2 * rng.random::<f32>()).min(1.0)).collect();
        (a, b)
    }

    fn losses(engine: &mut dyn Engine) -> Vec<f64> {
        (0..4)
            .map(|s| {
                let (a, b) = batch(s, 8, 16);
                engine.step(&a, &b, [8, 3, 16, 16], 0.5).unwrap().loss
            })
            .collect()
    }

    fn close(a: &[f64], b: &[f64], rel: f64) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() <= rel * x.abs().max(y.abs()))
    }

    #[test]
    fn two_devices_train_as_one_with_the_whole_batch_and_local_bn_does_not() {
        let _turn = crate::dist::TEST_ENGINE.lock().unwrap_or_else(|p| p.into_inner());
        crate::dist::set_timeout(std::time::Duration::from_secs(60));
        let one = losses(crate::make_engine(&cfg(1, "global"), 7).unwrap().as_mut());
        let mut two_engine = crate::make_engine(&cfg(2, "global"), 7).unwrap();
        let two = losses(two_engine.as_mut());
        assert_eq!(two_engine.steps(), 4);
        assert!(close(&one, &two, 1e-4), "one device {one:?} vs two {two:?}");
        let one_enc = crate::make_engine(&cfg(1, "global"), 7).unwrap().encoder_tensors().len();
        assert_eq!(two_engine.encoder_tensors().len(), one_enc);
        drop(two_engine);
        let local = losses(crate::make_engine(&cfg(2, "local"), 7).unwrap().as_mut());
        // The first step's loss differs already: each device normalizes by its own statistics.
        assert!(!close(&one[..1], &local[..1], 1e-3), "local BN {local:?} vs global {one:?}");
    }

    #[test]
    fn an_uneven_split_is_an_error_naming_the_fix() {
        let _turn = crate::dist::TEST_ENGINE.lock().unwrap_or_else(|p| p.into_inner());
        crate::dist::set_timeout(std::time::Duration::from_secs(60));
        let mut e = crate::make_engine(&cfg(2, "global"), 1).unwrap();
        let (a, b) = batch(0, 3, 8);
        let Err(StepError::Other(msg)) = e.step(&a, &b, [3, 3, 8, 8], 0.1) else { panic!("accepted") };
        assert!(msg.contains("batch_size"), "{msg}");
    }

    #[test]
    fn three_devices_sum_in_a_fixed_order_and_a_finished_group_makes_room_for_the_next() {
        let _turn = crate::dist::TEST_ENGINE.lock().unwrap_or_else(|p| p.into_inner());
        crate::dist::set_timeout(std::time::Duration::from_secs(60));
        let run = || {
            let mut e = crate::make_engine(&cfg(3, "global"), 5).unwrap();
            let l: Vec<f64> = (0..3)
                .map(|s| {
                    let (a, b) = batch(s, 6, 8);
                    e.step(&a, &b, [6, 3, 8, 8], 0.5).unwrap().loss
                })
                .collect();
            (l, e)
        };
        let (first, mut done) = run();
        // Training over: the group is left, the engine still encodes on its first device...
        done.leave_group();
        let (x, _) = batch(9, 2, 8);
        let h = done.encode(&x, [2, 3, 8, 8]).unwrap();
        assert!(!h.is_empty() && h.len() % 2 == 0, "{} values", h.len());
        // ...and a new group forms while it lives; three peers add in rank order: same bits.
        let (second, _) = run();
        assert_eq!(first, second);
    }
}
