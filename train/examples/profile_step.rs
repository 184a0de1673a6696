//! Where the time of one training step goes (forward, backward, optimizer), on the CPU.
//! `RAYON_NUM_THREADS=2 cargo run --release -p simclr-train --example profile_step -- [pairs] [side]`

use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use simclr_train::loss::contrastive_loss;
use simclr_train::model::SimclrModel;
use simclr_train::optim::Optimizer;
use simclr_train::SimclrTrain;

type B = Autodiff<Flex>;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (pairs, side) = (args.first().copied().unwrap_or(128), args.get(1).copied().unwrap_or(32));
    let cfg = SimclrTrain::default();
    let device = Default::default();
    let mut model = SimclrModel::<B>::new(&cfg, 0, &device);
    let mut opt = Optimizer::<Flex>::new(&cfg.optimizer);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let len = 2 * pairs * 3 * side * side;
    let data: Vec<f32> = (0..len).map(|_| rng.random::<f32>()).collect();
    for it in 0..3 {
        let x = Tensor::<B, 4>::from_data(TensorData::new(data.clone(), [2 * pairs, 3, side, side]), &device);
        let t0 = Instant::now();
        let (_, z) = model.forward(x);
        let out = contrastive_loss(z, &cfg.loss);
        let loss = out.loss.clone().into_scalar();
        let t1 = Instant::now();
        let grads = out.loss.backward();
        let t2 = Instant::now();
        let grads = GradientsParams::from_grads(grads, &model);
        model = opt.step(model, grads, 0.1);
        // Force the lazy updates.
        let _ = model.encoder.conv1.weight.val().into_data();
        let t3 = Instant::now();
        // Eval-mode forward (no autodiff) for reference.
        let enc = model.encoder.valid();
        let x =
            Tensor::<Flex, 4>::from_data(TensorData::new(data.clone(), [2 * pairs, 3, side, side]), &device);
        let t4 = Instant::now();
        let _ = enc.forward(x).into_data();
        let t5 = Instant::now();
        println!(
            "step {it}: loss {loss:.4} forward+loss {:.2}s backward {:.2}s optimizer {:.2}s | eval forward {:.2}s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            (t5 - t4).as_secs_f64()
        );
    }
    // Single conv layer timings: 64->64 3x3 on the full batch.
    for (c, s) in [(64usize, side), (128, side / 2), (256, side / 4), (512, side / 8)] {
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(
                (0..2 * pairs * c * s * s).map(|_| rng.random::<f32>()).collect::<Vec<f32>>(),
                [2 * pairs, c, s, s],
            ),
            &device,
        )
        .require_grad();
        let w = Tensor::<B, 4>::from_data(
            TensorData::new(
                (0..c * c * 9).map(|_| rng.random::<f32>() * 0.01).collect::<Vec<f32>>(),
                [c, c, 3, 3],
            ),
            &device,
        )
        .require_grad();
        let t0 = Instant::now();
        let y = burn::tensor::module::conv2d(
            x.clone(),
            w.clone(),
            None,
            burn::tensor::ops::ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
        );
        let s1 = y.clone().sum().into_scalar();
        let t1 = Instant::now();
        let g = y.sum().backward();
        let _ = w.grad(&g).unwrap().into_data();
        let _ = x.grad(&g).unwrap().into_data();
        let t2 = Instant::now();
        println!(
            "conv {c}x{s}x{s}: forward {:.3}s backward {:.3}s ({s1:.1})",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64()
        );
    }
}
