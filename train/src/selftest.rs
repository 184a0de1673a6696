//! `simclr selftest --device D`: a small SimCLR model trained a few steps on D and on the CPU
//! from the same weights and batches, compared tensor by tensor. It is how a user checks a new
//! GPU setup and how CI executes the GPU code path (wgpu on lavapipe).
//!
//! Each step starts both sides from identical weights (the CPU takes the device's state before
//! the step), so the figures measure one step's arithmetic: chained steps of a tiny random batch
//! are chaotic (1e-4 relative noise moves the third loss by 1-18%), which would hide a real bug
//! behind noise or flag noise as one.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use serde::Serialize;

use crate::config::SimclrTrain;
use crate::device::{with_backend, DeviceInfo, DeviceSpec, OnBackend};
use crate::export::{named_tensors, Data, NamedTensor};
use crate::loss::contrastive_loss;
use crate::trainer::{Engine, Trainer};

/// Agreement required with f32 arithmetic (wgpu; summation order only): relative, norm-wise,
/// per tensor. lavapipe measured 2e-3 at worst, on a BatchNorm bias whose gradient nearly
/// cancels (its norm is small, so rounding weighs more); the other tensors ~1e-5.
pub const TOLERANCE_F32: f64 = 1e-2;
/// Agreement required where f32 products run in TF32 (CUDA: 10-bit mantissas, ~1e-3 per product).
pub const TOLERANCE_TF32: f64 = 2e-2;

/// One step compared.
#[derive(Clone, Debug, Serialize)]
pub struct StepCheck {
    pub step: usize,
    pub loss_cpu: f64,
    pub loss_device: f64,
    /// |loss_device - loss_cpu| / |loss_cpu|.
    pub loss_rel_diff: f64,
    /// The projections z: ||z_device - z_cpu|| / ||z_cpu||.
    pub z_rel_diff: f64,
    /// The worst parameter gradient, norm-wise relative, and its name.
    pub grad_rel_diff: f64,
    pub grad_worst: String,
    /// The worst parameter or BatchNorm statistic after the update, and its name.
    pub weights_rel_diff: f64,
    pub weights_worst: String,
}

/// What `simclr selftest` prints.
#[derive(Clone, Debug, Serialize)]
pub struct SelftestReport {
    pub device: String,
    pub backend: String,
    pub device_name: String,
    pub detail: String,
    /// `f32` or `tf32` (the device's matrix-product precision, which sets the tolerance).
    pub precision: String,
    /// Matrix products 64x64x64 and 600x256x128 (M >= 512 catches a known class of wgpu kernel
    /// bugs), the worse one.
    pub matmul_rel_diff: f64,
    /// Whether the device's initial weights are bit-identical to the CPU's (same seed).
    pub initial_weights_equal: bool,
    pub steps: usize,
    pub per_step: Vec<StepCheck>,
    /// The largest of every relative difference above.
    pub max_rel_diff: f64,
    pub tolerance: f64,
    pub ok: bool,
    pub seconds: f64,
}

