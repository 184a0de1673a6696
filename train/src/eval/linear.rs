//! Linear classifiers on frozen features: L2-regularized multinomial logistic regression fitted
//! by L-BFGS (the paper's transfer protocol) and by minibatch SGD with Nesterov momentum (its
//! linear-evaluation protocol).
//!
//! Hand-written rather than pulled from `linfa-logistic`: that brings ndarray, argmin and the
//! linfa core for one objective, and we need bit-identical results whatever the thread count,
//! which fixed-order reductions here guarantee.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

/// Features as a dense row-major matrix with integer labels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Features {
    /// N x dim, row-major.
    pub x: Vec<f32>,
    pub y: Vec<u32>,
    pub dim: usize,
    /// Each row's dataset index (empty: row r is item r).
    pub index: Vec<u64>,
}

impl Features {
    /// The dataset index of row `r`.
    pub fn index_of(&self, r: usize) -> u64 {
        self.index.get(r).copied().unwrap_or(r as u64)
    }

    /// (dataset index, label) of every row.
    pub fn labeled(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.y.iter().enumerate().map(|(r, &y)| (self.index_of(r), y))
    }

    /// The rows whose dataset index `keep` accepts.
    pub fn rows(&self, keep: impl Fn(u64) -> bool) -> Features {
        let mut out = Features { dim: self.dim, ..Features::default() };
        for r in 0..self.len() {
            let i = self.index_of(r);
            if keep(i) {
                out.x.extend_from_slice(&self.x[r * self.dim..(r + 1) * self.dim]);
                out.y.push(self.y[r]);
                out.index.push(i);
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.y.len()
    }
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.dim..(i + 1) * self.dim]
    }
}

/// Per-feature mean and standard deviation of the training features, applied to both splits so
/// the classifier's regularization means the same whatever the encoder's scale.
#[derive(Clone, Debug, PartialEq)]
pub struct Standardizer {
    pub mean: Vec<f64>,
    pub inv_std: Vec<f64>,
}

impl Standardizer {
    pub fn fit(f: &Features) -> Self {
        let (n, d) = (f.len().max(1) as f64, f.dim);
        let mut mean = vec![0.0; d];
        for i in 0..f.len() {
            for (m, &v) in mean.iter_mut().zip(f.row(i)) {
                *m += f64::from(v);
            }
        }
        mean.iter_mut().for_each(|m| *m /= n);
        let mut var = vec![0.0; d];
        for i in 0..f.len() {
            for ((s, &v), m) in var.iter_mut().zip(f.row(i)).zip(&mean) {
                *s += (f64::from(v) - m).powi(2);
            }
        }
        // Constant features stay at 0 rather than blowing up.
        let inv_std = var.iter().map(|s| if *s > 1e-12 * n { (n / s).sqrt() } else { 1.0 }).collect();
        Self { mean, inv_std }
    }

    pub fn apply(&self, f: &Features) -> Features {
        let mut x = f.x.clone();
        for row in x.chunks_exact_mut(f.dim.max(1)) {
            for ((v, m), s) in row.iter_mut().zip(&self.mean).zip(&self.inv_std) {
                *v = ((f64::from(*v) - m) * s) as f32;
            }
        }
        Features { x, y: f.y.clone(), dim: f.dim, index: f.index.clone() }
    }
}

/// Weights (classes x dim, row-major) and biases of a linear classifier.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    pub w: Vec<f64>,
    pub b: Vec<f64>,
    pub classes: usize,
    pub dim: usize,
}

impl Linear {
    pub fn zeros(classes: usize, dim: usize) -> Self {
        Self { w: vec![0.0; classes * dim], b: vec![0.0; classes], classes, dim }
    }

    fn logits(&self, x: &[f32], out: &mut [f64]) {
        for (c, o) in out.iter_mut().enumerate() {
            let w = &self.w[c * self.dim..(c + 1) * self.dim];
            *o = self.b[c] + w.iter().zip(x).map(|(w, &x)| w * f64::from(x)).sum::<f64>();
        }
    }

    /// Top-1 and top-5 accuracy (percent) on `f`.
    pub fn accuracy(&self, f: &Features) -> (f64, f64) {
        topk_accuracy(&f.y, self.classes, |i, out| self.logits(f.row(i), out))
    }
}

