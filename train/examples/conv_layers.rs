//! The CPU convolution (`simclr_train::cpu::conv`) on every 3x3 layer shape of a CIFAR-stem
//! ResNet-18, 256 views: seconds and GFLOP/s of the forward pass and of the backward pass
//! (input and weight gradients), the same convolution through burn's own op beside it; above
//! each such line, our input and weight gradients timed apart.
//! `RAYON_NUM_THREADS=2 cargo run --release -p simclr-train --example conv_layers`
//! (`CONV_LAYERS_OURS_ONLY=1`: without burn's, e.g. under a profiler)

use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, TensorData};

type B = Autodiff<Flex>;

/// (input channels, side, output channels, stride) of ResNet-18's 3x3 convolutions.
const LAYERS: [(usize, usize, usize, usize); 7] = [
    (64, 32, 64, 1),
    (64, 32, 128, 2),
    (128, 16, 128, 1),
    (128, 16, 256, 2),
    (256, 8, 256, 1),
    (256, 8, 512, 2),
    (512, 4, 512, 1),
];

/// Seconds of the forward pass and of the backward pass, the second of two runs.
fn time(x: &TensorData, w: &TensorData, s: usize, ours: bool) -> (f64, f64) {
    let device = Default::default();
    let mut out = (0.0, 0.0);
    for _ in 0..2 {
        let x = Tensor::<B, 4>::from_data(x.clone(), &device).require_grad();
        let w = Tensor::<B, 4>::from_data(w.clone(), &device).require_grad();
        let t = Instant::now();
        let y = if ours {
            simclr_train::cpu::conv::conv2d(x.clone(), w.clone(), s, 1)
        } else {
            burn::tensor::module::conv2d(
                x.clone(),
                w.clone(),
                None,
                ConvOptions::new([s, s], [1, 1], [1, 1], 1),
            )
        };
        let y = y.sum();
        let forward = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let grads = y.backward();
        let (gx, gw) = (x.grad(&grads), w.grad(&grads));
        std::hint::black_box((gx, gw));
        out = (forward, t.elapsed().as_secs_f64());
    }
    out
}

fn main() {
    let n = 256;
    println!("layer                     ours: forward (GFLOP/s), backward     burn: forward, backward");
    for (ci, side, co, s) in LAYERS {
        let xs = [n, ci, side, side];
        let x = TensorData::new(
            (0..xs.iter().product::<usize>()).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>(),
            xs,
        );
        let w = TensorData::new(vec![0.01f32; co * ci * 9], [co, ci, 3, 3]);
        let out = side.div_ceil(s);
        let flops = 2.0 * (n * co * ci * 9 * out * out) as f64;
        let (f, b) = time(&x, &w, s, true);
        let (bf, bb) = if std::env::var_os("CONV_LAYERS_OURS_ONLY").is_some() {
            (0.0, 0.0)
        } else {
            time(&x, &w, s, false)
        };
        let xv = x.to_vec::<f32>().unwrap_or_default();
        let wv = w.to_vec::<f32>().unwrap_or_default();
        let mut split = (0.0, 0.0);
        for _ in 0..2 {
            split = simclr_train::cpu::conv::time_grads(xv.clone(), xs, wv.clone(), [co, ci, 3, 3], s, 1);
        }
        println!(
            "{ci:3} -> {co:3}, {side:2}x{side:2}, s {s}:  input grad {:.3} s ({:3.0}), weight grad {:.3} s ({:3.0})",
            split.0,
            flops / split.0 / 1e9,
            split.1,
            flops / split.1 / 1e9
        );
        println!(
            "{ci:3} -> {co:3}, {side:2}x{side:2}, s {s}:  {f:.3} s ({:3.0}), {b:.3} s ({:3.0})     {bf:.3} s, {bb:.3} s",
            flops / f / 1e9,
            2.0 * flops / b / 1e9,
        );
    }
}
