//! One SimCLR training step on a chosen backend, behind an object-safe [`Engine`] so the stage
//! picks CPU or CUDA at run time.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

use crate::config::SimclrTrain;
use crate::device::{panic_message, with_backend, DeviceInfo, DeviceSpec, OnBackend};
use crate::dist::gather::{all_reduce_grads, gather_views};
use crate::dist::PeerHandle;
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
    /// Leaves the data-parallel group, if any (after training: the engine then only encodes).
    fn leave_group(&mut self) {}
}

/// The generic trainer behind [`Engine`].
pub struct Trainer<B: AutodiffBackend> {
    pub(crate) cfg: SimclrTrain,
    pub(crate) device: B::Device,
    pub(crate) model: Option<SimclrModel<B>>,
    pub(crate) opt: Optimizer<B::InnerBackend>,
    steps: u64,
    /// The other ranks of a data-parallel run (none: alone).
    peer: Option<PeerHandle>,
}

impl<B: AutodiffBackend> Trainer<B> {
    pub fn new(cfg: &SimclrTrain, seed: u64, device: B::Device) -> Self {
        B::seed(&device, seed);
        let model = SimclrModel::new(cfg, seed, &device);
        Self {
            cfg: cfg.clone(),
            device,
            model: Some(model),
            opt: Optimizer::new(&cfg.optimizer),
            steps: 0,
            peer: None,
        }
    }

    /// One rank of a data-parallel run: each step trains on this rank's share of the global
    /// batch with the others' projections as negatives and sums the gradients.
    pub fn with_peer(mut self, peer: PeerHandle) -> Self {
        self.peer = Some(peer).filter(|p| p.world() > 1);
        self
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
        let peer = self.peer.clone();
        let bn_peer = peer.clone().filter(|_| self.cfg.global_bn());
        let (_, z) = crate::cpu::batchnorm::with_global_stats(bn_peer, || model.forward(x));
        let fail = |this: &mut Self, model, e: crate::dist::PeerError| {
            this.model = Some(model);
            Err(StepError::Other(e.to_string()))
        };
        let (z, world) = match &peer {
            Some(p) => {
                if let Some(e) = p.take_error() {
                    return fail(self, model, e);
                }
                match gather_views(z, p) {
                    Ok(z) => (z, p.world()),
                    Err(e) => return fail(self, model, e),
                }
            }
            None => (z, 1),
        };
        let out = contrastive_loss(z, &self.cfg.loss);
        let loss = f64::from(out.loss.clone().into_data().convert::<f32>().to_vec::<f32>().expect("f32")[0]);
        // Every rank computed the same loss from the same gathered projections: they all stop
        // here together.
        if !loss.is_finite() {
            self.model = Some(model);
            return Err(StepError::NonFinite(loss));
        }
        let logits = out.logits.detach().into_data().convert::<f32>().to_vec::<f32>().expect("f32");
        let (contrast_acc, contrast_entropy) = contrast_stats(&logits, 2 * n * world);
        let mut grads = GradientsParams::from_grads(out.loss.backward(), &model);
        if let Some(p) = &peer {
            if let Some(e) = p.take_error() {
                return fail(self, model, e);
            }
            if let Err(e) = all_reduce_grads(&model, &mut grads, p, &self.device) {
                return fail(self, model, e);
            }
        }
        self.model = Some(self.opt.step(model, grads, lr));
        self.steps += 1;
        Ok(StepStats { loss, contrast_acc, contrast_entropy })
    }
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

    fn leave_group(&mut self) {
        self.peer = None;
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

/// A trainer for `cfg.device`, or for `cfg.devices` / a process group (data parallel:
/// [`crate::dist::engine::MultiEngine`]).
pub fn make_engine(cfg: &SimclrTrain, seed: u64) -> Result<Box<dyn Engine>, String> {
    if cfg.local_devices().len() > 1 || crate::dist::process_group().is_some() {
        return crate::dist::engine::MultiEngine::start(cfg, seed).map(|e| Box::new(e) as Box<dyn Engine>);
    }
    let device = cfg.local_devices().swap_remove(0);
    make_engine_on(cfg, &device, seed, None)
}

/// A trainer on `device`, one rank of a data-parallel run when `peer` is given.
pub(crate) fn make_engine_on(
    cfg: &SimclrTrain,
    device: &str,
    seed: u64,
    peer: Option<PeerHandle>,
) -> Result<Box<dyn Engine>, String> {
    struct Make<'a>(&'a SimclrTrain, u64, Option<PeerHandle>);
    impl OnBackend for Make<'_> {
        type Output = Box<dyn Engine>;
        fn run<B: AutodiffBackend>(self, device: B::Device, _: &DeviceInfo) -> Box<dyn Engine> {
            let t = Trainer::<B>::new(self.0, self.1, device);
            Box::new(match self.2 {
                Some(p) => t.with_peer(p),
                None => t,
            })
        }
    }
    with_backend(DeviceSpec::parse(device)?, Make(cfg, seed, peer))
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