/// Runs the selftest on `device` (e.g. `wgpu`, `cuda:1`) for `steps` steps. `Err` when the
/// device cannot be used at all (no driver, no adapter, not built in); a disagreement is an
/// `Ok` report with `ok: false`.
pub fn selftest(device: &str, steps: usize) -> Result<SelftestReport, String> {
    let spec = DeviceSpec::parse(device)?;
    let start = Instant::now();
    let mut report = with_backend(spec, Check { steps: steps.max(1) })??;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// The model under test: small enough for a software GPU, with every layer kind of a ResNet
/// (stride-2 convolutions, downsampling shortcuts, BatchNorm, the nonlinear head with its BN).
fn model_config() -> Result<SimclrTrain, String> {
    let cfg = serde_json::json!({
        "width": 0.25, "head": {"hidden_dim": 16, "out_dim": 8},
        "optimizer": {"lr": 1.0, "lr_scaling": "none"}
    });
    serde_json::from_value(cfg).map_err(|e| format!("the selftest's model config: {e}"))
}

const SEED: u64 = 5;
const PAIRS: usize = 8;
const SIDE: usize = 16;
const LR: f64 = 0.01;

struct Check {
    steps: usize,
}

impl OnBackend for Check {
    type Output = Result<SelftestReport, String>;

    fn run<B: AutodiffBackend>(self, device: B::Device, info: &DeviceInfo) -> Self::Output {
        let tolerance = if info.tf32 { TOLERANCE_TF32 } else { TOLERANCE_F32 };
        tracing::info!("selftest on {} ({}): matrix products", info.spec, info.name);
        let matmul_rel_diff = [(64, 64, 64), (600, 256, 128)]
            .into_iter()
            .map(|(m, k, n)| matmul_diff::<B::InnerBackend>(m, k, n, &device))
            .fold(0.0, f64::max);

        let cfg = model_config()?;
        let mut cpu = Trainer::<Autodiff<Flex>>::new(&cfg, SEED, Default::default());
        let mut dev = Trainer::<B>::new(&cfg, SEED, device);
        let initial_weights_equal = state_diff(&cpu.state_tensors()?, &dev.state_tensors()?).0 == 0.0;

        let shape = [2 * PAIRS, 3, SIDE, SIDE];
        let mut per_step = Vec::new();
        for step in 0..self.steps {
            tracing::info!("selftest on {}: step {}/{}", info.spec, step + 1, self.steps);
            if step > 0 {
                cpu.load_state(&dev.state_tensors()?)?;
            }
            let batch = batch(step, shape.iter().product());
            let c = record(&mut cpu, &batch, shape)?;
            let d = record(&mut dev, &batch, shape)?;
            let (grad_rel_diff, grad_worst) = worst(&c.grads, &d.grads);
            let (weights_rel_diff, weights_worst) = worst(&c.after, &d.after);
            per_step.push(StepCheck {
                step,
                loss_cpu: c.loss,
                loss_device: d.loss,
                loss_rel_diff: (d.loss - c.loss).abs() / c.loss.abs().max(1e-12),
                z_rel_diff: rel(&c.z, &d.z),
                grad_rel_diff,
                grad_worst,
                weights_rel_diff,
                weights_worst,
            });
        }
        let max_rel_diff = per_step
            .iter()
            .flat_map(|s| [s.loss_rel_diff, s.z_rel_diff, s.grad_rel_diff, s.weights_rel_diff])
            .fold(matmul_rel_diff, f64::max);
        let ok = initial_weights_equal && max_rel_diff.is_finite() && max_rel_diff < tolerance;
        Ok(SelftestReport {
            device: info.spec.clone(),
            backend: info.backend.to_string(),
            device_name: info.name.clone(),
            detail: info.detail.clone(),
            precision: if info.tf32 { "tf32" } else { "f32" }.to_string(),
            matmul_rel_diff,
            initial_weights_equal,
            steps: self.steps,
            per_step,
            max_rel_diff,
            tolerance,
            ok,
            seconds: 0.0,
        })
    }
}

/// A deterministic batch in [0, 1) (no RNG: the same on every platform).
fn batch(step: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i as u64 * 2_654_435_761 + step as u64 * 97) % 1000) as f32 / 1000.0).collect()
}

fn matmul_diff<B: Backend>(m: usize, k: usize, n: usize, device: &B::Device) -> f64 {
    let values = |rows: usize, cols: usize, salt: usize| {
        let v: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 + salt) % 101) as f32 / 101.0 - 0.5).collect();
        TensorData::new(v, [rows, cols])
    };
    let (a, b) = (values(m, k, 0), values(k, n, 13));
    let on_device = Tensor::<B, 2>::from_data(a.clone(), device).matmul(Tensor::from_data(b.clone(), device));
    let on_cpu = Tensor::<Flex, 2>::from_data(a, &Default::default())
        .matmul(Tensor::from_data(b, &Default::default()));
    let d = on_device.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
    let c = on_cpu.into_data().to_vec::<f32>().unwrap_or_default();
    if d.len() != c.len() {
        return f64::INFINITY;
    }
    rel(&c, &d)
}

/// What one step computed.
struct Record {
    loss: f64,
    z: Vec<f32>,
    grads: BTreeMap<String, Vec<f32>>,
    after: BTreeMap<String, Vec<f32>>,
}

/// One training step done by hand (the trainer's step, keeping z and the gradients).
fn record<B: AutodiffBackend>(t: &mut Trainer<B>, v: &[f32], shape: [usize; 4]) -> Result<Record, String> {
    let x = Tensor::<B, 4>::from_data(TensorData::new(v.to_vec(), shape), &t.device);
    let model = t.model.take().ok_or("the model is missing")?;
    let (_, z) = model.forward(x);
    let zv = to_vec(z.clone().into_data())?;
    let out = contrastive_loss(z, &t.cfg.loss);
    let loss = f64::from(to_vec(out.loss.clone().into_data())?.first().copied().unwrap_or(f32::NAN));
    let grads = GradientsParams::from_grads(out.loss.backward(), &model);
    let mut named =
        NamedGrads::<B> { grads: &grads, path: Vec::new(), out: Ok(BTreeMap::new()), _b: PhantomData };
    model.visit(&mut named);
    let named = named.out;
    let model = t.opt.step(model, grads, LR);
    let after = named_tensors(&model.valid(), 0)
        .into_iter()
        .filter_map(|n| match n.data {
            Data::F32(v) => Some((n.name, v)),
            Data::I64(_) => None,
        })
        .collect();
    t.model = Some(model);
    Ok(Record { loss, z: zv, grads: named?, after })
}

