//! Tests of the colour ops and stages.

use super::ops::*;
use super::*;
use crate::augment::pixel::*;
use crate::augment::testing::*;
use proptest::prelude::*;

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6
}

fn assert_buf(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(close(g, w), "value {i}: got {g}, want {w}");
    }
}

/// A small hand-made image, as pixels.
fn pixels() -> Vec<[f32; 3]> {
    vec![
        [0.1, 0.5, 0.9],
        [1.0, 0.0, 0.0],
        [0.3, 0.3, 0.3],
        [0.9, 0.8, 0.1],
        [0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0],
        [0.25, 0.75, 0.5],
        [0.6, 0.2, 0.4],
        [0.05, 0.95, 0.45],
        [0.7, 0.7, 0.2],
        [0.2, 0.4, 0.6],
    ]
}

/// Pixels -> a planar buffer.
fn planar(px: &[[f32; 3]]) -> Vec<f32> {
    (0..3).flat_map(|c| px.iter().map(move |p| p[c])).collect()
}

/// A planar buffer -> pixels.
fn unplanar(buf: &[f32]) -> Vec<[f32; 3]> {
    let n = buf.len() / 3;
    (0..n).map(|i| [buf[i], buf[n + i], buf[2 * n + i]]).collect()
}

fn sample_buf() -> Vec<f32> {
    planar(&pixels())
}

/// Applies `f` to every pixel of `pixels()`, as a planar buffer.
fn expect(f: impl Fn([f32; 3]) -> [f32; 3]) -> Vec<f32> {
    planar(&pixels().into_iter().map(f).collect::<Vec<_>>())
}

#[test]
fn brightness_multiplies_and_clips() {
    for f in [0.2f32, 0.9, 1.7] {
        let mut buf = sample_buf();
        let want: Vec<f32> = buf.iter().map(|&x| (x * f).clamp(0.0, 1.0)).collect();
        brightness(&mut buf, f);
        assert_buf(&buf, &want);
    }
    let mut buf = sample_buf();
    let want: Vec<f32> = buf.iter().map(|&x| (x - 0.3).clamp(0.0, 1.0)).collect();
    brightness_add(&mut buf, -0.3);
    assert_buf(&buf, &want);
}

#[test]
fn contrast_scales_around_the_channel_or_gray_mean() {
    let w = GrayWeights::Tf.weights();
    let px = pixels();
    let n = px.len() as f32;
    let m: Vec<f32> = (0..3).map(|c| px.iter().map(|p| p[c]).sum::<f32>() / n).collect();
    let gray = w[0] * m[0] + w[1] * m[1] + w[2] * m[2];
    for f in [0.3f32, 1.6] {
        let mut buf = sample_buf();
        contrast(&mut buf, f, ContrastMean::Channel, w);
        assert_buf(&buf, &expect(|p| [0, 1, 2].map(|c| ((p[c] - m[c]) * f + m[c]).clamp(0.0, 1.0))));

        let mut buf = sample_buf();
        contrast(&mut buf, f, ContrastMean::Gray, w);
        assert_buf(&buf, &expect(|p| p.map(|x| ((x - gray) * f + gray).clamp(0.0, 1.0))));
    }
}

/// Reference RGB <-> HSV (the textbook formulas, written independently of the fast path).
fn rgb_to_hsv([r, g, b]: [f32; 3]) -> [f32; 3] {
    let v = r.max(g).max(b);
    let mn = r.min(g).min(b);
    let c = v - mn;
    let s = if v > 0.0 { c / v } else { 0.0 };
    let h = if c == 0.0 {
        0.0
    } else if v == r {
        ((g - b) / c).rem_euclid(6.0)
    } else if v == g {
        (b - r) / c + 2.0
    } else {
        (r - g) / c + 4.0
    };
    [h / 6.0, s, v]
}

fn hsv_to_rgb([h, s, v]: [f32; 3]) -> [f32; 3] {
    let h6 = h.rem_euclid(1.0) * 6.0;
    let c = v * s;
    let x = c * (1.0 - ((h6 % 2.0) - 1.0).abs());
    let (r, g, b) = match h6 as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [r + m, g + m, b + m]
}

