//! Scratch: backward of one convolution layer, repeated (for profiling).
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};
use std::time::Instant;
type B = Autodiff<Flex>;
fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (ci, side, co, s) = (args[0], args[1], args[2], args[3]);
    let n = 256;
    let x = TensorData::new(
        (0..n * ci * side * side).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>(),
        [n, ci, side, side],
    );
    let w = TensorData::new(vec![0.01f32; co * ci * 9], [co, ci, 3, 3]);
    let d = Default::default();
    for _ in 0..4 {
        let xt = Tensor::<B, 4>::from_data(x.clone(), &d).require_grad();
        let wt = Tensor::<B, 4>::from_data(w.clone(), &d).require_grad();
        let y = simclr_train::cpu::conv::conv2d(xt.clone(), wt.clone(), s, 1).sum();
        let t = Instant::now();
        let g = y.backward();
        std::hint::black_box((xt.grad(&g), wt.grad(&g)));
        println!("backward {:.3} s", t.elapsed().as_secs_f64());
    }
}
