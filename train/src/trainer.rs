//! One SimCLR training step on a chosen backend, behind an object-safe [`Engine`] so the stage
//! picks CPU or CUDA at run time.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

use crate::config::{DeviceSpec, SimclrTrain};
use crate::export::{named_tensors, NamedTensor};
use crate::loss::{contrast_stats, contrastive_loss};
use crate::model::SimclrModel;
use crate::optim::Optimizer;

/// What one step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub contrast_acc: f64,
    pub contrast_entropy: f64,
}

/// Why a step failed.
#[derive(Debug, PartialEq)]
pub enum StepError {
    /// The loss was NaN or infinite; the weights were not updated.
    NonFinite(f64),
    /// Bad input or a backend failure.
    Other(String),
}

/// A model + optimizer on some device.
pub trait Engine: Send {
    /// One step on the two views (each N x 3 x H x W, row-major) with learning rate `lr`.
    fn step(
        &mut self,
        view1: &[f32],
        view2: &[f32],
        shape: [usize; 4],
        lr: f64,
    ) -> Result<StepStats, StepError>;
    /// The encoder's tensors under torchvision's names.
    fn encoder_tensors(&self) -> Vec<NamedTensor>;
    /// The representation h of `images` (N x 3 x H x W) in evaluation mode (running BatchNorm
    /// statistics), row-major N x dim.
    fn encode(&self, images: &[f32], shape: [usize; 4]) -> Result<Vec<f32>, String>;
    /// Steps done.
    fn steps(&self) -> u64;
    /// The device, in words.
    fn device_name(&self) -> String;
    /// The whole training state (model, BatchNorm statistics, optimizer state, step counts) as
    /// named tensors, for a checkpoint ([`crate::checkpoint`]).
    fn state_tensors(&self) -> Result<Vec<NamedTensor>, String>;
    /// Restores a state from [`Engine::state_tensors`]; every tensor must fit the model.
    fn load_state(&mut self, tensors: &[NamedTensor]) -> Result<(), String>;
}

/// The generic trainer behind [`Engine`].
pub struct Trainer<B: AutodiffBackend> {
    cfg: SimclrTrain,
    device: B::Device,
    model: Option<SimclrModel<B>>,
    opt: Optimizer<B::InnerBackend>,
    steps: u64,
}

impl<B: AutodiffBackend> Trainer<B> {
    pub fn new(cfg: &SimclrTrain, seed: u64, device: B::Device) -> Self {
        B::seed(&device, seed);
        let model = SimclrModel::new(cfg, seed, &device);
        Self { cfg: cfg.clone(), device, model: Some(model), opt: Optimizer::new(&cfg.optimizer), steps: 0 }
    }

    pub fn model(&self) -> &SimclrModel<B> {
        self.model.as_ref().expect("model present between steps")
    }

    fn step_inner(
        &mut self,
        view1: &[f32],
        view2: &[f32],
        shape: [usize; 4],
        lr: f64,
    ) -> Result<StepStats, StepError> {
        let [n, c, h, w] = shape;
        let per_view = n * c * h * w;
        if view1.len() != per_view || view2.len() != per_view {
            return Err(StepError::Other(format!(
                "view tensors hold {} and {} values, expected {per_view} for {n} x {c} x {h} x {w}",
                view1.len(),
                view2.len()
            )));
        }
        // Both views in one batch of 2N: BatchNorm sees both, as in the official code.
        let mut data = Vec::with_capacity(2 * per_view);
        data.extend_from_slice(view1);
        data.extend_from_slice(view2);
        let x = Tensor::<B, 4>::from_data(TensorData::new(data, [2 * n, c, h, w]), &self.device);
        let model = self.model.take().expect("model present between steps");
        let (_, z) = model.forward(x);
        let out = contrastive_loss(z, &self.cfg.loss);
        let loss = f64::from(out.loss.clone().into_data().convert::<f32>().to_vec::<f32>().expect("f32")[0]);
        if !loss.is_finite() {
            self.model = Some(model);
            return Err(StepError::NonFinite(loss));
        }
        let logits = out.logits.detach().into_data().convert::<f32>().to_vec::<f32>().expect("f32");
        let (contrast_acc, contrast_entropy) = contrast_stats(&logits, 2 * n);
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        self.model = Some(self.opt.step(model, grads, lr));
        self.steps += 1;
        Ok(StepStats { loss, contrast_acc, contrast_entropy })
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".to_string())
}

impl<B: AutodiffBackend> Engine for Trainer<B> {
    fn step(
        &mut self,
        view1: &[f32],
        view2: &[f32],
        shape: [usize; 4],
        lr: f64,
    ) -> Result<StepStats, StepError> {
        match catch_unwind(AssertUnwindSafe(|| self.step_inner(view1, view2, shape, lr))) {
            Ok(r) => r,
            Err(p) => Err(StepError::Other(format!(
                "the {} backend failed: {}",
                self.device_name(),
                panic_message(p)
            ))),
        }
    }

