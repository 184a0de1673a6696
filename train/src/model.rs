//! The encoder f (ResNet-18/34/50, CIFAR or ImageNet stem, width multiplier) and the projection
//! head g, generic over burn's `Backend`.
//!
//! Field names follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`, `downsample.0/1`, BatchNorm
//! `weight`/`bias`/`running_mean`/`running_var`), so a module path is the checkpoint name.
//! Weights are initialized from our own seeded generator (torchvision's scheme), never from the
//! backend's global RNG: the same seed gives the same network on every backend.

use burn::module::{Module, Param, RunningState};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::module::max_pool2d;
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::config::{Backbone, HeadConfig, HeadKind, SimclrTrain, Stem};
use crate::cpu::batchnorm::BnInputs;

/// BatchNorm momentum of the running statistics (PyTorch's 0.1 = TF's decay 0.9) and epsilon.
pub const BN_MOMENTUM: f64 = 0.1;
pub const BN_EPS: f64 = 1e-5;

/// The seeded source of initial weights.
pub struct Init {
    rng: ChaCha8Rng,
}

impl Init {
    pub fn new(seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_1417_7A17_0001) }
    }

    fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let x: f64 = StandardNormal.sample(&mut self.rng);
                (x * std) as f32
            })
            .collect()
    }

    fn uniform(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n).map(|_| self.rng.random_range(-bound..bound) as f32).collect()
    }
}

fn param<B: Backend, const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(data, shape), device))
}

/// A convolution without bias (every ResNet conv is followed by BatchNorm).
#[derive(Module, Debug)]
pub struct Conv<B: Backend> {
    pub weight: Param<Tensor<B, 4>>,
    pub stride: usize,
    pub padding: usize,
}

impl<B: Backend> Conv<B> {
    /// Kaiming normal, fan-out, ReLU gain (torchvision's ResNet init).
    pub fn new(
        init: &mut Init,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        device: &B::Device,
    ) -> Self {
        let std = (2.0 / (cout * k * k) as f64).sqrt();
        let weight = param(init.normal(cout * cin * k * k, std), [cout, cin, k, k], device);
        Self { weight, stride, padding: k / 2 }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        crate::cpu::conv::conv2d(x, self.weight.val(), self.stride, self.padding)
    }
}

/// BatchNorm over dimension 1 of a 2-D or 4-D input. In training (an autodiff backend) it
/// normalizes with the batch statistics and updates the running ones; otherwise it uses the
/// running statistics. `bias` is absent where the official code has `center=False`.
#[derive(Module, Debug)]
pub struct BatchNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub running_mean: RunningState<Tensor<B, 1>>,
    pub running_var: RunningState<Tensor<B, 1>>,
}

impl<B: Backend> BatchNorm<B> {
    pub fn new(channels: usize, bias: bool, device: &B::Device) -> Self {
        Self {
            weight: param(vec![1.0; channels], [channels], device),
            bias: bias.then(|| param(vec![0.0; channels], [channels], device)),
            running_mean: RunningState::new(Tensor::zeros([channels], device)),
            running_var: RunningState::new(Tensor::ones([channels], device)),
        }
    }

