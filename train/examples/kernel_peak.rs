fn main() {
    for _ in 0..3 {
        println!("{:.1} GFLOP/s", simclr_train::cpu::bench_kernel(2_000_000));
    }
}