    fn encoder_tensors(&self) -> Vec<NamedTensor> {
        // `valid()` syncs the running statistics and drops autodiff.
        named_tensors(&self.model().encoder.valid(), self.steps)
    }

    fn encode(&self, images: &[f32], shape: [usize; 4]) -> Result<Vec<f32>, String> {
        if images.len() != shape.iter().product::<usize>() {
            return Err(format!("{} values for a {shape:?} batch", images.len()));
        }
        let run = || {
            let encoder = self.model().encoder.valid();
            let x = Tensor::<B::InnerBackend, 4>::from_data(
                TensorData::new(images.to_vec(), shape),
                &self.device,
            );
            encoder.forward(x).into_data().convert::<f32>().to_vec::<f32>().expect("f32")
        };
        catch_unwind(AssertUnwindSafe(run))
            .map_err(|p| format!("the {} backend failed: {}", self.device_name(), panic_message(p)))
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn device_name(&self) -> String {
        format!("{:?}", self.device)
    }

    fn state_tensors(&self) -> Result<Vec<NamedTensor>, String> {
        let run = || crate::checkpoint::state_tensors(self.model(), &self.opt, self.steps);
        catch_unwind(AssertUnwindSafe(run))
            .map_err(|p| format!("the {} backend failed: {}", self.device_name(), panic_message(p)))?
    }

    fn load_state(&mut self, tensors: &[NamedTensor]) -> Result<(), String> {
        let Some(model) = self.model.take() else { return Err("the model is missing".into()) };
        let backup = model.clone();
        let device = self.device.clone();
        let opt = &mut self.opt;
        let run = move || crate::checkpoint::load_state(model, opt, tensors, &device);
        match catch_unwind(AssertUnwindSafe(run)) {
            Ok(Ok((model, steps))) => {
                self.model = Some(model);
                self.steps = steps;
                Ok(())
            }
            Ok(Err(e)) => {
                self.model = Some(backup);
                Err(e)
            }
            Err(p) => {
                self.model = Some(backup);
                Err(format!("the {} backend failed: {}", self.device_name(), panic_message(p)))
            }
        }
    }
}

/// A trainer for `cfg.device`.
pub fn make_engine(cfg: &SimclrTrain, seed: u64) -> Result<Box<dyn Engine>, String> {
    match DeviceSpec::parse(&cfg.device)? {
        DeviceSpec::Cpu => {
            type B = burn::backend::Autodiff<burn::backend::Flex>;
            Ok(Box::new(Trainer::<B>::new(cfg, seed, Default::default())))
        }
        DeviceSpec::Cuda(index) => cuda_engine(cfg, seed, index),
    }
}

#[cfg(feature = "cuda")]
fn cuda_engine(cfg: &SimclrTrain, seed: u64, index: usize) -> Result<Box<dyn Engine>, String> {
    type B = burn::backend::Autodiff<burn::backend::Cuda>;
    let device = burn::backend::cuda::CudaDevice::new(index);
    catch_unwind(AssertUnwindSafe(|| Box::new(Trainer::<B>::new(cfg, seed, device)) as Box<dyn Engine>))
        .map_err(|p| format!("cannot use CUDA device {index}: {}", panic_message(p)))
}

#[cfg(not(feature = "cuda"))]
fn cuda_engine(_cfg: &SimclrTrain, _seed: u64, _index: usize) -> Result<Box<dyn Engine>, String> {
    Err(crate::config::no_cuda_message())
}

/// Metadata stored in `encoder.safetensors`.
pub fn checkpoint_metadata(cfg: &SimclrTrain, steps: u64, epochs_done: u32) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("format".into(), "pt".into()),
        ("arch".into(), cfg.backbone.name().into()),
        ("stem".into(), format!("{:?}", cfg.stem).to_lowercase()),
        ("width".into(), cfg.width.to_string()),
        ("steps".into(), steps.to_string()),
        ("epochs".into(), epochs_done.to_string()),
        ("producer".into(), format!("simclr-train {}", env!("CARGO_PKG_VERSION"))),
    ])
}

