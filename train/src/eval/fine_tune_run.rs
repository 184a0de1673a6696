//! What a fine-tuning run carries through the supervised engine ([`super::supervised`]): the
//! label subset, the linear-probe initialization of the classifier, and the batch surgery
//! both need. Its own module, so that `fine_tune` (the stage) and `supervised` (the engine)
//! each import it instead of each other.

use std::sync::Arc;

use simclr_core::driver::DataSource;

use super::features::EvalTransform;
use super::linear::{fit_lbfgs, Features, Standardizer};
use super::subset::Subset;

/// Fine-tuning's extras: the label subset and the test it reports on.
pub(super) struct FineTuneRun {
    pub(super) fraction: f64,
    pub(super) seed: u64,
    pub(super) test: Arc<DataSource>,
    pub(super) transform: EvalTransform,
    /// The method the starting encoder is filed under (`simclr`).
    pub(super) method: String,
    /// The labeled subset, chosen after a first pass that only reads the labels (below a
    /// fraction of 1: a class-balanced subset needs every label first).
    pub(super) subset: Option<Subset>,
    /// (dataset index, label) seen in that first pass.
    pub(super) seen: Vec<(u64, u32)>,
    /// `head_init: linear_probe` (below a fraction of 1): the subset's (augmented) images
    /// encoded by the starting encoder in a second pass; the classifier starts from a logistic
    /// regression fitted on them (linear probing, then fine-tuning). `None` once fitted.
    pub(super) probe: Option<Features>,
    /// The probe's L2 penalty.
    pub(super) probe_l2: f64,
    /// Whether the run has the probe's pass (fixed at build: `probe` is emptied after it).
    pub(super) probe_pass: bool,
}

impl FineTuneRun {
    /// Whether the stream's epoch 0 is the labels-only pass.
    pub(super) fn labels_pass(&self) -> bool {
        self.fraction < 1.0
    }

    /// Passes over the data before training: the labels pass, then the probe's.
    pub(super) fn extra_epochs(&self) -> u32 {
        u32::from(self.labels_pass()) + u32::from(self.probe_pass)
    }
}

/// The rows of `batch` whose dataset index passes `keep`.
pub(super) fn keep_rows(batch: &simclr_core::Batch, keep: impl Fn(u64) -> bool) -> simclr_core::Batch {
    let rows: Vec<usize> = (0..batch.indices.len()).filter(|&r| keep(batch.indices[r])).collect();
    let views = batch
        .views
        .iter()
        .map(|v| {
            let per = v.shape.iter().skip(1).product::<usize>();
            let mut shape = v.shape.clone();
            if let Some(n) = shape.first_mut() {
                *n = rows.len();
            }
            let data = rows.iter().flat_map(|&r| v.data[r * per..(r + 1) * per].iter().copied()).collect();
            simclr_core::Tensor { shape, data }
        })
        .collect();
    simclr_core::Batch {
        views,
        indices: rows.iter().map(|&r| batch.indices[r]).collect(),
        labels: rows.iter().map(|&r| batch.labels[r]).collect(),
        pool: None,
    }
}

/// A logistic regression on standardized `rows` (L-BFGS, as `linear_eval`), folded back into
/// weights and biases on the raw features: (classes x dim weights, biases, train accuracy %).
pub(super) fn probe_head(rows: &Features, classes: usize, l2: f64) -> (Vec<f32>, Vec<f32>, f64) {
    let std = Standardizer::fit(rows);
    let (model, _) = fit_lbfgs(&std.apply(rows), classes, l2, 500, 1e-6);
    let d = rows.dim;
    let mut weight = vec![0f32; classes * d];
    let mut bias = vec![0f32; classes];
    for c in 0..classes {
        let mut b = model.b[c];
        for j in 0..d {
            let w = model.w[c * d + j] * std.inv_std[j];
            weight[c * d + j] = w as f32;
            b -= w * std.mean[j];
        }
        bias[c] = b as f32;
    }
    let (train_acc, _) = model.accuracy(&std.apply(rows));
    (weight, bias, train_acc)
}

/// `a`'s rows followed by `b`'s.
pub(super) fn concat(mut a: simclr_core::Batch, b: simclr_core::Batch) -> simclr_core::Batch {
    for (va, vb) in a.views.iter_mut().zip(&b.views) {
        va.data.extend_from_slice(&vb.data);
        if let (Some(na), Some(nb)) = (va.shape.first_mut(), vb.shape.first()) {
            *na += nb;
        }
    }
    a.indices.extend_from_slice(&b.indices);
    a.labels.extend_from_slice(&b.labels);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The folded classifier on raw features predicts what the probe predicts on standardized ones.
    #[test]
    fn the_probe_head_folds_the_standardization_into_the_weights() {
        // Three classes along different features, with large offsets and scales.
        let mut f = Features { dim: 3, ..Features::default() };
        for i in 0..60u32 {
            let c = i % 3;
            let jitter = (i as f32 * 0.37).sin();
            let mut row = [100.0 + jitter, -50.0 + 0.5 * jitter, 3.0 * jitter];
            row[c as usize] += 4.0 * (1.0 + 0.1 * jitter);
            f.x.extend(row);
            f.y.push(c);
            f.index.push(u64::from(i));
        }
        let (w, b, train_acc) = probe_head(&f, 3, 1e-4);
        assert!(train_acc > 90.0, "{train_acc}");
        let correct = (0..f.len())
            .filter(|&r| {
                let x = f.row(r);
                let scores: Vec<f32> =
                    (0..3).map(|c| b[c] + (0..3).map(|j| w[c * 3 + j] * x[j]).sum::<f32>()).collect();
                let best = (0..3).max_by(|&a, &c| scores[a].total_cmp(&scores[c])).unwrap_or(0);
                best as u32 == f.y[r]
            })
            .count();
        assert_eq!(correct as f64 / f.len() as f64 * 100.0, train_acc);
    }
}
