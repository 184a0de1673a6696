//! Contrastive objectives on the 2N projections z = [z(view 1); z(view 2)]: the positive of row
//! i is row (i + N) mod 2N.
//!
//! Each returns the loss (a 1-element tensor, differentiable) and the similarity logits
//! `sim / t` with the self-similarity masked out (by subtracting [`LARGE_NUM`], as the official
//! code does: finite, so gradients stay finite), from which [`contrast_stats`] computes
//! `contrast_acc` and `contrast_entropy` on the host.

use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::config::{LossConfig, LossKind, Reduction};

/// Subtracted from the self-similarity logits.
pub const LARGE_NUM: f32 = 1e9;

/// The loss and the masked logits (sim / t) of one batch.
pub struct LossOut<B: Backend> {
    pub loss: Tensor<B, 1>,
    pub logits: Tensor<B, 2>,
}

/// `x / max(|x|, 1e-6)` per row (tf.math.l2_normalize's `x * rsqrt(max(sum x^2, 1e-12))`).
pub fn l2_normalize<B: Backend>(z: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = z.clone().square().sum_dim(1).clamp_min(1e-12).sqrt();
    z / norm
}

/// Identity and positive-pair masks (2N x 2N) as float tensors.
fn masks<B: Backend>(n2: usize, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let n = n2 / 2;
    let mut eye = vec![0f32; n2 * n2];
    let mut pos = vec![0f32; n2 * n2];
    for i in 0..n2 {
        eye[i * n2 + i] = 1.0;
        pos[i * n2 + (i + n) % n2] = 1.0;
    }
    (
        Tensor::from_data(TensorData::new(eye, [n2, n2]), device),
        Tensor::from_data(TensorData::new(pos, [n2, n2]), device),
    )
}

/// log(1 + exp(x)) without overflow.
fn softplus<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    relu(x.clone()) + x.abs().neg().exp().log1p()
}

/// The configured loss of `z` (2N x D, rows 0..N the first views, N..2N the second).
pub fn contrastive_loss<B: Backend>(z: Tensor<B, 2>, cfg: &LossConfig) -> LossOut<B> {
    let [n2, _] = z.dims();
    assert!(n2 >= 2 && n2 % 2 == 0, "contrastive loss needs 2N rows, got {n2}");
    let device = z.device();
    let z = if cfg.l2_normalize { l2_normalize(z) } else { z };
    let sim = z.clone().matmul(z.transpose());
    let (eye, pos_mask) = masks::<B>(n2, &device);
    let t = cfg.temperature;
    let logits = sim.clone().div_scalar(t) - eye.clone().mul_scalar(LARGE_NUM);
    let negatives = (n2 - 2).max(1) as f64;
    let loss = match cfg.kind {
        LossKind::NtXent => {
            let m = logits.clone().max_dim(1).detach();
            let lse = (logits.clone() - m.clone()).exp().sum_dim(1).log() + m;
            let pos = (logits.clone() * pos_mask).sum_dim(1);
            let mean = (lse - pos).mean();
            match cfg.reduction {
                Reduction::Paper => mean,
                Reduction::Code => mean.mul_scalar(2.0),
            }
        }
        LossKind::NtLogistic => {
            // -log s(u.v+/t) - mean over negatives of log s(-u.v-/t), mean over anchors.
            let neg_mask = (eye + pos_mask.clone()).neg().add_scalar(1.0);
            let s = sim.div_scalar(t);
            let pos = (s.clone() * pos_mask).sum_dim(1);
            let neg = (softplus(s) * neg_mask).sum_dim(1).div_scalar(negatives);
            (softplus(pos.neg()) + neg).mean()
        }
        LossKind::MarginTriplet => {
            // max(u.v- - u.v+ + m, 0), mean over negatives, mean over anchors.
            let neg_mask = (eye + pos_mask.clone()).neg().add_scalar(1.0);
            let pos = (sim.clone() * pos_mask).sum_dim(1);
            let hinge = relu((sim - pos).add_scalar(cfg.margin)) * neg_mask;
            hinge.sum_dim(1).div_scalar(negatives).mean()
        }
    };
    LossOut { loss, logits }
}

