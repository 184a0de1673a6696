//! LARS, SGD and AdamW over a burn module, and the warmup + cosine learning-rate schedule.
//!
//! The optimizer walks the module with a [`ModuleMapper`], so it knows each parameter's path:
//! a parameter named `bias`, or any parameter of a `BatchNorm`, is "excluded" (no weight decay,
//! LARS trust ratio 1) when `exclude_bias_and_bn` is on, as in the official code's
//! `exclude_from_weight_decay=['batch_normalization', 'bias']`.
//!
//! LARS (the official `lars_optimizer.py`, classic momentum):
//! `g += wd*w; trust = eta*|w|/|g|` (1 if either norm is 0); `v = m*v + lr*trust*g;`
//! `w -= v` (Nesterov: `w -= m*v + lr*trust*g`). Norms are per parameter tensor.
//! SGD is PyTorch's (`g += wd*w; v = m*v + g; w -= lr*v`, Nesterov `w -= lr*(g + m*v)`), AdamW is
//! PyTorch's (decoupled decay `w -= lr*wd*w`, bias-corrected moments).

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleMapper, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use crate::config::{LrScaling, OptimizerConfig, OptimizerKind};

/// The base learning rate for batches of `batch` pairs.
pub fn base_lr(cfg: &OptimizerConfig, batch: usize) -> f64 {
    match cfg.lr_scaling {
        LrScaling::Linear => cfg.lr * batch as f64 / 256.0,
        LrScaling::Sqrt => cfg.lr * (batch as f64).sqrt(),
        LrScaling::None => cfg.lr,
    }
}

/// Linear warmup from 0 for `warmup_steps`, then cosine decay to 0 at `total_steps`
/// (the official code: `step / warmup * base`, then `cosine_decay(base, step - warmup, total - warmup)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub base: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// `warmup_epochs` (already clamped to `epochs`) and `epochs` in units of `steps_per_epoch`.
    pub fn new(base: f64, warmup_epochs: f64, epochs: u32, steps_per_epoch: u64) -> Self {
        let total_steps = u64::from(epochs) * steps_per_epoch;
        let warmup_steps = ((warmup_epochs * steps_per_epoch as f64).round() as u64).min(total_steps);
        Self { base, warmup_steps, total_steps }
    }

    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base * step as f64 / self.warmup_steps as f64;
        }
        let decay = self.total_steps.saturating_sub(self.warmup_steps);
        if decay == 0 {
            return self.base;
        }
        let progress = ((step - self.warmup_steps) as f64 / decay as f64).min(1.0);
        self.base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// The learning rate while the first epoch's length is still unknown: the warmup ramp assuming
/// the epoch ends after this step, i.e. `base * s/(s+1) / warmup_epochs`, which approaches the
/// exact value at the end of the first epoch (`base / warmup_epochs`) from below.
pub fn first_epoch_lr(base: f64, warmup_epochs: f64, step: u64) -> f64 {
    if warmup_epochs <= 0.0 {
        return base;
    }
    let frac = step as f64 / (step + 1) as f64;
    (base * frac / warmup_epochs).min(base)
}

/// Optimizer state of one parameter, flattened to 1-D.
type State<B> = Vec<Tensor<B, 1>>;

/// LARS / SGD / AdamW with per-parameter state, on the inner (non-autodiff) backend.
pub struct Optimizer<B: Backend> {
    cfg: OptimizerConfig,
    state: HashMap<ParamId, State<B>>,
    steps: u64,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(cfg: &OptimizerConfig) -> Self {
        Self { cfg: cfg.clone(), state: HashMap::new(), steps: 0 }
    }

    /// The per-parameter state (momentum, Adam moments), for checkpoints.
    pub fn state(&self) -> &HashMap<ParamId, Vec<Tensor<B, 1>>> {
        &self.state
    }

    /// Updates done (AdamW's bias correction counts them).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Replaces the state and step count (a checkpoint being loaded).
    pub fn restore(&mut self, state: HashMap<ParamId, Vec<Tensor<B, 1>>>, steps: u64) {
        self.state = state;
        self.steps = steps;
    }