    /// Normalizes `x` (2-D or 4-D, channels in dimension 1).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.forward_act(x, None, false)
    }

    /// `relu?(bn(x) + residual?)`: on the CPU backend one fused op ([`crate::cpu::batchnorm`]),
    /// elsewhere burn's tensor ops.
    pub fn forward_act<const D: usize>(
        &self,
        x: Tensor<B, D>,
        residual: Option<Tensor<B, D>>,
        relu_after: bool,
    ) -> Tensor<B, D> {
        let dims = x.dims();
        let count = (dims[0] * dims[2..].iter().product::<usize>()) as f64;
        let training = B::ad_enabled(&x.device());
        let inputs = BnInputs {
            x,
            gamma: self.weight.val(),
            beta: self.bias.as_ref().map(|b| b.val()),
            residual,
            relu: relu_after,
        };
        let inputs = if !crate::cpu::is_flex::<B>() {
            inputs
        } else if training {
            match crate::cpu::batchnorm::train(inputs, BN_EPS) {
                Ok(out) => {
                    let device = out.y.device();
                    let c = out.mean.len();
                    let mean = Tensor::<B, 1>::from_data(TensorData::new(out.mean, [c]), &device);
                    let var = Tensor::<B, 1>::from_data(TensorData::new(out.var, [c]), &device);
                    self.update_running(mean, var, out.count);
                    return out.y;
                }
                Err(i) => i,
            }
        } else {
            let read = |t: Tensor<B, 1>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap_or_default();
            let (rm, rv) = (read(self.running_mean.value_sync()), read(self.running_var.value_sync()));
            match crate::cpu::batchnorm::eval(inputs, &rm, &rv, BN_EPS) {
                Ok(y) => return y,
                Err(i) => i,
            }
        };
        let mut y = self.forward_tensor_ops(inputs.x, training, count);
        if let Some(r) = inputs.residual {
            y = y + r;
        }
        if relu_after {
            y = relu(y);
        }
        y
    }

    /// Running statistics: `(1 - momentum) old + momentum batch` (the variance unbiased).
    fn update_running(&self, mean: Tensor<B, 1>, var: Tensor<B, 1>, count: f64) {
        let unbiased = count / (count - 1.0).max(1.0);
        let rm = self.running_mean.value_sync();
        let rv = self.running_var.value_sync();
        let m = BN_MOMENTUM;
        self.running_mean.update(rm.mul_scalar(1.0 - m).add(mean.detach().mul_scalar(m)).detach());
        self.running_var.update(rv.mul_scalar(1.0 - m).add(var.detach().mul_scalar(m * unbiased)).detach());
    }

    /// BatchNorm with burn's tensor ops (GPU backends).
    ///
    /// The input is viewed as N x C x (H*W), and per-channel vectors are repeated to N x C x 1
    /// before they touch the big tensor, so every full-size op is a contiguous or per-row
    /// broadcast.
    pub(crate) fn forward_tensor_ops<const D: usize>(
        &self,
        x: Tensor<B, D>,
        training: bool,
        count: f64,
    ) -> Tensor<B, D> {
        let dims = x.dims();
        let (n, c) = (dims[0], dims[1]);
        let rest = dims[2..].iter().product::<usize>();
        let x3: Tensor<B, 3> = x.reshape([n, c, rest]);
        let per_row = |v: Tensor<B, 1>| v.reshape([1, c, 1]).repeat_dim(0, n);
        let y = if training {
            let mean = x3.clone().sum_dim(2).sum_dim(0).div_scalar(count).reshape([c]);
            let xc = x3 - per_row(mean.clone());
            let var = xc.clone().square().sum_dim(2).sum_dim(0).div_scalar(count).reshape([c]);
            self.update_running(mean, var.clone(), count);
            let y = xc * per_row(self.weight.val() / var.add_scalar(BN_EPS).sqrt());
            match &self.bias {
                Some(b) => y + per_row(b.val()),
                None => y,
            }
        } else {
            let rm = self.running_mean.value_sync();
            let rv = self.running_var.value_sync();
            let scale = self.weight.val() / rv.add_scalar(BN_EPS).sqrt();
            let mut shift = rm.neg() * scale.clone();
            if let Some(b) = &self.bias {
                shift = shift + b.val();
            }
            x3 * per_row(scale) + per_row(shift)
        };
        y.reshape(dims)
    }
}

/// A residual block: BasicBlock (two 3x3 convs) or Bottleneck (1x1, 3x3 with the stride, 1x1 x4,
/// torchvision's "ResNet v1.5").
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub conv1: Conv<B>,
    pub bn1: BatchNorm<B>,
    pub conv2: Conv<B>,
    pub bn2: BatchNorm<B>,
    pub conv3: Option<Conv<B>>,
    pub bn3: Option<BatchNorm<B>>,
    pub downsample: Option<(Conv<B>, BatchNorm<B>)>,
}

