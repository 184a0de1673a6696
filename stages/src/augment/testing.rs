//! Helpers for the augmentation stages' tests.

use proptest::prelude::*;
use simclr_core::{Image, MapStage, Payload, Sample, SampleCtx};

pub fn ctx(seed: u64, index: u64) -> SampleCtx {
    SampleCtx { seed, stage_key: 0xA5A5, epoch: 0, index }
}

/// Runs a stage on a sample holding `views`, returning the views.
pub fn run(stage: &dyn MapStage, views: Vec<Image>, seed: u64, index: u64) -> Vec<Image> {
    let mut s = Sample { index, payload: Payload::Views(views), ..Sample::default() };
    stage.apply(&mut s, &ctx(seed, index)).expect("the stage failed");
    match s.payload {
        Payload::Views(v) => v,
        other => panic!("the stage changed the payload to {other:?}"),
    }
}

/// Random images from 1x1 to `max` x `max`.
pub fn image(max: u32) -> impl Strategy<Value = Image> {
    (1..=max, 1..=max).prop_flat_map(|(w, h)| {
        proptest::collection::vec(any::<u8>(), (w * h * 3) as usize)
            .prop_map(move |data| Image::from_raw(w, h, data).unwrap())
    })
}

/// A deterministic pseudo-random image.
pub fn noise_image(w: u32, h: u32, seed: u64) -> Image {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data = (0..w * h * 3)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    Image::from_raw(w, h, data).unwrap()
}

/// Every view's buffer matches its size.
pub fn well_formed(views: &[Image]) -> bool {
    views.iter().all(|v| v.data.len() == v.width as usize * v.height as usize * 3)
}
