//! Writes what `scripts/torchvision_check.py` compares against torchvision: a ResNet-18 (CIFAR
//! stem, width 1) trained for a few steps on random data, its `encoder.safetensors`, a batch of
//! inputs and the encoder's eval-mode output h on them.
//!
//! `cargo run --release -p simclr-train --example torchvision_check -- OUT_DIR`

use std::io::Write;
use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use simclr_train::export::write_safetensors;
use simclr_train::trainer::checkpoint_metadata;
use simclr_train::{make_engine, SimclrTrain};

fn write_f32(path: &std::path::Path, v: &[f32]) {
    let mut f = std::fs::File::create(path).expect("create");
    for x in v {
        f.write_all(&x.to_le_bytes()).expect("write");
    }
}

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "torchvision-check".into()));
    std::fs::create_dir_all(&out).expect("output folder");
    let cfg: SimclrTrain = serde_json::from_value(serde_json::json!({
        "optimizer": {"kind": "sgd", "lr": 0.05, "lr_scaling": "none"}
    }))
    .expect("config");
    let mut engine = make_engine(&cfg, 7).expect("engine");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let (n, side) = (4, 32);
    let len = n * 3 * side * side;
    for _ in 0..3 {
        let a: Vec<f32> = (0..len).map(|_| rng.random::<f32>()).collect();
        let b: Vec<f32> = (0..len).map(|_| rng.random::<f32>()).collect();
        let s = engine.step(&a, &b, [n, 3, side, side], 0.05).expect("step");
        println!("loss {:.4}", s.loss);
    }
    let x: Vec<f32> = (0..len).map(|_| rng.random::<f32>()).collect();
    let h = engine.encode(&x, [n, 3, side, side]).expect("encode");
    write_f32(&out.join("input.f32"), &x);
    write_f32(&out.join("h.f32"), &h);
    let meta = checkpoint_metadata(&cfg, engine.steps(), 1);
    write_safetensors(&out.join("encoder.safetensors"), &engine.encoder_tensors(), &meta).expect("save");
    println!("wrote {} ({} features per image)", out.display(), h.len() / n);
}
