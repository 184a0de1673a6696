//! Scratch: forward convolution throughput on the inference backend.
use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use std::time::Instant;
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
    let out = side.div_ceil(s);
    let flops = 2.0 * (n * co * ci * 9 * out * out) as f64;
    for _ in 0..4 {
        let xt = Tensor::<Flex, 4>::from_data(x.clone(), &d);
        let wt = Tensor::<Flex, 4>::from_data(w.clone(), &d);
        let t = Instant::now();
        let y = simclr_train::cpu::conv::conv2d(xt, wt, s, 1);
        std::hint::black_box(y);
        let e = t.elapsed().as_secs_f64();
        println!("{:.3} s, {:.0} GFLOP/s", e, flops / e / 1e9);
    }
}
