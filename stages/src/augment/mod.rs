//! Per-view augmentation stages. Each is a pure function of (view, its random stream): the
//! stream of view `v` of sample `i` for stage `s` is keyed by (seed, epoch, i, v, s).

use simclr_core::{Problem, Sample, SampleCtx, StageError, StageRng};

pub mod blur;
pub mod color;
pub mod crop;
pub mod cutout;
pub mod flip;
pub mod motion_blur;
pub mod noise;
pub mod pixel;
pub mod rotate;
pub mod sobel;
#[cfg(test)]
pub(crate) mod testing;
pub mod tone;
pub mod views;

/// Runs `f` on each selected view of a sample with that view's random stream
/// ([`simclr_core::for_each_view`] without the view number).
pub fn for_each_view(
    sample: &mut Sample,
    views: Option<&[u32]>,
    ctx: &SampleCtx,
    mut f: impl FnMut(&mut simclr_core::Image, &mut StageRng) -> Result<(), StageError>,
) -> Result<(), StageError> {
    simclr_core::for_each_view(sample, views, ctx, |_, img, rng| f(img, rng))
}

/// Checks a `views:` selection.
pub fn check_views(views: Option<&[u32]>, out: &mut Vec<Problem>) {
    if let Some(v) = views {
        if v.is_empty() || v.iter().any(|&x| x > 15) {
            out.push(Problem::new(
                "views",
                "`views` must list view numbers from 0 to 15",
                "write e.g. `views: [0]` for the first branch only",
            ));
        }
    }
}

/// Checks a probability field.
pub fn check_p(field: &str, p: f32, out: &mut Vec<Problem>) {
    if !(0.0..=1.0).contains(&p) || !p.is_finite() {
        out.push(Problem::new(
            field,
            format!("`{field}` = {p} is not a probability"),
            "use a value from 0 to 1",
        ));
    }
}
