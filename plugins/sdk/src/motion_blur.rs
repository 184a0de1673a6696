//! A directional (motion) blur: the algorithm of the example plugin
//! `plugins/examples/motion_blur`, kept here so that the built-in kind `motion_blur_builtin`
//! runs the very same code and the plugin-overhead benchmark compares like with like.
//!
//! Per view, three draws from the call's seed ([`SeedRng`]): u (apply if u < p), the length
//! L ~ U(length) and the angle ~ U(angle) in degrees, counter-clockwise from the x axis. The
//! output pixel is the mean of n = max(1, round(L)) samples spaced one pixel apart along the
//! line through the pixel at that angle, centred on it; samples are bilinear, the edges
//! clamped. Float math, rounded once.

use crate::SeedRng;

/// The config schema (the plugin's and, in spirit, the built-in's).
pub const SCHEMA: &str = r#"{
  "type": "object",
  "additionalProperties": false,
  "properties": {
    "p": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5,
          "description": "probability of blurring a view"},
    "length": {"type": "array", "items": {"type": "number", "minimum": 1, "maximum": 64},
               "minItems": 2, "maxItems": 2, "default": [3, 9],
               "description": "range of the blur length in pixels, drawn uniformly"},
    "angle": {"type": "array", "items": {"type": "number", "minimum": -360, "maximum": 360},
              "minItems": 2, "maxItems": 2, "default": [0, 180],
              "description": "range of the direction in degrees (counter-clockwise), drawn uniformly"}
  }
}"#;

/// The parameters of a motion-blur stage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Probability of blurring a view.
    pub p: f64,
    /// Range of the length in pixels.
    pub length: [f64; 2],
    /// Range of the angle in degrees.
    pub angle: [f64; 2],
}

impl Default for Params {
    fn default() -> Self {
        Params { p: 0.5, length: [3.0, 9.0], angle: [0.0, 180.0] }
    }
}

impl Params {
    /// Reads a config object (missing fields take their defaults) and checks it.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        let mut p = Params::default();
        let obj = v.as_object().ok_or("the config must be an object")?;
        for (key, value) in obj {
            match key.as_str() {
                "p" => p.p = value.as_f64().ok_or("`p` must be a number")?,
                "length" => p.length = pair(value, "length")?,
                "angle" => p.angle = pair(value, "angle")?,
                other => return Err(format!("unknown field `{other}`")),
            }
        }
        p.check()?;
        Ok(p)
    }

    /// Ranges and order: p in [0, 1], 1 <= length <= 64, |angle| <= 360, min <= max.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.p) {
            return Err(format!("`p` = {} is not a probability (use a value from 0 to 1)", self.p));
        }
        for (name, [lo, hi], min, max) in
            [("length", self.length, 1.0, 64.0), ("angle", self.angle, -360.0, 360.0)]
        {
            if !(lo.is_finite() && hi.is_finite() && min <= lo && hi <= max) {
                return Err(format!(
                    "`{name}` = [{lo}, {hi}] is out of range (use values from {min} to {max})"
                ));
            }
            if lo > hi {
                return Err(format!(
                    "`{name}` = [{lo}, {hi}] has its minimum above its maximum (write [{hi}, {lo}])"
                ));
            }
        }
        Ok(())
    }
}

fn pair(v: &serde_json::Value, name: &str) -> Result<[f64; 2], String> {
    match v.as_array().map(|a| a.iter().map(serde_json::Value::as_f64).collect::<Vec<_>>()) {
        Some(a) if a.len() == 2 && a.iter().all(Option::is_some) => {
            Ok([a[0].unwrap_or(0.0), a[1].unwrap_or(0.0)])
        }
        _ => Err(format!("`{name}` must be two numbers [min, max]")),
    }
}

/// Draws this view's parameters from `seed` and writes the result into `dst` (same size as
/// `src`: `width * height * 3` bytes, RGB8).
pub fn apply(params: &Params, seed: u64, src: &[u8], width: usize, height: usize, dst: &mut [u8]) {
    let mut rng = SeedRng::new(seed);
    let u = rng.uniform();
    let length = rng.range(params.length[0], params.length[1]);
    let angle = rng.range(params.angle[0], params.angle[1]);
    if u < params.p {
        blur(src, width, height, length, angle, dst);
    } else {
        dst.copy_from_slice(src);
    }
}