    /// Applies one update with learning rate `lr` to every parameter of `module` that has a gradient.
    pub fn step<AB, M>(&mut self, module: M, mut grads: GradientsParams, lr: f64) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        self.steps += 1;
        let mut mapper = StepMapper { opt: self, grads: &mut grads, lr, path: Vec::new() };
        module.map(&mut mapper)
    }

    /// The new value of one (flattened) parameter.
    pub fn update(
        &mut self,
        id: ParamId,
        w: Tensor<B, 1>,
        g: Tensor<B, 1>,
        excluded: bool,
        lr: f64,
    ) -> Tensor<B, 1> {
        let c = &self.cfg;
        let decay = if excluded && c.exclude_bias_and_bn { 0.0 } else { c.weight_decay };
        if crate::cpu::is_flex::<B>() {
            return self.update_fused(id, w, g, decay, excluded && c.exclude_bias_and_bn, lr);
        }
        let prev = self.state.remove(&id);
        let (new_w, state) = match c.kind {
            OptimizerKind::Lars => {
                let g = if decay > 0.0 { g + w.clone().mul_scalar(decay) } else { g };
                let scaled = if excluded && c.exclude_bias_and_bn {
                    g.mul_scalar(lr)
                } else {
                    let wn = w.clone().square().sum().sqrt();
                    let gn = g.clone().square().sum().sqrt();
                    let trust = (wn.clone().mul_scalar(c.eta) / gn.clone())
                        .mask_fill(wn.lower_equal_elem(0.0), 1.0)
                        .mask_fill(gn.lower_equal_elem(0.0), 1.0);
                    g * trust.mul_scalar(lr)
                };
                let v = match prev {
                    Some(mut s) => s.remove(0).mul_scalar(c.momentum) + scaled.clone(),
                    None => scaled.clone(),
                };
                let update = if c.nesterov { v.clone().mul_scalar(c.momentum) + scaled } else { v.clone() };
                (w - update, vec![v])
            }
            OptimizerKind::Sgd => {
                let g = if decay > 0.0 { g + w.clone().mul_scalar(decay) } else { g };
                let v = match prev {
                    Some(mut s) => s.remove(0).mul_scalar(c.momentum) + g.clone(),
                    None => g.clone(),
                };
                let dir = if c.nesterov { g + v.clone().mul_scalar(c.momentum) } else { v.clone() };
                (w - dir.mul_scalar(lr), vec![v])
            }
            OptimizerKind::Adamw => {
                let [b1, b2] = c.betas;
                let t = self.steps.max(1) as i32;
                let w = if decay > 0.0 { w.clone() - w.mul_scalar(lr * decay) } else { w };
                let (m, v) = match prev {
                    Some(mut s) => {
                        let v = s.remove(1);
                        (s.remove(0), v)
                    }
                    None => (g.zeros_like(), g.zeros_like()),
                };
                let m = m.mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
                let v = v.mul_scalar(b2) + g.square().mul_scalar(1.0 - b2);
                let mhat = m.clone().div_scalar(1.0 - b1.powi(t));
                let vhat = v.clone().div_scalar(1.0 - b2.powi(t));
                (w - (mhat / vhat.sqrt().add_scalar(c.eps)).mul_scalar(lr), vec![m, v])
            }
        };
        self.state.insert(id, state);
        new_w
    }
}

impl<B: Backend> Optimizer<B> {
    /// [`Optimizer::update`] on the CPU backend: one fused parallel pass
    /// ([`crate::cpu::optim`]).
    fn update_fused(
        &mut self,
        id: ParamId,
        w: Tensor<B, 1>,
        g: Tensor<B, 1>,
        decay: f64,
        excluded: bool,
        lr: f64,
    ) -> Tensor<B, 1> {
        let device = w.device();
        let read = |t: Tensor<B, 1>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap_or_default();
        let (mut wv, gv) = (read(w), read(g));
        let mut state: Vec<Vec<f32>> =
            self.state.remove(&id).unwrap_or_default().into_iter().map(read).collect();
        let step =
            crate::cpu::optim::Step { cfg: &self.cfg, lr, decay, excluded, t: self.steps.max(1) as i32 };
        crate::cpu::optim::update(&step, &mut wv, &gv, &mut state);
        let n = wv.len();
        let tensor = |v: Vec<f32>| Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(v, [n]), &device);
        self.state.insert(id, state.into_iter().map(tensor).collect());
        tensor(wv)
    }
}

struct StepMapper<'a, B: Backend> {
    opt: &'a mut Optimizer<B>,
    grads: &'a mut GradientsParams,
    lr: f64,
    /// (field name, type of the struct holding it) of every module entered.
    path: Vec<(String, String)>,
}

/// Whether the parameter at the end of `path` is a bias or belongs to a BatchNorm.
fn is_bias_or_bn(path: &[(String, String)]) -> bool {
    path.last().is_some_and(|(name, container)| name == "bias" || container == "Struct:BatchNorm")
}