impl<B: Backend> Block<B> {
    fn basic(init: &mut Init, cin: usize, planes: usize, stride: usize, device: &B::Device) -> Self {
        let downsample = (stride != 1 || cin != planes)
            .then(|| (Conv::new(init, cin, planes, 1, stride, device), BatchNorm::new(planes, true, device)));
        Self {
            conv1: Conv::new(init, cin, planes, 3, stride, device),
            bn1: BatchNorm::new(planes, true, device),
            conv2: Conv::new(init, planes, planes, 3, 1, device),
            bn2: BatchNorm::new(planes, true, device),
            conv3: None,
            bn3: None,
            downsample,
        }
    }

    fn bottleneck(init: &mut Init, cin: usize, planes: usize, stride: usize, device: &B::Device) -> Self {
        let out = planes * 4;
        let downsample = (stride != 1 || cin != out)
            .then(|| (Conv::new(init, cin, out, 1, stride, device), BatchNorm::new(out, true, device)));
        Self {
            conv1: Conv::new(init, cin, planes, 1, 1, device),
            bn1: BatchNorm::new(planes, true, device),
            conv2: Conv::new(init, planes, planes, 3, stride, device),
            bn2: BatchNorm::new(planes, true, device),
            conv3: Some(Conv::new(init, planes, out, 1, 1, device)),
            bn3: Some(BatchNorm::new(out, true, device)),
            downsample,
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let identity = match &self.downsample {
            Some((conv, bn)) => bn.forward(conv.forward(x.clone())),
            None => x.clone(),
        };
        let out = self.bn1.forward_act(self.conv1.forward(x), None, true);
        match (&self.conv3, &self.bn3) {
            (Some(conv3), Some(bn3)) => {
                let out = self.bn2.forward_act(self.conv2.forward(out), None, true);
                bn3.forward_act(conv3.forward(out), Some(identity), true)
            }
            _ => self.bn2.forward_act(self.conv2.forward(out), Some(identity), true),
        }
    }
}

/// The encoder f; `forward` returns h, the global average pool of the last stage.
#[derive(Module, Debug)]
pub struct ResNet<B: Backend> {
    pub conv1: Conv<B>,
    pub bn1: BatchNorm<B>,
    pub layer1: Vec<Block<B>>,
    pub layer2: Vec<Block<B>>,
    pub layer3: Vec<Block<B>>,
    pub layer4: Vec<Block<B>>,
    pub maxpool: bool,
    pub out_dim: usize,
}

impl<B: Backend> ResNet<B> {
    pub fn new(cfg: &SimclrTrain, init: &mut Init, device: &B::Device) -> Self {
        let (counts, bottleneck) = match cfg.backbone {
            Backbone::Resnet18 => ([2, 2, 2, 2], false),
            Backbone::Resnet34 => ([3, 4, 6, 3], false),
            Backbone::Resnet50 => ([3, 4, 6, 3], true),
        };
        let stem = cfg.scaled(64);
        let (conv1, maxpool) = match cfg.stem {
            Stem::Cifar => (Conv::new(init, 3, stem, 3, 1, device), false),
            Stem::Imagenet => (Conv::new(init, 3, stem, 7, 2, device), true),
        };
        let bn1 = BatchNorm::new(stem, true, device);
        let mut cin = stem;
        let mut layers: Vec<Vec<Block<B>>> = Vec::new();
        for (i, &n) in counts.iter().enumerate() {
            let planes = cfg.scaled(64 << i);
            let mut blocks = Vec::new();
            for b in 0..n {
                let stride = if i > 0 && b == 0 { 2 } else { 1 };
                let block = if bottleneck {
                    Block::bottleneck(init, cin, planes, stride, device)
                } else {
                    Block::basic(init, cin, planes, stride, device)
                };
                cin = if bottleneck { planes * 4 } else { planes };
                blocks.push(block);
            }
            layers.push(blocks);
        }
        let mut it = layers.into_iter();
        let mut next = || it.next().unwrap_or_default();
        Self {
            conv1,
            bn1,
            layer1: next(),
            layer2: next(),
            layer3: next(),
            layer4: next(),
            maxpool,
            out_dim: cin,
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut x = self.bn1.forward_act(self.conv1.forward(x), None, true);
        if self.maxpool {
            x = max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for block in self.layer1.iter().chain(&self.layer2).chain(&self.layer3).chain(&self.layer4) {
            x = block.forward(x);
        }
        let [n, c, _, _] = x.dims();
        x.mean_dim(3).mean_dim(2).reshape([n, c])
    }
}

/// A dense layer, weight stored as PyTorch does ([out, in]).
#[derive(Module, Debug)]
pub struct Dense<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Dense<B> {
    /// PyTorch's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    fn new(init: &mut Init, din: usize, dout: usize, bias: bool, device: &B::Device) -> Self {
        let bound = 1.0 / (din as f64).sqrt();
        let weight = param(init.uniform(dout * din, bound), [dout, din], device);
        let bias = bias.then(|| param(init.uniform(dout, bound), [dout], device));
        Self { weight, bias }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = x.matmul(self.weight.val().transpose());
        match &self.bias {
            Some(b) => y + b.val().unsqueeze::<2>(),
            None => y,
        }
    }
}

/// One layer of the head: dense, optional BatchNorm, optional ReLU.
#[derive(Module, Debug)]
pub struct HeadLayer<B: Backend> {
    pub linear: Dense<B>,
    pub bn: Option<BatchNorm<B>>,
    pub relu: bool,
}

/// The projection head g (the official `projection_head`): middle layers are dense (no bias
/// with BN) -> BN (with beta) -> ReLU; the last is dense -> BN without beta.
#[derive(Module, Debug)]
pub struct Head<B: Backend> {
    pub layers: Vec<HeadLayer<B>>,
}

impl<B: Backend> Head<B> {
    pub fn new(cfg: &HeadConfig, din: usize, init: &mut Init, device: &B::Device) -> Self {
        let n = match cfg.kind {
            HeadKind::None => 0,
            HeadKind::Linear => 1,
            HeadKind::Nonlinear => cfg.layers,
        };
        let hidden = cfg.hidden_dim.unwrap_or(din);
        let mut layers = Vec::new();
        let mut cin = din;
        for j in 0..n {
            let last = j + 1 == n;
            let dout = if last { cfg.out_dim } else { hidden };
            layers.push(HeadLayer {
                linear: Dense::new(init, cin, dout, !cfg.bn, device),
                bn: cfg.bn.then(|| BatchNorm::new(dout, !last, device)),
                relu: !last,
            });
            cin = dout;
        }
        Self { layers }
    }