/// The blur itself (see the module docs). `src` and `dst` hold `width * height * 3` bytes.
pub fn blur(src: &[u8], width: usize, height: usize, length: f64, angle_deg: f64, dst: &mut [u8]) {
    let (w, h) = (width, height);
    assert!(src.len() == w * h * 3 && dst.len() == src.len(), "motion blur: buffer sizes do not match");
    if w == 0 || h == 0 {
        return;
    }
    let n = (length.round().max(1.0)) as usize;
    let (sin, cos) = angle_deg.to_radians().sin_cos();
    let mut acc = vec![0f32; w * h * 3];
    let mut xs0 = vec![0usize; w];
    let mut xs1 = vec![0usize; w];
    let clamp = |v: isize, n: usize| v.clamp(0, n as isize - 1) as usize;
    for tap in 0..n {
        let t = tap as f64 - (n - 1) as f64 / 2.0;
        // Image rows go down: a counter-clockwise angle moves up.
        let (dx, dy) = (t * cos, -t * sin);
        let (fx, fy) = (dx.floor(), dy.floor());
        let (ax, ay) = ((dx - fx) as f32, (dy - fy) as f32);
        let (ix, iy) = (fx as isize, fy as isize);
        let w00 = (1.0 - ax) * (1.0 - ay);
        let w10 = ax * (1.0 - ay);
        let w01 = (1.0 - ax) * ay;
        let w11 = ax * ay;
        for x in 0..w {
            xs0[x] = clamp(x as isize + ix, w) * 3;
            xs1[x] = clamp(x as isize + ix + 1, w) * 3;
        }
        for y in 0..h {
            let r0 = &src[clamp(y as isize + iy, h) * w * 3..][..w * 3];
            let r1 = &src[clamp(y as isize + iy + 1, h) * w * 3..][..w * 3];
            let out = &mut acc[y * w * 3..][..w * 3];
            for ((o, &i0), &i1) in out.chunks_exact_mut(3).zip(&xs0).zip(&xs1) {
                for c in 0..3 {
                    o[c] += w00 * f32::from(r0[i0 + c])
                        + w10 * f32::from(r0[i1 + c])
                        + w01 * f32::from(r1[i0 + c])
                        + w11 * f32::from(r1[i1 + c]);
                }
            }
        }
    }
    let inv = 1.0 / n as f32;
    for (d, a) in dst.iter_mut().zip(&acc) {
        *d = (a * inv + 0.5).clamp(0.0, 255.0) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(w: usize, h: usize, seed: u64) -> Vec<u8> {
        let mut r = SeedRng::new(seed);
        (0..w * h * 3).map(|_| r.next_u64() as u8).collect()
    }

    #[test]
    fn length_one_is_identity() {
        let src = noise(7, 5, 1);
        let mut dst = vec![0; src.len()];
        blur(&src, 7, 5, 1.0, 33.0, &mut dst);
        assert_eq!(src, dst);
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 9 * 4 * 3];
        let mut dst = vec![0; src.len()];
        blur(&src, 9, 4, 7.3, 21.0, &mut dst);
        assert!(dst.iter().all(|&v| v == 77));
    }

    #[test]
    fn horizontal_blur_averages_along_rows_only() {
        // A vertical stripe pattern blurred vertically is unchanged; horizontally it is smoothed.
        let (w, h) = (8, 6);
        let src: Vec<u8> = (0..w * h).flat_map(|i| [if i % 2 == 0 { 0 } else { 200 }; 3]).collect();
        let mut v = vec![0; src.len()];
        blur(&src, w, h, 3.0, 90.0, &mut v);
        assert_eq!(v, src);
        let mut hz = vec![0; src.len()];
        blur(&src, w, h, 3.0, 0.0, &mut hz);
        assert!(hz[3 * 3] > 0 && hz[3 * 3] < 200, "{}", hz[9]);
    }

    #[test]
    fn apply_is_deterministic_and_p_zero_copies() {
        let src = noise(16, 16, 2);
        let params = Params { p: 1.0, ..Params::default() };
        let (mut a, mut b) = (vec![0; src.len()], vec![0; src.len()]);
        apply(&params, 9, &src, 16, 16, &mut a);
        apply(&params, 9, &src, 16, 16, &mut b);
        assert_eq!(a, b);
        assert_ne!(a, src);
        apply(&Params { p: 0.0, ..params }, 9, &src, 16, 16, &mut b);
        assert_eq!(b, src);
    }

    #[test]
    fn params_from_json_checks_ranges() {
        let ok = Params::from_json(&serde_json::json!({"p": 1, "length": [2, 5]})).unwrap();
        assert_eq!(ok, Params { p: 1.0, length: [2.0, 5.0], angle: [0.0, 180.0] });
        assert!(Params::from_json(&serde_json::json!({"length": [5, 2]}))
            .unwrap_err()
            .contains("minimum above"));
        assert!(Params::from_json(&serde_json::json!({"p": 2})).is_err());
        assert!(Params::from_json(&serde_json::json!({"size": 2})).unwrap_err().contains("unknown field"));
    }
}
