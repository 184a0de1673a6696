//! Weighted kNN on cosine similarity (the common SimCLR monitor: k = 200, temperature 0.1):
//! each of the k most similar training features votes for its label with weight exp(sim / t).

use rayon::prelude::*;

use super::linear::{topk_accuracy, Features};

fn normalized(f: &Features) -> Vec<f32> {
    let mut x = f.x.clone();
    for row in x.chunks_exact_mut(f.dim.max(1)) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= n);
    }
    x
}

/// Class scores of every test row: the summed weights of its k nearest training rows.
pub fn knn_scores(train: &Features, test: &Features, classes: usize, k: usize, t: f64) -> Vec<Vec<f64>> {
    let (a, b) = (normalized(train), normalized(test));
    let d = train.dim.max(1);
    (0..test.len())
        .into_par_iter()
        .map(|i| {
            let q = &b[i * d..(i + 1) * d];
            let mut sims: Vec<(f32, usize)> = a
                .chunks_exact(d)
                .enumerate()
                .map(|(j, r)| (r.iter().zip(q).map(|(x, y)| x * y).sum::<f32>(), j))
                .collect();
            let k = k.min(sims.len());
            // Most similar first; equal similarity: lower index first (deterministic).
            let by = |x: &(f32, usize), y: &(f32, usize)| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1));
            if k > 0 && k < sims.len() {
                sims.select_nth_unstable_by(k - 1, by);
            }
            sims.truncate(k);
            sims.sort_by(by);
            let mut s = vec![0.0; classes];
            for (sim, j) in sims {
                if let Some(v) = s.get_mut(train.y[j] as usize) {
                    *v += (f64::from(sim) / t).exp();
                }
            }
            s
        })
        .collect()
}

/// Top-1 and top-5 kNN accuracy (percent) of `test` against `train`.
pub fn knn_accuracy(train: &Features, test: &Features, classes: usize, k: usize, t: f64) -> (f64, f64) {
    let scores = knn_scores(train, test, classes, k, t);
    topk_accuracy(&test.y, classes, |i, out| out.copy_from_slice(&scores[i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_case() {
        // Train: three points at angles 0, 10 and 90 degrees; labels 0, 1, 1.
        let (c10, s10) = (10f32.to_radians().cos(), 10f32.to_radians().sin());
        let train =
            Features { x: vec![1.0, 0.0, c10, s10, 0.0, 2.0], y: vec![0, 1, 1], dim: 2, index: vec![] };
        // Query at 2 degrees: similarities cos 2 (label 0), cos 8 (label 1), cos 88 (label 1).
        let q = 2f32.to_radians();
        let test = Features { x: vec![q.cos() * 3.0, q.sin() * 3.0], y: vec![0], dim: 2, index: vec![] };
        let t = 0.1;
        let w = |deg: f64| (deg.to_radians().cos() / t).exp();
        // k = 2: label 0 gets w(2), label 1 gets w(8); w(2) > w(8) -> class 0.
        let s = knn_scores(&train, &test, 2, 2, t);
        assert!(
            (s[0][0] - w(2.0)).abs() / w(2.0) < 1e-5 && (s[0][1] - w(8.0)).abs() / w(8.0) < 1e-5,
            "{s:?}"
        );
        assert_eq!(knn_accuracy(&train, &test, 2, 2, t).0, 100.0);
        // k = 3 with a high temperature: the two label-1 votes outweigh the one label-0 vote.
        let s = knn_scores(&train, &test, 2, 3, 100.0);
        assert!(s[0][1] > s[0][0]);
        assert_eq!(knn_accuracy(&train, &test, 2, 3, 100.0).0, 0.0);
    }
}