    pub fn forward(&self, mut x: Tensor<B, 2>) -> Tensor<B, 2> {
        for l in &self.layers {
            x = l.linear.forward(x);
            x = match &l.bn {
                Some(bn) => bn.forward_act(x, None, l.relu),
                None if l.relu => relu(x),
                None => x,
            };
        }
        x
    }
}

/// Floating-point operations (multiply and add counted apart) of one training step on `n`
/// images of `h` x `w`: the convolutions and dense layers forward, and twice that backward
/// (input and weight gradients) but the first convolution's input gradient, which is never
/// computed. The count PyTorch's `FlopCounterMode` gives (the anchor's `flops_per_step`).
pub fn step_flops(cfg: &SimclrTrain, n: usize, h: usize, w: usize) -> f64 {
    // (forward FLOPs, FLOPs of the stem's input gradient)
    let conv = |ci: usize, co: usize, k: usize, s: usize, (h, w): (usize, usize)| {
        let (ho, wo) = ((h + 2 * (k / 2) - k) / s + 1, (w + 2 * (k / 2) - k) / s + 1);
        (2.0 * (n * co * ci * k * k * ho * wo) as f64, (ho, wo))
    };
    let (counts, bottleneck) = match cfg.backbone {
        Backbone::Resnet18 => ([2, 2, 2, 2], false),
        Backbone::Resnet34 => ([3, 4, 6, 3], false),
        Backbone::Resnet50 => ([3, 4, 6, 3], true),
    };
    let stem = cfg.scaled(64);
    let (stem_flops, mut hw) = match cfg.stem {
        Stem::Cifar => conv(3, stem, 3, 1, (h, w)),
        Stem::Imagenet => {
            let (f, (ho, wo)) = conv(3, stem, 7, 2, (h, w));
            (f, ((ho - 1) / 2 + 1, (wo - 1) / 2 + 1))
        }
    };
    let mut fwd = stem_flops;
    let mut cin = stem;
    for (i, &blocks) in counts.iter().enumerate() {
        let planes = cfg.scaled(64 << i);
        for b in 0..blocks {
            let s = if i > 0 && b == 0 { 2 } else { 1 };
            let out = if bottleneck { planes * 4 } else { planes };
            if s != 1 || cin != out {
                fwd += conv(cin, out, 1, s, hw).0;
            }
            if bottleneck {
                let (f1, _) = conv(cin, planes, 1, 1, hw);
                let (f2, hw2) = conv(planes, planes, 3, s, hw);
                let (f3, _) = conv(planes, out, 1, 1, hw2);
                fwd += f1 + f2 + f3;
                hw = hw2;
            } else {
                let (f1, hw2) = conv(cin, planes, 3, s, hw);
                let (f2, _) = conv(planes, planes, 3, 1, hw2);
                fwd += f1 + f2;
                hw = hw2;
            }
            cin = out;
        }
    }
    let head = &cfg.head;
    let layers = match head.kind {
        HeadKind::None => 0,
        HeadKind::Linear => 1,
        HeadKind::Nonlinear => head.layers,
    };
    let hidden = head.hidden_dim.unwrap_or(cin);
    let mut din = cin;
    for j in 0..layers {
        let dout = if j + 1 == layers { head.out_dim } else { hidden };
        fwd += 2.0 * (n * din * dout) as f64;
        din = dout;
    }
    3.0 * fwd - stem_flops
}

/// Encoder and head.
#[derive(Module, Debug)]
pub struct SimclrModel<B: Backend> {
    pub encoder: ResNet<B>,
    pub head: Head<B>,
}

impl<B: Backend> SimclrModel<B> {
    pub fn new(cfg: &SimclrTrain, seed: u64, device: &B::Device) -> Self {
        let mut init = Init::new(seed);
        let encoder = ResNet::new(cfg, &mut init, device);
        let head = Head::new(&cfg.head, encoder.out_dim, &mut init, device);
        Self { encoder, head }
    }

    /// (h, z) for a batch of images.
    pub fn forward(&self, x: Tensor<B, 4>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let h = self.encoder.forward(x);
        let z = self.head.forward(h.clone());
        (h, z)
    }
}

#[cfg(test)]
mod flop_tests {
    use super::*;

    /// The anchor's count for its model (ResNet-18 CIFAR stem, head 512-512-128), 128 pairs:
    /// `flops_per_step` = 852.8 GFLOP (../shared/bench/anchors/README.md).
    #[test]
    fn resnet18_cifar_step_matches_the_anchors_count() {
        let cfg: SimclrTrain =
            serde_json::from_value(serde_json::json!({"head": {"bn": false}})).unwrap_or_default();
        let g = step_flops(&cfg, 256, 32, 32) / 1e9;
        assert!((g - 852.8).abs() < 1.0, "{g} GFLOP");
    }
}