#[test]
fn saturation_matches_hsv_and_blend_formulas() {
    let w = GrayWeights::Itu601.weights();
    for f in [0.0f32, 0.4, 1.0, 1.8] {
        let mut buf = sample_buf();
        saturation(&mut buf, f, SaturationMode::Hsv, w);
        let want = expect(|p| {
            let [h, s, v] = rgb_to_hsv(p);
            hsv_to_rgb([h, (s * f).clamp(0.0, 1.0), v])
        });
        for (i, (&g, &e)) in buf.iter().zip(&want).enumerate() {
            assert!((g - e).abs() < 1e-5, "f {f} value {i}: got {g}, want {e}");
        }

        let mut buf = sample_buf();
        saturation(&mut buf, f, SaturationMode::Blend, w);
        assert_buf(
            &buf,
            &expect(|p| {
                let l = w[0] * p[0] + w[1] * p[1] + w[2] * p[2];
                p.map(|x| (f * x + (1.0 - f) * l).clamp(0.0, 1.0))
            }),
        );
    }
}

#[test]
fn hue_third_turn_maps_red_to_green_to_blue() {
    let (red, green, blue) = ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]);
    let mut buf = planar(&[red, green, blue]);
    hue(&mut buf, 1.0 / 3.0);
    assert_buf(&buf, &planar(&[green, blue, red]));
    hue(&mut buf, -1.0 / 3.0);
    assert_buf(&buf, &planar(&[red, green, blue]));
    hue(&mut buf, 2.0 / 3.0);
    assert_buf(&buf, &planar(&[blue, red, green]));
}

#[test]
fn hue_matches_the_hsv_round_trip() {
    for shift in [-0.5f32, -0.2, 0.07, 0.2, 0.45, 0.5, 1.3] {
        let mut buf = sample_buf();
        hue(&mut buf, shift);
        let want = expect(|p| {
            let [h, s, v] = rgb_to_hsv(p);
            hsv_to_rgb([h + shift, s, v])
        });
        for (i, (&g, &e)) in buf.iter().zip(&want).enumerate() {
            assert!((g - e).abs() < 1e-5, "shift {shift} value {i}: got {g}, want {e}");
        }
    }
}

#[test]
fn grayscale_is_the_weighted_sum() {
    for weights in [GrayWeights::Tf, GrayWeights::Itu601] {
        let w = weights.weights();
        let mut buf = sample_buf();
        grayscale(&mut buf, w);
        for (p, q) in pixels().iter().zip(unplanar(&buf)) {
            let l = w[0] * p[0] + w[1] * p[1] + w[2] * p[2];
            assert!(q.iter().all(|&x| close(x, l.min(1.0))), "{p:?} -> {q:?}, want {l}");
        }
    }
}

#[test]
fn planar_load_and_store_round_trip() {
    let img = noise_image(5, 3, 9);
    let mut buf = Vec::new();
    load_planar(&img.data, &mut buf);
    for (p, q) in img.data.chunks(3).zip(unplanar(&buf)) {
        for c in 0..3 {
            assert!(close(q[c], f32::from(p[c]) / 255.0), "{p:?} -> {q:?}");
        }
    }
    let mut out = vec![0u8; img.data.len()];
    store_planar(&buf, &mut out);
    assert_eq!(out, img.data);
    let mut same = img.clone();
    with_f32(&mut same, |_| ());
    assert_eq!(same, img);
}

#[test]
fn u8_round_trip_is_exact_and_rounds_half_up() {
    for b in 0..=255u8 {
        assert_eq!(to_u8(to_unit(b)), b);
    }
    assert_eq!(to_u8(0.5 / 255.0 + 1e-6), 1);
    assert_eq!(to_u8(0.49 / 255.0), 0);
    assert_eq!(to_u8(1.5), 255);
    assert_eq!(to_u8(-0.5), 0);
}

#[test]
fn channel_means_are_exact_on_a_long_buffer() {
    let n = 100_001;
    let buf: Vec<f32> = (0..3 * n).map(|i| ((i * 7) % 13) as f32 / 13.0).collect();
    let got = channel_means(&buf);
    for (c, &g) in got.iter().enumerate() {
        let want = buf[c * n..(c + 1) * n].iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        assert!((f64::from(g) - want).abs() < 1e-5, "channel {c}: {g} vs {want}");
    }
}

