//! The optimizer update of one parameter tensor in one parallel pass (two with LARS's norms)
//! on the CPU backend, instead of ~10 single-threaded tensor ops: the same arithmetic as
//! [`crate::optim::Optimizer::update`]'s tensor version, element by element in f32.

use rayon::prelude::*;

use crate::config::{OptimizerConfig, OptimizerKind};

/// Elements per parallel chunk (fixed: norms are summed per chunk in order, so the result does
/// not depend on the thread count).
const CHUNK: usize = 1 << 15;

/// One step's constants.
pub(crate) struct Step<'a> {
    pub cfg: &'a OptimizerConfig,
    pub lr: f64,
    pub decay: f64,
    /// Biases and BatchNorm parameters with `exclude_bias_and_bn` (LARS trust ratio 1).
    pub excluded: bool,
    /// Optimizer steps so far, this one included (AdamW's bias correction).
    pub t: i32,
}

/// Updates `w` in place given its gradient `g`; `state` holds the previous momentum (LARS,
/// SGD) or moments (AdamW), empty on the first step, and the new ones after.
pub(crate) fn update(s: &Step, w: &mut [f32], g: &[f32], state: &mut Vec<Vec<f32>>) {
    let c = s.cfg;
    let n = w.len();
    let (lr, decay, m) = (s.lr as f32, s.decay as f32, c.momentum as f32);
    let fresh = state.is_empty();
    match c.kind {
        OptimizerKind::Lars => {
            // g' = g + decay w; trust = eta |w| / |g'| (1 if either is 0).
            let scale = if s.excluded {
                lr
            } else {
                let (wn, gn) = norms(w, g, decay);
                let trust = if wn <= 0.0 || gn <= 0.0 { 1.0 } else { (wn * c.eta / gn) as f32 };
                trust * lr
            };
            if fresh {
                state.push(vec![0.0; n]);
            }
            let nesterov = c.nesterov;
            chunks3(w, g, &mut state[0], |w, g, v| {
                for i in 0..w.len() {
                    let gi = if decay > 0.0 { g[i] + w[i] * decay } else { g[i] };
                    let scaled = gi * scale;
                    v[i] = if fresh { scaled } else { v[i] * m + scaled };
                    let upd = if nesterov { v[i] * m + scaled } else { v[i] };
                    w[i] -= upd;
                }
            });
        }
        OptimizerKind::Sgd => {
            if fresh {
                state.push(vec![0.0; n]);
            }
            let nesterov = c.nesterov;
            chunks3(w, g, &mut state[0], |w, g, v| {
                for i in 0..w.len() {
                    let gi = if decay > 0.0 { g[i] + w[i] * decay } else { g[i] };
                    v[i] = if fresh { gi } else { v[i] * m + gi };
                    let dir = if nesterov { gi + v[i] * m } else { v[i] };
                    w[i] -= dir * lr;
                }
            });
        }
        OptimizerKind::Adamw => {
            if fresh {
                state.push(vec![0.0; n]);
                state.push(vec![0.0; n]);
            }
            let [b1, b2] = c.betas;
            let (c1, c2) = ((1.0 - b1.powi(s.t)) as f32, (1.0 - b2.powi(s.t)) as f32);
            // Every scalar rounded from f64 once, as the tensor version's scalar ops do.
            let (b1c, b2c) = ((1.0 - b1) as f32, (1.0 - b2) as f32);
            let (b1, b2, eps, wd) = (b1 as f32, b2 as f32, c.eps as f32, (s.lr * s.decay) as f32);
            let (ms, vs) = state.split_at_mut(1);
            w.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(ms[0].par_chunks_mut(CHUNK).zip(vs[0].par_chunks_mut(CHUNK)))
                .for_each(|((w, g), (mm, vv))| {
                    for i in 0..w.len() {
                        let wi = if decay > 0.0 { w[i] - w[i] * wd } else { w[i] };
                        mm[i] = mm[i] * b1 + g[i] * b1c;
                        vv[i] = vv[i] * b2 + g[i] * g[i] * b2c;
                        let (mhat, vhat) = (mm[i] / c1, vv[i] / c2);
                        w[i] = wi - mhat / (vhat.sqrt() + eps) * lr;
                    }
                });
        }
    }
}

/// (|w|, |g + decay w|) in f64, per chunk in order.
fn norms(w: &[f32], g: &[f32], decay: f32) -> (f64, f64) {
    let parts: Vec<(f64, f64)> = w
        .par_chunks(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .map(|(w, g)| {
            let (mut a, mut b) = (0f64, 0f64);
            for i in 0..w.len() {
                let gi = if decay > 0.0 { g[i] + w[i] * decay } else { g[i] };
                a += f64::from(w[i]) * f64::from(w[i]);
                b += f64::from(gi) * f64::from(gi);
            }
            (a, b)
        })
        .collect();
    let (a, b) = parts.iter().fold((0.0, 0.0), |s, p| (s.0 + p.0, s.1 + p.1));
    (a.sqrt(), b.sqrt())
}

/// `f` over matching chunks of three slices, in parallel.
fn chunks3(w: &mut [f32], g: &[f32], v: &mut [f32], f: impl Fn(&mut [f32], &[f32], &mut [f32]) + Sync) {
    w.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|((w, g), v)| f(w, g, v));
}