/// Top-1 and top-5 accuracy (percent) of a scorer that fills the class scores of row `i`;
/// ties go to the lower class index.
pub fn topk_accuracy(labels: &[u32], classes: usize, score: impl Fn(usize, &mut [f64]) + Sync) -> (f64, f64) {
    if labels.is_empty() {
        return (0.0, 0.0);
    }
    let hits: Vec<(bool, bool)> = (0..labels.len())
        .into_par_iter()
        .map(|i| {
            let mut s = vec![0.0; classes];
            score(i, &mut s);
            let y = labels[i] as usize;
            let target = s.get(y).copied().unwrap_or(f64::NEG_INFINITY);
            // Rank of the true class: classes scoring higher, or equal with a lower index.
            let rank = s.iter().enumerate().filter(|&(c, &v)| v > target || (v == target && c < y)).count();
            (rank == 0, rank < 5)
        })
        .collect();
    let n = labels.len() as f64;
    let top1 = hits.iter().filter(|h| h.0).count() as f64 / n * 100.0;
    let top5 = hits.iter().filter(|h| h.1).count() as f64 / n * 100.0;
    (top1, top5)
}

/// Mean cross-entropy + l2/2 ||W||^2 and its gradient (w then b), at `m`.
fn objective(m: &Linear, f: &Features, l2: f64, grad: &mut [f64]) -> f64 {
    let (c, d) = (m.classes, m.dim);
    // Fixed chunks, summed in order: the same result for any number of threads.
    let partial: Vec<(f64, Vec<f64>)> = (0..f.len())
        .collect::<Vec<_>>()
        .par_chunks(256)
        .map(|idx| {
            let mut g = vec![0.0; c * d + c];
            let mut loss = 0.0;
            let mut z = vec![0.0; c];
            for &i in idx {
                let x = f.row(i);
                m.logits(x, &mut z);
                let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
                let lse = max + sum.ln();
                let y = f.y[i] as usize;
                loss += lse - z[y];
                for k in 0..c {
                    let p = (z[k] - lse).exp() - if k == y { 1.0 } else { 0.0 };
                    if p != 0.0 {
                        for (gw, &xv) in g[k * d..(k + 1) * d].iter_mut().zip(x) {
                            *gw += p * f64::from(xv);
                        }
                        g[c * d + k] += p;
                    }
                }
            }
            (loss, g)
        })
        .collect();
    let n = f.len().max(1) as f64;
    grad.iter_mut().for_each(|g| *g = 0.0);
    let mut loss = 0.0;
    for (l, g) in partial {
        loss += l;
        for (a, b) in grad.iter_mut().zip(g) {
            *a += b;
        }
    }
    grad.iter_mut().for_each(|g| *g /= n);
    for (g, w) in grad[..c * d].iter_mut().zip(&m.w) {
        *g += l2 * w;
    }
    loss / n + 0.5 * l2 * m.w.iter().map(|w| w * w).sum::<f64>()
}