/// (contrast_acc, contrast_entropy) from masked logits (row-major 2N x 2N): the share of
/// anchors whose most similar other view is their positive, and the mean entropy of the
/// softmax over the 2N - 1 candidates.
pub fn contrast_stats(logits: &[f32], n2: usize) -> (f64, f64) {
    let n = n2 / 2;
    let (mut hits, mut entropy) = (0usize, 0f64);
    for i in 0..n2 {
        let row = &logits[i * n2..(i + 1) * n2];
        let others = || row.iter().enumerate().filter(move |&(k, _)| k != i).map(|(k, &v)| (k, f64::from(v)));
        let (best, max) =
            others()
                .fold((usize::MAX, f64::NEG_INFINITY), |acc, (k, v)| if v > acc.1 { (k, v) } else { acc });
        if best == (i + n) % n2 {
            hits += 1;
        }
        let sum: f64 = others().map(|(_, v)| (v - max).exp()).sum();
        let log_sum = sum.ln();
        entropy -= others().map(|(_, v)| (v - max - log_sum).exp() * (v - max - log_sum)).sum::<f64>();
    }
    (hits as f64 / n2 as f64, entropy / n2 as f64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::LossConfig;
    use burn::backend::{Autodiff, Flex};
    use rand::{Rng, SeedableRng};

    type B = Flex;
    type AD = Autodiff<Flex>;

    fn tensor<B2: Backend>(rows: &[Vec<f64>]) -> Tensor<B2, 2> {
        let d = rows[0].len();
        let data: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
        Tensor::from_data(TensorData::new(data, [rows.len(), d]), &Default::default())
    }

    fn cfg(kind: LossKind, t: f64, reduction: Reduction) -> LossConfig {
        LossConfig { kind, temperature: t, reduction, ..LossConfig::default() }
    }

    fn scalar<B2: Backend>(t: Tensor<B2, 1>) -> f64 {
        f64::from(t.into_data().to_vec::<f32>().unwrap()[0])
    }

    /// The paper's Algorithm 1 with explicit loops, in f64 (mean over the 2N anchors).
    pub fn nt_xent_naive(z: &[Vec<f64>], t: f64, normalize: bool) -> f64 {
        let z: Vec<Vec<f64>> = z
            .iter()
            .map(|r| {
                let norm = if normalize { r.iter().map(|x| x * x).sum::<f64>().sqrt() } else { 1.0 };
                r.iter().map(|x| x / norm).collect()
            })
            .collect();
        let n2 = z.len();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let mut total = 0.0;
        for i in 0..n2 {
            let j = (i + n2 / 2) % n2;
            let den: f64 = (0..n2).filter(|&k| k != i).map(|k| (dot(&z[i], &z[k]) / t).exp()).sum();
            total += -((dot(&z[i], &z[j]) / t).exp() / den).ln();
        }
        total / n2 as f64
    }

    fn random_rows(rng: &mut impl Rng, rows: usize, d: usize) -> Vec<Vec<f64>> {
        (0..rows).map(|_| (0..d).map(|_| rng.random_range(-1.0..1.0)).collect()).collect()
    }

    #[test]
    fn nt_xent_matches_the_naive_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &(n, d) in &[(1, 4), (2, 3), (5, 8), (16, 32)] {
            for &t in &[0.05, 0.1, 0.5, 1.0] {
                let z = random_rows(&mut rng, 2 * n, d);
                let want = nt_xent_naive(&z, t, true);
                let got = scalar(
                    contrastive_loss::<B>(tensor(&z), &cfg(LossKind::NtXent, t, Reduction::Paper)).loss,
                );
                assert!(
                    (got - want).abs() < 1e-5 * want.abs().max(1.0),
                    "N={n} D={d} t={t}: {got} vs {want}"
                );
                let code = scalar(
                    contrastive_loss::<B>(tensor(&z), &cfg(LossKind::NtXent, t, Reduction::Code)).loss,
                );
                assert!((code - 2.0 * want).abs() < 2e-5 * want.abs().max(1.0), "code reduction is 2x paper");
            }
        }
    }

    /// The PyTorch bench's deterministic input (`nt_xent_reference()` in train_bench.py).
    fn anchor_input() -> Vec<Vec<f64>> {
        let (n, d) = (8, 16);
        let z1 = (0..n).map(|i| (0..d).map(|j| (0.1 * (i + 1) as f64 * (j + 1) as f64).sin()).collect());
        let z2 =
            (0..n).map(|i| (0..d).map(|j| (0.07 * (i + 1) as f64 + 0.13 * (j + 1) as f64).cos()).collect());
        z1.chain(z2).collect()
    }

    #[test]
    fn nt_xent_matches_the_pytorch_anchor_values() {
        let z = anchor_input();
        for (t, want) in [(0.5, 2.948897264891), (0.1, 5.738228525738)] {
            assert!((nt_xent_naive(&z, t, true) - want).abs() < 1e-9, "naive reference at T={t}");
            let got =
                scalar(contrastive_loss::<B>(tensor(&z), &cfg(LossKind::NtXent, t, Reduction::Paper)).loss);
            assert!((got - want).abs() < 1e-5, "T={t}: {got} vs {want}");
        }
    }

    #[test]
    fn nt_xent_gradient_matches_finite_differences() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let z = random_rows(&mut rng, 4, 3); // N = 2, D = 3
        let t = 0.5;
        let zt: Tensor<AD, 2> = tensor::<AD>(&z).require_grad();
        let out = contrastive_loss(zt.clone(), &cfg(LossKind::NtXent, t, Reduction::Paper));
        let grads = out.loss.backward();
        let g = zt.grad(&grads).expect("gradient of z").into_data().to_vec::<f32>().unwrap();
        let h = 1e-5;
        for r in 0..4 {
            for c in 0..3 {
                let (mut plus, mut minus) = (z.clone(), z.clone());
                plus[r][c] += h;
                minus[r][c] -= h;
                let fd = (nt_xent_naive(&plus, t, true) - nt_xent_naive(&minus, t, true)) / (2.0 * h);
                let got = f64::from(g[r * 3 + c]);
                assert!((got - fd).abs() < 1e-4 + 1e-3 * fd.abs(), "dL/dz[{r}][{c}]: {got} vs {fd}");
            }
        }
        assert!(<AD as Backend>::ad_enabled(&Default::default()));
    }

    #[test]
    fn aligned_views_give_full_contrast_accuracy() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let half = random_rows(&mut rng, 6, 16);
        let z: Vec<Vec<f64>> = half.iter().chain(&half).cloned().collect();
        let out = contrastive_loss::<B>(tensor(&z), &cfg(LossKind::NtXent, 0.1, Reduction::Paper));
        let logits = out.logits.into_data().to_vec::<f32>().unwrap();
        let (acc, entropy) = contrast_stats(&logits, 12);
        assert_eq!(acc, 1.0);
        assert!(entropy > 0.0 && entropy < (11f64).ln());
        // And shuffled partners are not all found.
        let mut other = half.clone();
        other.rotate_left(1);
        let z: Vec<Vec<f64>> = half.iter().chain(&other).cloned().collect();
        let out = contrastive_loss::<B>(tensor(&z), &cfg(LossKind::NtXent, 0.1, Reduction::Paper));
        let (acc, _) = contrast_stats(&out.logits.into_data().to_vec::<f32>().unwrap(), 12);
        assert!(acc < 1.0);
    }

    #[test]
    fn contrast_entropy_of_uniform_logits_is_log_candidates() {
        let n2 = 6;
        let mut logits = vec![0.25f32; n2 * n2];
        for i in 0..n2 {
            logits[i * n2 + i] -= LARGE_NUM;
        }
        let (_, h) = contrast_stats(&logits, n2);
        assert!((h - (5f64).ln()).abs() < 1e-9);
    }

    #[test]
    fn logistic_and_triplet_match_loops() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let z = random_rows(&mut rng, 8, 5);
        let n2 = z.len();
        let zn: Vec<Vec<f64>> = z
            .iter()
            .map(|r| {
                let s = r.iter().map(|x| x * x).sum::<f64>().sqrt();
                r.iter().map(|x| x / s).collect()
            })
            .collect();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let sp = |x: f64| (1.0 + x.exp()).ln();
        let (t, m) = (0.3, 0.4);
        let (mut logistic, mut triplet) = (0.0, 0.0);
        for i in 0..n2 {
            let p = (i + n2 / 2) % n2;
            let negs: Vec<usize> = (0..n2).filter(|&k| k != i && k != p).collect();
            logistic += sp(-dot(&zn[i], &zn[p]) / t)
                + negs.iter().map(|&k| sp(dot(&zn[i], &zn[k]) / t)).sum::<f64>() / negs.len() as f64;
            triplet +=
                negs.iter().map(|&k| (dot(&zn[i], &zn[k]) - dot(&zn[i], &zn[p]) + m).max(0.0)).sum::<f64>()
                    / negs.len() as f64;
        }
        let c = LossConfig { kind: LossKind::NtLogistic, temperature: t, margin: m, ..LossConfig::default() };
        let got = scalar(contrastive_loss::<B>(tensor(&z), &c).loss);
        assert!((got - logistic / n2 as f64).abs() < 1e-5, "nt_logistic {got} vs {}", logistic / n2 as f64);
        let c = LossConfig { kind: LossKind::MarginTriplet, ..c };
        let got = scalar(contrastive_loss::<B>(tensor(&z), &c).loss);
        assert!((got - triplet / n2 as f64).abs() < 1e-5, "margin_triplet {got} vs {}", triplet / n2 as f64);
    }
}
