//! `simclr preview`: a grid with, per row, a source image and its augmented views.

use std::path::Path;

use simclr_core::driver::{build_chain, Mode};
use simclr_core::rng::stage_key;
use simclr_core::runtime::epoch_order;
use simclr_core::{Image, Payload, Plan, RunError, SampleCtx};

/// Nearest-neighbour resize of an image into a `side` x `side` cell (letterboxed).
fn fit(img: &Image, side: u32) -> Image {
    let mut out = Image::new(side, side);
    out.data.fill(40);
    if img.width == 0 || img.height == 0 {
        return out;
    }
    let scale = f64::from(side) / f64::from(img.width.max(img.height));
    let (w, h) =
        (((f64::from(img.width) * scale) as u32).max(1), ((f64::from(img.height) * scale) as u32).max(1));
    let (ox, oy) = ((side - w.min(side)) / 2, (side - h.min(side)) / 2);
    for y in 0..h.min(side) {
        let sy = ((f64::from(y) / scale) as u32).min(img.height - 1);
        for x in 0..w.min(side) {
            let sx = ((f64::from(x) / scale) as u32).min(img.width - 1);
            let s = ((sy * img.width + sx) * 3) as usize;
            let d = (((oy + y) * side + ox + x) * 3) as usize;
            out.data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    out
}

/// Runs the first `n` samples of the plan's first chain through its per-sample stages and
/// returns (source image, views) per sample.
pub fn collect(plan: &Plan, n: usize) -> Result<Vec<(Image, Vec<Image>)>, RunError> {
    let chains = plan.chains();
    let chain = chains.first().ok_or_else(|| RunError::Internal("no source stage".into()))?;
    let stages = build_chain(plan, chain, Mode::DataOnly, None, &simclr_core::Artifacts::default())?;
    let (src_info, source) = &stages.source;
    let mut rows = Vec::new();
    let order = epoch_order(source.len(), &source.options(), plan.spec.seed, 0, &src_info.id);
    for index in order.take(n) {
        let fail = |id: &str, kind: &str, e: simclr_core::StageError| RunError::Sample {
            stage: id.to_string(),
            kind: kind.to_string(),
            sample: index,
            name: None,
            message: e.to_string(),
        };
        let cx = |id: &str| SampleCtx { seed: plan.spec.seed, stage_key: stage_key(id), epoch: 0, index };
        let mut sample =
            source.read(index, &cx(&src_info.id)).map_err(|e| fail(&src_info.id, &src_info.kind, e))?;
        let mut original = None;
        for (info, stage) in &stages.maps {
            if original.is_none() {
                if let Payload::Views(v) = &sample.payload {
                    original = v.first().cloned();
                }
            }
            if !matches!(sample.payload, Payload::Views(_) | Payload::Encoded(_)) {
                break;
            }
            if matches!(sample.payload, Payload::Views(_)) && info.kind == "to_tensor" {
                break;
            }
            stage.apply(&mut sample, &cx(&info.id)).map_err(|e| fail(&info.id, &info.kind, e))?;
        }
        let Payload::Views(views) = sample.payload else {
            return Err(RunError::Internal("the pipeline makes no image views to preview".into()));
        };
        let original = original.or_else(|| views.first().cloned()).unwrap_or_default();
        rows.push((original, views));
    }
    Ok(rows)
}

/// Lays rows out as a grid of `cell`-pixel squares with 4-pixel gutters.
pub fn grid(rows: &[(Image, Vec<Image>)], cell: u32) -> Image {
    let cols = rows.iter().map(|(_, v)| v.len() + 1).max().unwrap_or(1) as u32;
    let gap = 4;
    let (w, h) = (cols * (cell + gap) + gap, rows.len() as u32 * (cell + gap) + gap);
    let mut out = Image::new(w, h);
    out.data.fill(255);
    for (r, (orig, views)) in rows.iter().enumerate() {
        for (c, img) in std::iter::once(orig).chain(views).enumerate() {
            let tile = fit(img, cell);
            let (x0, y0) = (gap + c as u32 * (cell + gap), gap + r as u32 * (cell + gap));
            for y in 0..cell {
                let d = (((y0 + y) * w + x0) * 3) as usize;
                let s = (y * cell * 3) as usize;
                out.data[d..d + (cell * 3) as usize].copy_from_slice(&tile.data[s..s + (cell * 3) as usize]);
            }
        }
    }
    out
}

/// Writes the preview PNG.
pub fn write_png(img: &Image, path: &Path) -> Result<(), String> {
    image::save_buffer(path, &img.data, img.width, img.height, image::ExtendedColorType::Rgb8)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_places_tiles_in_rows_and_columns() {
        let red = Image { width: 1, height: 1, data: vec![255, 0, 0] };
        let blue = Image { width: 2, height: 2, data: [0, 0, 255].repeat(4) };
        let g = grid(&[(red.clone(), vec![blue.clone(), blue]), (red.clone(), vec![])], 8);
        assert_eq!((g.width, g.height), (3 * 12 + 4, 2 * 12 + 4));
        let px =
            |x: u32, y: u32| &g.data[((y * g.width + x) * 3) as usize..((y * g.width + x) * 3 + 3) as usize];
        assert_eq!(px(5, 5), &[255, 0, 0]);
        assert_eq!(px(4 + 12 + 2, 5), &[0, 0, 255]);
        assert_eq!(px(4 + 12 + 2, 12 + 5), &[255, 255, 255]); // row 2 has no views
    }
}