impl<AB, B> ModuleMapper<AB> for StepMapper<'_, B>
where
    AB: AutodiffBackend<InnerBackend = B>,
    B: Backend,
{
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<B, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let dims = tensor.dims();
        let n = dims.iter().product::<usize>();
        let w = tensor.inner().reshape([n]);
        let new = self.opt.update(id, w, grad.reshape([n]), is_bias_or_bn(&self.path), self.lr);
        let tensor = Tensor::<AB, D>::from_inner(new.reshape(dims)).require_grad();
        Param::from_mapped_value(id, tensor, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::module::Module;
    use burn::tensor::TensorData;

    type AD = Autodiff<Flex>;

    #[derive(Module, Debug)]
    struct Tiny<B: Backend> {
        weight: Param<Tensor<B, 1>>,
        bias: Param<Tensor<B, 1>>,
    }

    fn t1(v: &[f32]) -> Tensor<AD, 1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
    }

    fn values(p: &Param<Tensor<AD, 1>>) -> Vec<f64> {
        p.val().into_data().to_vec::<f32>().unwrap().into_iter().map(f64::from).collect()
    }

    /// loss = a.w + c.b, so dL/dw = a and dL/db = c.
    fn step(opt: &mut Optimizer<Flex>, m: Tiny<AD>, a: &[f32], c: &[f32], lr: f64) -> Tiny<AD> {
        let loss = (m.weight.val() * t1(a)).sum() + (m.bias.val() * t1(c)).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        opt.step(m, grads, lr)
    }

    fn close(got: &[f64], want: &[f64], what: &str) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{what}: {got:?} vs {want:?}");
        }
    }

    #[test]
    fn lars_step_matches_the_hand_worked_example() {
        let cfg = OptimizerConfig { weight_decay: 0.1, ..OptimizerConfig::default() };
        assert_eq!((cfg.momentum, cfg.eta), (0.9, 0.001));
        let mut opt = Optimizer::<Flex>::new(&cfg);
        let m =
            Tiny { weight: Param::from_tensor(t1(&[3.0, 4.0])), bias: Param::from_tensor(t1(&[1.0, -1.0])) };
        let (a, c, lr) = ([0.6, 0.8], [0.5, 0.25], 0.1);
        let m = step(&mut opt, m, &a, &c, lr);
        // weight: g = a + 0.1*w = [0.9, 1.2], |g| = 1.5, |w| = 5, trust = 0.001*5/1.5;
        // v = 0.1 * trust * g = [0.0003, 0.0004].
        close(&values(&m.weight), &[2.9997, 3.9996], "weight after step 1");
        // bias: excluded, so no decay and trust 1: v = 0.1 * [0.5, 0.25].
        close(&values(&m.bias), &[0.95, -1.025], "bias after step 1");

        // Step 2: momentum carries v; recompute the formula in f64.
        let w1 = [2.9997f64, 3.9996];
        let g: Vec<f64> = a.iter().zip(&w1).map(|(&a, w)| f64::from(a) + 0.1 * w).collect();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let trust = 0.001 * norm(&w1) / norm(&g);
        let v: Vec<f64> = [0.0003, 0.0004].iter().zip(&g).map(|(v0, g)| 0.9 * v0 + lr * trust * g).collect();
        let want: Vec<f64> = w1.iter().zip(&v).map(|(w, v)| w - v).collect();
        let vb = [0.9 * 0.05 + lr * 0.5, 0.9 * 0.025 + lr * 0.25];
        let m = step(&mut opt, m, &a, &c, lr);
        close(&values(&m.weight), &want, "weight after step 2");
        close(&values(&m.bias), &[0.95 - vb[0], -1.025 - vb[1]], "bias after step 2");
    }

    #[test]
    fn lars_trust_ratio_is_one_for_zero_weights_and_exclusion_can_be_off() {
        let cfg =
            OptimizerConfig { weight_decay: 0.0, exclude_bias_and_bn: false, ..OptimizerConfig::default() };
        let mut opt = Optimizer::<Flex>::new(&cfg);
        let m =
            Tiny { weight: Param::from_tensor(t1(&[0.0, 0.0])), bias: Param::from_tensor(t1(&[3.0, 4.0])) };
        let m = step(&mut opt, m, &[1.0, 2.0], &[0.6, 0.8], 0.5);
        close(&values(&m.weight), &[-0.5, -1.0], "zero weight: trust 1");
        // bias not excluded now: trust = 0.001 * 5 / 1.
        close(&values(&m.bias), &[3.0 - 0.5 * 0.005 * 0.6, 4.0 - 0.5 * 0.005 * 0.8], "bias with trust ratio");
    }

    #[test]
    fn sgd_and_adamw_follow_pytorch() {
        let cfg = OptimizerConfig {
            kind: OptimizerKind::Sgd,
            weight_decay: 0.1,
            nesterov: true,
            ..OptimizerConfig::default()
        };
        let mut opt = Optimizer::<Flex>::new(&cfg);
        let m = Tiny { weight: Param::from_tensor(t1(&[1.0])), bias: Param::from_tensor(t1(&[1.0])) };
        let m = step(&mut opt, m, &[2.0], &[2.0], 0.1);
        // weight: g = 2 + 0.1 = 2.1, v = 2.1, nesterov dir = g + 0.9 v = 3.99.
        close(&values(&m.weight), &[1.0 - 0.1 * 3.99], "sgd weight");
        close(&values(&m.bias), &[1.0 - 0.1 * 3.8], "sgd bias (no decay)");

        let cfg =
            OptimizerConfig { kind: OptimizerKind::Adamw, weight_decay: 0.1, ..OptimizerConfig::default() };
        let mut opt = Optimizer::<Flex>::new(&cfg);
        let m = Tiny { weight: Param::from_tensor(t1(&[1.0])), bias: Param::from_tensor(t1(&[1.0])) };
        let m = step(&mut opt, m, &[2.0], &[2.0], 0.1);
        // First AdamW step: mhat/sqrt(vhat) = sign(g) = 1 (up to eps); decay first.
        close(&values(&m.weight), &[1.0 * (1.0 - 0.1 * 0.1) - 0.1], "adamw weight");
        close(&values(&m.bias), &[1.0 - 0.1], "adamw bias");
    }

    #[test]
    fn warmup_then_cosine_hits_exact_values() {
        let s = Schedule::new(1.2, 2.0, 10, 50); // warmup 100 steps, total 500
        assert_eq!((s.warmup_steps, s.total_steps), (100, 500));
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(50) - 0.6).abs() < 1e-12);
        assert!((s.lr(100) - 1.2).abs() < 1e-12, "end of warmup");
        assert!((s.lr(300) - 0.6).abs() < 1e-12, "middle of the cosine");
        assert!(s.lr(500).abs() < 1e-12, "end");
        assert!(s.lr(700).abs() < 1e-12, "past the end stays at 0");
        let no_warmup = Schedule::new(0.5, 0.0, 1, 10);
        assert_eq!(no_warmup.lr(0), 0.5);
        assert!(first_epoch_lr(1.0, 10.0, 0) == 0.0 && (first_epoch_lr(1.0, 10.0, 99) - 0.099).abs() < 1e-12);
        let c = OptimizerConfig::default();
        assert!((base_lr(&c, 512) - 0.6).abs() < 1e-12);
        let c = OptimizerConfig { lr: 0.075, lr_scaling: LrScaling::Sqrt, ..c };
        assert!((base_lr(&c, 256) - 1.2).abs() < 1e-12);
    }

    /// The fused CPU update gives the tensor-ops update (the GPU path) for every optimizer.
    #[test]
    fn fused_update_matches_tensor_ops() {
        let (a, c) = ([0.6f32, -0.8, 0.3, 1.5], [0.5f32, 0.25, -2.0, 0.1]);
        for cfg in [
            OptimizerConfig { weight_decay: 0.1, ..OptimizerConfig::default() },
            OptimizerConfig {
                weight_decay: 0.1,
                nesterov: true,
                exclude_bias_and_bn: false,
                ..OptimizerConfig::default()
            },
            OptimizerConfig {
                kind: OptimizerKind::Sgd,
                weight_decay: 0.01,
                nesterov: true,
                ..OptimizerConfig::default()
            },
            OptimizerConfig { kind: OptimizerKind::Adamw, weight_decay: 0.05, ..OptimizerConfig::default() },
        ] {
            let run = || {
                let mut opt = Optimizer::<Flex>::new(&cfg);
                let mut m = Tiny {
                    weight: Param::from_tensor(t1(&[3.0, 4.0, -1.0, 0.5])),
                    bias: Param::from_tensor(t1(&[1.0, -1.0, 0.0, 2.0])),
                };
                for _ in 0..3 {
                    m = step(&mut opt, m, &a, &c, 0.1);
                }
                (values(&m.weight), values(&m.bias))
            };
            let fused = run();
            let plain = crate::cpu::with_burn_ops(run);
            close(&fused.0, &plain.0, &format!("{:?} weight", cfg.kind));
            close(&fused.1, &plain.1, &format!("{:?} bias", cfg.kind));
        }
    }
}
