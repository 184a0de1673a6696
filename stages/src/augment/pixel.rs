//! Pixel helpers the augmentation stages share: branch-free scalar selects that compile to
//! min/max instructions, u8 <-> [0, 1] conversions, uniform draws and the view size check.

use rand::Rng;
use simclr_core::{Image, StageError, StageRng};

#[inline(always)]
pub(crate) fn fmax(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

#[inline(always)]
pub(crate) fn fmin(a: f32, b: f32) -> f32 {
    if a < b {
        a
    } else {
        b
    }
}

/// Clips to [0, 1]; NaN becomes 0.
#[inline(always)]
pub(crate) fn clamp01(x: f32) -> f32 {
    fmin(fmax(x, 0.0), 1.0)
}

/// A draw from U(lo, hi) (`lo` when the range is empty); never panics.
#[inline]
pub(crate) fn uniform(rng: &mut StageRng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.random::<f32>()
}

/// u8 -> [0, 1] (`b * (1/255)`; rounds back to `b` exactly through [`to_u8`]).
#[inline(always)]
pub fn to_unit(b: u8) -> f32 {
    f32::from(b) * (1.0 / 255.0)
}

/// [0, 1] -> u8, rounding half up (values outside [0, 1], and NaN, are clipped first).
#[inline(always)]
pub fn to_u8(x: f32) -> u8 {
    let y = clamp01(x) * 255.0 + 0.5;
    // SAFETY: y is finite and in [0.5, 255.5], so it fits an i32. (A plain saturating `as u8`
    // does not vectorize and costs 6x more.)
    unsafe { y.to_int_unchecked::<i32>() as u8 }
}

/// Checks that a view's buffer matches its size.
pub(crate) fn check_image(img: &Image) -> Result<(), StageError> {
    if img.data.len() != img.pixels() * 3 {
        return Err(StageError::fatal(format!(
            "a {}x{} view has {} bytes, not {}",
            img.width,
            img.height,
            img.data.len(),
            img.pixels() * 3
        )));
    }
    Ok(())
}