fn to_vec(d: TensorData) -> Result<Vec<f32>, String> {
    d.convert::<f32>().to_vec::<f32>().map_err(|e| format!("reading a tensor back: {e:?}"))
}

/// Every parameter's gradient, by its dotted path.
struct NamedGrads<'a, B> {
    grads: &'a GradientsParams,
    path: Vec<String>,
    out: Result<BTreeMap<String, Vec<f32>>, String>,
    _b: PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for NamedGrads<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if let (Some(g), Ok(out)) = (self.grads.get::<B::InnerBackend, D>(p.id), &mut self.out) {
            match to_vec(g.into_data()) {
                Ok(v) => {
                    out.insert(self.path.join("."), v);
                }
                Err(e) => self.out = Err(e),
            }
        }
    }
}

/// Norm-wise relative difference ||a - b|| / ||a||.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>().sqrt();
    let n: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if d == 0.0 {
        0.0
    } else {
        d / n.max(1e-12)
    }
}

/// The worst tensor of two name -> values maps (a name missing on one side is infinitely off).
fn worst(cpu: &BTreeMap<String, Vec<f32>>, dev: &BTreeMap<String, Vec<f32>>) -> (f64, String) {
    let mut out = (0.0, String::new());
    for name in cpu.keys().chain(dev.keys()) {
        let d = match (cpu.get(name), dev.get(name)) {
            (Some(a), Some(b)) => rel(a, b),
            _ => f64::INFINITY,
        };
        if d > out.0 || (d.is_nan() && !out.0.is_nan()) {
            out = (d, name.clone());
        }
    }
    out
}

/// The worst difference between two full training states.
fn state_diff(a: &[NamedTensor], b: &[NamedTensor]) -> (f64, String) {
    let floats = |s: &[NamedTensor]| -> BTreeMap<String, Vec<f32>> {
        s.iter()
            .map(|t| {
                let v = match &t.data {
                    Data::F32(v) => v.clone(),
                    Data::I64(v) => v.iter().map(|x| *x as f32).collect(),
                };
                (t.name.clone(), v)
            })
            .collect()
    };
    worst(&floats(a), &floats(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_agrees_with_itself() {
        let r = selftest("cpu", 2).unwrap();
        assert!(r.ok && r.initial_weights_equal, "{r:?}");
        assert_eq!(r.max_rel_diff, 0.0, "{r:?}");
        assert_eq!(r.per_step.len(), 2);
        assert!(r.per_step.iter().all(|s| s.loss_cpu.is_finite() && s.loss_cpu > 0.0));
    }

    #[test]
    fn differences_are_measured_and_named() {
        assert_eq!(rel(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((rel(&[3.0, 4.0], &[3.0, 4.5]) - 0.1).abs() < 1e-12);
        let a = BTreeMap::from([("x".to_string(), vec![1.0]), ("y".to_string(), vec![1.0])]);
        let mut b = a.clone();
        b.insert("y".into(), vec![1.5]);
        assert_eq!(worst(&a, &b), (0.5, "y".to_string()));
        b.remove("x");
        assert_eq!(worst(&a, &b).1, "x");
        assert!(worst(&a, &b).0.is_infinite());
    }

    /// The comparison can fail: a step that differs slightly (here one input value on one
    /// side) is far outside the tolerance.
    #[test]
    fn a_different_step_is_caught() {
        let cfg = model_config().unwrap();
        let mut a = Trainer::<Autodiff<Flex>>::new(&cfg, SEED, Default::default());
        let mut b = Trainer::<Autodiff<Flex>>::new(&cfg, SEED, Default::default());
        let shape = [2 * PAIRS, 3, SIDE, SIDE];
        let v = batch(0, shape.iter().product());
        let ra = record(&mut a, &v, shape).unwrap();
        let mut v2 = v.clone();
        v2[0] += 0.5;
        let rb = record(&mut b, &v2, shape).unwrap();
        assert!(worst(&ra.grads, &rb.grads).0 > TOLERANCE_F32);
        assert_eq!(state_diff(&a.state_tensors().unwrap(), &a.state_tensors().unwrap()).0, 0.0);
    }
}