fn unpack(theta: &[f64], classes: usize, dim: usize) -> Linear {
    Linear { w: theta[..classes * dim].to_vec(), b: theta[classes * dim..].to_vec(), classes, dim }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// What a fit did.
#[derive(Clone, Debug, PartialEq)]
pub struct FitReport {
    pub iterations: usize,
    pub loss: f64,
    pub converged: bool,
}

/// Fits by L-BFGS (memory 10, backtracking Armijo line search) from zero weights; stops when the
/// largest gradient entry is below `tol`, the loss stops moving, or after `max_iter` iterations.
pub fn fit_lbfgs(f: &Features, classes: usize, l2: f64, max_iter: usize, tol: f64) -> (Linear, FitReport) {
    let (c, d) = (classes, f.dim);
    let n_par = c * d + c;
    let mut theta = vec![0.0; n_par];
    let mut g = vec![0.0; n_par];
    let mut loss = objective(&unpack(&theta, c, d), f, l2, &mut g);
    let mut hist: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> = Default::default();
    let mut report = FitReport { iterations: 0, loss, converged: false };
    for it in 0..max_iter {
        report.iterations = it;
        if g.iter().fold(0.0f64, |m, v| m.max(v.abs())) < tol {
            report.converged = true;
            break;
        }
        // Two-loop recursion: direction = -H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(hist.len());
        for (s, y, rho) in hist.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(q, y)| *q -= a * y);
            alphas.push(a);
        }
        let gamma = hist.back().map_or_else(
            || 1.0 / dot(&g, &g).sqrt().max(1e-12),
            |(s, y, _)| dot(s, y) / dot(y, y).max(1e-300),
        );
        q.iter_mut().for_each(|v| *v *= gamma);
        for ((s, y, rho), a) in hist.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            q.iter_mut().zip(s).for_each(|(q, s)| *q += (a - b) * s);
        }
        let mut dir: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&g, &dir);
        if slope >= 0.0 {
            // Not a descent direction (numerical trouble): restart from steepest descent.
            hist.clear();
            dir = g.iter().map(|v| -v).collect();
            slope = -dot(&g, &g);
        }
        let mut step = 1.0;
        let mut new_g = vec![0.0; n_par];
        let mut accepted = None;
        for _ in 0..40 {
            let cand: Vec<f64> = theta.iter().zip(&dir).map(|(t, d)| t + step * d).collect();
            let l = objective(&unpack(&cand, c, d), f, l2, &mut new_g);
            if l.is_finite() && l <= loss + 1e-4 * step * slope {
                accepted = Some((cand, l));
                break;
            }
            step *= 0.5;
        }
        let Some((cand, new_loss)) = accepted else { break };
        let s: Vec<f64> = cand.iter().zip(&theta).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = new_g.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-12 {
            if hist.len() == 10 {
                hist.pop_front();
            }
            hist.push_back((s, y, 1.0 / sy));
        }
        let moved = (loss - new_loss).abs() <= 1e-12 * loss.abs().max(1.0);
        theta = cand;
        g.clone_from(&new_g);
        loss = new_loss;
        report.loss = loss;
        report.iterations = it + 1;
        if moved {
            report.converged = true;
            break;
        }
    }
    (unpack(&theta, c, d), report)
}

/// Minibatch SGD with Nesterov momentum 0.9 and a cosine decay over `total` steps, from zero
/// weights (the paper's linear-evaluation optimizer). Fed one minibatch at a time, so the
/// minibatches can be fresh augmentations.
pub struct Sgd {
    pub model: Linear,
    v: Vec<f64>,
    g: Vec<f64>,
    l2: f64,
    lr: f64,
    step: usize,
    total: usize,
}

impl Sgd {
    pub fn new(classes: usize, dim: usize, l2: f64, lr: f64, total: usize) -> Self {
        let n = classes * dim + classes;
        Self {
            model: Linear::zeros(classes, dim),
            v: vec![0.0; n],
            g: vec![0.0; n],
            l2,
            lr,
            step: 0,
            total: total.max(1),
        }
    }

    /// One update on `batch`; returns its loss before the update.
    pub fn step(&mut self, batch: &Features) -> f64 {
        let loss = objective(&self.model, batch, self.l2, &mut self.g);
        let rate =
            self.lr * 0.5 * (1.0 + (std::f64::consts::PI * self.step as f64 / self.total as f64).cos());
        let m = &mut self.model;
        let cd = m.classes * m.dim;
        for (k, (v, g)) in self.v.iter_mut().zip(&self.g).enumerate() {
            *v = 0.9 * *v + g;
            let t = if k < cd { &mut m.w[k] } else { &mut m.b[k - cd] };
            *t -= rate * (g + 0.9 * *v);
        }
        self.step += 1;
        loss
    }
}