/// CUDA against the CPU, op by op: forward z, each parameter's gradient and value after one
/// update, for the fused (burn's default) and the unfused CUDA backend.
/// `CUBECL_AUTOTUNE_LEVEL=minimal cargo test --release --features cuda -p simclr-train -- --ignored --nocapture cuda_gradients`
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use std::collections::BTreeMap;
    use std::marker::PhantomData;

    use burn::backend::{Autodiff, Flex};
    use burn::module::{Module, ModuleVisitor, Param};

    use super::*;
    use crate::export::Data;

    type Plain = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

    struct NamedGrads<'a, B> {
        grads: &'a GradientsParams,
        path: Vec<String>,
        out: BTreeMap<String, Vec<f32>>,
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
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(p.id) {
                self.out.insert(self.path.join("."), g.into_data().convert::<f32>().to_vec::<f32>().unwrap());
            }
        }
    }

    struct Record {
        loss: f64,
        z: Vec<f32>,
        grads: BTreeMap<String, Vec<f32>>,
        after: BTreeMap<String, Vec<f32>>,
    }

    fn record<B: AutodiffBackend>(t: &mut Trainer<B>, v: &[f32], shape: [usize; 4], lr: f64) -> Record {
        let x = Tensor::<B, 4>::from_data(TensorData::new(v.to_vec(), shape), &t.device);
        let model = t.model.take().unwrap();
        let (_, z) = model.forward(x);
        let zv = z.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap();
        let out = contrastive_loss(z, &t.cfg.loss);
        let loss = f64::from(out.loss.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap()[0]);
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        let mut ng =
            NamedGrads::<B> { grads: &grads, path: Vec::new(), out: BTreeMap::new(), _b: PhantomData };
        model.visit(&mut ng);
        let named = ng.out;
        let model = t.opt.step(model, grads, lr);
        let after = named_tensors(&model.valid(), 0)
            .into_iter()
            .filter_map(|n| match n.data {
                Data::F32(v) => Some((n.name, v)),
                Data::I64(_) => None,
            })
            .collect();
        t.model = Some(model);
        Record { loss, z: zv, grads: named, after }
    }

    fn rel(a: &[f32], b: &[f32]) -> f64 {
        let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>().sqrt();
        let n: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        d / n.max(1e-12)
    }

    fn worst(what: &str, a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f64 {
        let mut d: Vec<(f64, &String)> =
            a.iter().map(|(k, v)| (b.get(k).map_or(f64::INFINITY, |w| rel(v, w)), k)).collect();
        d.sort_by(|x, y| y.0.total_cmp(&x.0));
        let shown: Vec<String> = d.iter().take(6).map(|(r, k)| format!("{k} {r:.1e}")).collect();
        println!("    {what}: {} tensors, worst: {}", a.len(), shown.join(", "));
        d.first().map_or(0.0, |x| x.0)
    }

    fn compare(name: &str, c: &Record, o: &Record) -> f64 {
        println!("  {name}: loss {:.6} vs cpu {:.6}, z rel diff {:.2e}", o.loss, c.loss, rel(&c.z, &o.z));
        let g = worst("grad rel diff", &c.grads, &o.grads);
        let a = worst("value after step rel diff", &c.after, &o.after);
        g.max(a)
    }

    #[test]
    #[ignore]
    fn cuda_gradients_match_cpu() {
        let d = burn::backend::cuda::CudaDevice::new(0);
        let a = Tensor::<Plain, 2>::from_data(
            TensorData::new(
                (0..64 * 64).map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5).collect::<Vec<f32>>(),
                [64, 64],
            ),
            &d,
        );
        let cpu_a = Tensor::<Flex, 2>::from_data(a.clone().into_data(), &Default::default());
        let mm = a.clone().matmul(a).into_data().to_vec::<f32>().unwrap();
        let cm = cpu_a.clone().matmul(cpu_a).into_data().to_vec::<f32>().unwrap();
        println!("64x64 matmul: cuda vs cpu rel diff {:.2e} (f32 ~1e-7, tf32 ~1e-3)", rel(&cm, &mm));

        let cfg: SimclrTrain = serde_json::from_value(serde_json::json!({
            "width": 0.25, "head": {"hidden_dim": 16, "out_dim": 8},
            "optimizer": {"lr": 1.0, "lr_scaling": "none"}
        }))
        .unwrap();
        let mut cpu = Trainer::<Autodiff<Flex>>::new(&cfg, 5, Default::default());
        let mut fused = Trainer::<Autodiff<burn::backend::Cuda>>::new(&cfg, 5, d.clone());
        let mut plain = Trainer::<Autodiff<Plain>>::new(&cfg, 5, d);
        let shape = [16, 3, 16, 16];
        let mut worst_all: f64 = 0.0;
        // Step 0 starts from identical weights: its gradients must agree up to TF32 rounding.
        // Step 1 (after updates that already differ slightly) is printed, not checked.
        for step in 0..2u32 {
            let v: Vec<f32> = (0..16 * 3 * 16 * 16)
                .map(|i| ((i as u32 * 2654435761 + step * 97) % 1000) as f32 / 1000.0)
                .collect();
            println!("step {step}");
            let c = record(&mut cpu, &v, shape, 0.01);
            let f = compare("cuda fused", &c, &record(&mut fused, &v, shape, 0.01));
            let p = compare("cuda unfused", &c, &record(&mut plain, &v, shape, 0.01));
            if step == 0 {
                worst_all = f.max(p);
            }
        }
        // TF32 matmuls: expect ~1e-3; a wrong kernel gives O(1).
        assert!(worst_all < 2e-2, "CUDA differs from the CPU by {worst_all:.2e} (relative)");
    }
}