#[test]
fn jitter_draws_stay_in_range_and_orders_are_permutations() {
    let j = Jitter::simclr(1.0);
    let mut seen_orders = std::collections::HashSet::new();
    for i in 0..2000 {
        let mut rng = ctx(3, i).rng(0);
        let d = j.draw(&mut rng);
        let [b, c, s, h] = d.factors;
        for f in [b, c, s] {
            assert!((0.2..=1.8).contains(&f), "factor {f}");
        }
        assert!((-0.2..=0.2).contains(&h));
        let mut o = d.order;
        o.sort_unstable();
        assert_eq!(o, [0, 1, 2, 3]);
        seen_orders.insert(d.order);
    }
    assert_eq!(seen_orders.len(), 24, "every order of the four ops occurs");
    let fixed = Jitter { random_order: false, ..j };
    assert_eq!(fixed.draw(&mut ctx(3, 0).rng(0)).order, [0, 1, 2, 3]);
}

#[test]
fn distort_rates_follow_p_jitter_and_p_gray() {
    let stage = ColorDistort {
        strength: 1.0,
        p_jitter: 0.8,
        p_gray: 0.2,
        brightness: BrightnessMode::V2,
        contrast_mean: ContrastMean::Channel,
        saturation_mode: SaturationMode::Hsv,
        random_order: true,
        gray_weights: GrayWeights::Tf,
        views: None,
    };
    let img = noise_image(4, 4, 1);
    let (mut changed, mut gray) = (0, 0);
    let n = 1000;
    for i in 0..n {
        let out = run(&stage, vec![img.clone()], 9, i);
        changed += usize::from(out[0] != img);
        gray += usize::from(out[0].data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    }
    // Changed unless neither fires: 1 - 0.2 * 0.8 = 0.84.
    assert!((780..=900).contains(&changed), "changed {changed} of {n}");
    assert!((150..=250).contains(&gray), "gray {gray} of {n}");
}

#[test]
fn distort_is_deterministic_and_views_are_independent() {
    let stage: ColorDistort = serde_json::from_value(serde_json::json!({"p_jitter": 1.0})).unwrap();
    let img = noise_image(9, 7, 2);
    let a = run(&stage, vec![img.clone(), img.clone()], 5, 3);
    let b = run(&stage, vec![img.clone(), img.clone()], 5, 3);
    assert_eq!(a, b);
    assert_ne!(a[0], a[1]);
    let c = run(&stage, vec![img.clone(), img.clone()], 6, 3);
    assert_ne!(a, c);
    let only0: ColorDistort =
        serde_json::from_value(serde_json::json!({"p_jitter": 1.0, "views": [0]})).unwrap();
    let d = run(&only0, vec![img.clone(), img.clone()], 5, 3);
    assert_eq!(d[0], a[0]);
    assert_eq!(d[1], img);
}

#[test]
fn configs_parse_with_defaults_and_reject_unknown_fields() {
    let d: ColorDistort = serde_json::from_value(serde_json::json!({})).unwrap();
    assert_eq!(d.jitter(), Jitter::simclr(1.0));
    assert_eq!((d.p_jitter, d.p_gray), (0.8, 0.2));
    let j: ColorJitter = serde_json::from_value(serde_json::json!({})).unwrap();
    assert_eq!(j.jitter(), Jitter::simclr(1.0));
    assert!(serde_json::from_value::<ColorDistort>(serde_json::json!({"strenght": 1.0})).is_err());
    assert!(serde_json::from_value::<RandomGrayscale>(serde_json::json!({"weights": "bt709"})).is_err());
    let cx =
        Context { base_dir: ".".into(), seed: 0, stage_id: "c".into(), run_dir: None, ..Context::default() };
    let bad: ColorJitter = serde_json::from_value(serde_json::json!({"hue": 0.7, "p": 2.0})).unwrap();
    let mut out = Vec::new();
    bad.check(&cx, &mut out);
    assert_eq!(out.len(), 2, "{out:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn color_stages_keep_sizes(img in image(64), seed in any::<u64>()) {
        let distort: ColorDistort = serde_json::from_value(serde_json::json!({"p_gray": 0.5})).unwrap();
        let jit: ColorJitter =
            serde_json::from_value(serde_json::json!({"p": 1.0, "brightness_mode": "v1",
                "contrast_mean": "gray", "saturation_mode": "blend"})).unwrap();
        let gray: RandomGrayscale = serde_json::from_value(serde_json::json!({"p": 1.0})).unwrap();
        for stage in [&distort as &dyn MapStage, &jit, &gray] {
            let out = run(stage, vec![img.clone()], seed, 0);
            prop_assert!(well_formed(&out));
            prop_assert_eq!((out[0].width, out[0].height), (img.width, img.height));
        }
    }
}