/// [`Sgd`] over fixed features for `epochs`, reshuffled each epoch from `seed`.
pub fn fit_sgd(
    f: &Features,
    classes: usize,
    l2: f64,
    lr: f64,
    epochs: usize,
    batch: usize,
    seed: u64,
) -> (Linear, FitReport) {
    let batch = batch.max(1);
    let mut sgd = Sgd::new(classes, f.dim, l2, lr, epochs * f.len().div_ceil(batch));
    let mut order: Vec<usize> = (0..f.len()).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut loss = 0.0;
    for _ in 0..epochs {
        order.shuffle(&mut rng);
        for idx in order.chunks(batch) {
            let sub = Features {
                x: idx.iter().flat_map(|&i| f.row(i).iter().copied()).collect(),
                y: idx.iter().map(|&i| f.y[i]).collect(),
                dim: f.dim,
                index: Vec::new(),
            };
            loss = sgd.step(&sub);
        }
    }
    let iterations = sgd.step;
    (sgd.model, FitReport { iterations, loss, converged: true })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// `n` points per class around well-separated random centres.
    fn blobs(classes: usize, n: usize, dim: usize, spread: f32, seed: u64) -> Features {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> =
            (0..classes).map(|_| (0..dim).map(|_| rng.random_range(-5.0..5.0)).collect()).collect();
        let mut f = Features { dim, ..Default::default() };
        for i in 0..classes * n {
            let c = i % classes;
            f.x.extend(centres[c].iter().map(|v| v + spread * rng.random_range(-1.0f32..1.0)));
            f.y.push(c as u32);
        }
        f
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let f = blobs(3, 5, 4, 2.0, 1);
        let mut m = Linear::zeros(3, 4);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        m.w.iter_mut().chain(m.b.iter_mut()).for_each(|v| *v = rng.random_range(-0.5..0.5));
        let mut g = vec![0.0; 15];
        objective(&m, &f, 0.1, &mut g);
        let theta: Vec<f64> = m.w.iter().chain(&m.b).copied().collect();
        for k in 0..theta.len() {
            let (mut a, mut b) = (theta.clone(), theta.clone());
            a[k] += 1e-6;
            b[k] -= 1e-6;
            let mut tmp = vec![0.0; 15];
            let fd = (objective(&unpack(&a, 3, 4), &f, 0.1, &mut tmp)
                - objective(&unpack(&b, 3, 4), &f, 0.1, &mut tmp))
                / 2e-6;
            assert!((fd - g[k]).abs() < 1e-6, "param {k}: finite difference {fd} vs gradient {}", g[k]);
        }
    }

    #[test]
    fn separable_features_are_classified_perfectly() {
        let train = blobs(5, 40, 8, 0.5, 3);
        let test = blobs(5, 20, 8, 0.5, 3);
        let (m, rep) = fit_lbfgs(&train, 5, 1e-4, 500, 1e-6);
        assert!(rep.loss < 0.1, "{rep:?}");
        assert_eq!(m.accuracy(&train).0, 100.0);
        assert_eq!(m.accuracy(&test).0, 100.0);
        let (m, _) = fit_sgd(&train, 5, 1e-4, 0.1, 30, 32, 0);
        assert_eq!(m.accuracy(&test).0, 100.0);
    }

    #[test]
    fn random_features_give_chance_accuracy() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut rand_feats = |n: usize| Features {
            x: (0..n * 16).map(|_| rng.random_range(-1.0..1.0)).collect(),
            y: (0..n).map(|_| rng.random_range(0..4)).collect(),
            dim: 16,
            index: Vec::new(),
        };
        let (train, test) = (rand_feats(400), rand_feats(4000));
        let (m, _) = fit_lbfgs(&train, 4, 1e-2, 300, 1e-6);
        let (top1, _) = m.accuracy(&test);
        assert!((top1 - 25.0).abs() < 4.0, "chance is 25%, got {top1}");
    }

    #[test]
    fn standardizer_centres_and_scales() {
        let f =
            Features { x: vec![1.0, 10.0, 3.0, 10.0, 5.0, 10.0], y: vec![0, 1, 0], dim: 2, index: vec![] };
        let s = Standardizer::fit(&f);
        assert_eq!(s.mean, vec![3.0, 10.0]);
        let z = s.apply(&f);
        let expect = (3.0f64 / 8.0).sqrt() as f32 * 2.0;
        assert!((z.x[0] + expect).abs() < 1e-6 && (z.x[4] - expect).abs() < 1e-6, "{:?}", z.x);
        assert_eq!(z.x[1], 0.0, "a constant feature stays finite");
    }

    #[test]
    fn topk_ranks_ties_to_the_lower_class() {
        let (top1, top5) = topk_accuracy(&[0, 1], 6, |_, s| s.iter_mut().for_each(|v| *v = 1.0));
        assert_eq!((top1, top5), (50.0, 100.0));
    }
}
