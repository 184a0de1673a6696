//! Charts as PNG files: bars, a heatmap and lines, drawn with plotters into memory and written
//! with the `image` crate. Text uses DejaVu Sans embedded in the binary (assets/), so charts
//! look the same on a machine without fonts. Data may hold NaN or infinities, be empty or a
//! single point: such values are left out (or shown as "n/a"), never a panic.

use std::ops::Range;
use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

const FONT: &str = "sans-serif";
static DEJAVU: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Colors of line series, in order (Tableau 10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Registers the embedded font once per process.
fn font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU).is_ok());
    anyhow::ensure!(ok, "the embedded chart font could not be loaded");
    Ok(())
}

/// Draws on a `w` x `h` white canvas with `draw`, then writes it to `path` as PNG.
fn render(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>,
) -> Result<()> {
    font()?;
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    image::save_buffer(path, &buf, w, h, image::ExtendedColorType::Rgb8)
        .with_context(|| format!("cannot write the chart {}", path.display()))
}

/// Plotters' errors borrow nothing but are not always `Sync`; keep their text.
fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart failed: {e}")
}

/// A range covering `values` (finite ones), padded, never empty; `zero` includes 0.
fn range(values: impl IntoIterator<Item = f64>, zero: bool) -> Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.into_iter().filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if zero {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return 0.0..1.0;
    }
    if hi - lo < 1e-12 * hi.abs().max(1.0) {
        let pad = if hi.abs() > 0.0 { hi.abs() * 0.05 } else { 0.5 };
        return lo - pad..hi + pad;
    }
    let pad = (hi - lo) * 0.05;
    let lo2 = if zero && lo >= 0.0 { lo } else { lo - pad };
    let hi2 = if zero && hi <= 0.0 { hi } else { hi + pad };
    lo2..hi2
}

/// A short number: 3 significant digits, no trailing noise.
fn short(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// `n` (at least 1) equal segments, 0 at the bottom or left. Plotters' integer ranges
/// include their end, so `0..n - 1` has `n` values.
fn segments(n: usize) -> plotters::coord::ranged1d::SegmentedCoord<plotters::coord::types::RangedCoordi32> {
    (0..(n.max(1) as i32 - 1)).into_segmented()
}

/// A tick label with as many decimals as the axis span needs (about ten ticks).
fn tick(v: f64, axis: &Range<f64>) -> String {
    let step = (axis.end - axis.start).abs() / 10.0;
    if !v.is_finite() || !step.is_finite() || step <= 0.0 {
        return short(v);
    }
    let a = v.abs().max(step);
    if !(1e-4..1e6).contains(&a) {
        return format!("{v:.1e}");
    }
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{v:.decimals$}")
}

/// Width in pixels of `s` in the chart font at `size`, roughly (0.6 em per character).
fn text_width(s: &str, size: u32) -> u32 {
    (s.chars().count() as u32 * size * 6).div_ceil(10)
}

/// A horizontal bar chart: one bar per `(label, value)`, top to bottom, the value written at
/// its end; a missing or non-finite value is written as "n/a" with no bar.
pub fn bar_chart(path: &Path, title: &str, value_label: &str, bars: &[(String, Option<f64>)]) -> Result<()> {
    let n = bars.len().max(1);
    let label_w = bars.iter().map(|(l, _)| text_width(l, 15)).max().unwrap_or(40).clamp(40, 360) + 16;
    let size = (900 + label_w.saturating_sub(200), 120 + 34 * n as u32);
    let values: Vec<f64> = bars.iter().filter_map(|(_, v)| *v).filter(|v| v.is_finite()).collect();
    let mut x = range(values.iter().copied(), true);
    // Room for the value text at the end of the longest bar.
    x.end += (x.end - x.start) * 0.08;
    render(path, size, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(label_w)
            .build_cartesian_2d(x.clone(), segments(n))
            .map_err(plot_err)?;
        let label = |v: &SegmentValue<i32>| match v {
            // Segment i from the top: row 0 is drawn highest.
            SegmentValue::CenterOf(i) => {
                bars.get(n.saturating_sub(1 + *i as usize)).map(|(l, _)| l.clone()).unwrap_or_default()
            }
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&label)
            .x_desc(value_label)
            .x_label_formatter(&|v| tick(*v, &x))
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 16))
            .draw()
            .map_err(plot_err)?;
        let base = x.start.max(0.0).min(x.end);
        for (i, (_, v)) in bars.iter().enumerate() {
            let row = (n - 1 - i) as i32;
            match v.filter(|v| v.is_finite()) {
                Some(v) => {
                    let mut bar = Rectangle::new(
                        [(base, SegmentValue::Exact(row)), (v, SegmentValue::Exact(row + 1))],
                        PALETTE[0].filled(),
                    );
                    // A gap between neighbouring bars.
                    bar.set_margin(5, 5, 0, 0);
                    chart.draw_series(std::iter::once(bar)).map_err(plot_err)?;
                    let at = (v.max(base), SegmentValue::CenterOf(row));
                    let style = TextStyle::from((FONT, 15)).pos(Pos::new(HPos::Left, VPos::Center));
                    chart
                        .draw_series(std::iter::once(Text::new(format!(" {}", short(v)), at, style)))
                        .map_err(plot_err)?;
                }
                None => {
                    let style = TextStyle::from((FONT, 15))
                        .color(&RGBColor(120, 120, 120))
                        .pos(Pos::new(HPos::Left, VPos::Center));
                    chart
                        .draw_series(std::iter::once(Text::new(
                            " n/a",
                            (base, SegmentValue::CenterOf(row)),
                            style,
                        )))
                        .map_err(plot_err)?;
                }
            }
        }
        Ok(())
    })
}

/// Viridis at `t` in [0, 1] (a few stops, linearly interpolated).
fn viridis(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 6] =
        [(68, 1, 84), (65, 68, 135), (42, 120, 142), (34, 168, 132), (122, 209, 81), (253, 231, 37)];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let f = t * (STOPS.len() - 1) as f64;
    let i = (f.floor() as usize).min(STOPS.len() - 2);
    let u = f - i as f64;
    let lerp = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * u).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(lerp(a.0, b.0), lerp(a.1, b.1), lerp(a.2, b.2))
}

/// A heatmap: `values[r][c]` for row `rows[r]` (top to bottom) and column `cols[c]`, each cell
/// colored (viridis, over the finite values) and labelled with its value; a missing cell is
/// gray and labelled "n/a".
pub fn heatmap(
    path: &Path,
    title: &str,
    row_label: &str,
    col_label: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<Option<f64>>],
) -> Result<()> {
    let (nr, nc) = (rows.len().max(1), cols.len().max(1));
    let cell = 84u32;
    let label_w = rows.iter().map(|l| text_width(l, 15)).max().unwrap_or(40).clamp(40, 300) + 40;
    let finite: Vec<f64> = values.iter().flatten().filter_map(|v| *v).filter(|v| v.is_finite()).collect();
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let scale = move |v: f64| if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
    let caption = if finite.is_empty() {
        format!("{title} (no values yet)")
    } else {
        format!("{title} ({} to {})", short(lo), short(hi))
    };
    let width = (label_w + cell * nc as u32 + 60).max(text_width(&caption, 20) + 40);
    let size = (width, 150 + cell * nr as u32);
    render(path, size, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(caption, (FONT, 20))
            .margin(16)
            .x_label_area_size(56)
            .y_label_area_size(label_w)
            .build_cartesian_2d(segments(nc), segments(nr))
            .map_err(plot_err)?;
        let col_name = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) => cols.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        let row_name = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) => {
                rows.get(nr.saturating_sub(1 + *i as usize)).cloned().unwrap_or_default()
            }
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(nc)
            .y_labels(nr)
            .x_label_formatter(&col_name)
            .y_label_formatter(&row_name)
            .x_desc(col_label)
            .y_desc(row_label)
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 16))
            .draw()
            .map_err(plot_err)?;
        for r in 0..rows.len() {
            for c in 0..cols.len() {
                let v = values.get(r).and_then(|row| row.get(c)).copied().flatten().filter(|v| v.is_finite());
                let y = (nr - 1 - r) as i32;
                let x = c as i32;
                let (fill, text, ink) = match v {
                    Some(v) => {
                        let t = scale(v);
                        (viridis(t), short(v), if t > 0.6 { BLACK } else { WHITE })
                    }
                    None => (RGBColor(225, 225, 225), "n/a".to_string(), RGBColor(110, 110, 110)),
                };
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [
                            (SegmentValue::Exact(x), SegmentValue::Exact(y + 1)),
                            (SegmentValue::Exact(x + 1), SegmentValue::Exact(y)),
                        ],
                        fill.filled(),
                    )))
                    .map_err(plot_err)?;
                // A white gap between cells.
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [
                            (SegmentValue::Exact(x), SegmentValue::Exact(y + 1)),
                            (SegmentValue::Exact(x + 1), SegmentValue::Exact(y)),
                        ],
                        WHITE.stroke_width(2),
                    )))
                    .map_err(plot_err)?;
                let style = TextStyle::from((FONT, 17)).color(&ink).pos(Pos::new(HPos::Center, VPos::Center));
                chart
                    .draw_series(std::iter::once(Text::new(
                        text,
                        (SegmentValue::CenterOf(x), SegmentValue::CenterOf(y)),
                        style,
                    )))
                    .map_err(plot_err)?;
            }
        }
        Ok(())
    })
}

// The run report (training curves: loss, contrast_acc, lr, kNN) draws with it.
/// A line chart of one or more series of `(x, y)` points (a legend when there are several).
/// Non-finite points are left out and break the line there; a lone point is drawn as a dot.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let points = || series.iter().flat_map(|(_, pts)| pts.iter().filter(finite));
    let x = range(points().map(|p| p.0), false);
    let y = range(points().map(|p| p.1), false);
    let empty = points().next().is_none();
    render(path, (900, 560), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(if empty { format!("{title} (no data)") } else { title.to_string() }, (FONT, 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(x.clone(), y.clone())
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&|v| tick(*v, &x))
            .y_label_formatter(&|v| tick(*v, &y))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(plot_err)?;
        for (k, (name, pts)) in series.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            // Split at non-finite points: each run of finite points is one line.
            let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
            for p in pts {
                if p.0.is_finite() && p.1.is_finite() {
                    if let Some(run) = runs.last_mut() {
                        run.push(*p);
                    }
                } else if runs.last().is_some_and(|r| !r.is_empty()) {
                    runs.push(Vec::new());
                }
            }
            let mut legend_done = false;
            for run in runs.iter().filter(|r| !r.is_empty()) {
                let drawn = if run.len() == 1 {
                    chart
                        .draw_series(run.iter().map(|&p| Circle::new(p, 4, color.filled())))
                        .map_err(plot_err)?
                } else {
                    chart
                        .draw_series(LineSeries::new(run.iter().copied(), color.stroke_width(2)))
                        .map_err(plot_err)?
                };
                if !legend_done && series.len() > 1 {
                    legend_done = true;
                    drawn.label(*name).legend(move |(lx, ly)| {
                        PathElement::new(vec![(lx, ly), (lx + 20, ly)], color.stroke_width(3))
                    });
                }
            }
        }
        if series.len() > 1 && !empty {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font((FONT, 15))
                .draw()
                .map_err(plot_err)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder; `SIMCLR_PLOT_DIR=DIR` keeps the charts there, to look at them.
    struct Out(Option<tempfile::TempDir>, std::path::PathBuf);

    impl Out {
        fn path(&self) -> &Path {
            self.0.as_ref().map_or(self.1.as_path(), |t| t.path())
        }
    }

    fn dir() -> Out {
        match std::env::var_os("SIMCLR_PLOT_DIR") {
            Some(d) => {
                std::fs::create_dir_all(&d).unwrap();
                Out(None, d.into())
            }
            None => Out(Some(tempfile::tempdir().unwrap()), std::path::PathBuf::new()),
        }
    }

    fn png(path: &Path) -> image::RgbImage {
        image::open(path).unwrap().to_rgb8()
    }

    /// Pixels that are neither white nor near-white: something was drawn.
    fn inked(img: &image::RgbImage) -> usize {
        img.pixels().filter(|p| p.0.iter().any(|&c| c < 200)).count()
    }

    #[test]
    fn ranges_are_never_empty_or_nan() {
        assert_eq!(range([], false), 0.0..1.0);
        assert_eq!(range([f64::NAN, f64::INFINITY], false), 0.0..1.0);
        let r = range([3.0], false);
        assert!(r.start < 3.0 && r.end > 3.0);
        let r = range([0.0, 0.0], false);
        assert!(r.start < 0.0 && r.end > 0.0);
        let r = range([40.0, 60.0], true);
        assert_eq!(r.start, 0.0);
        assert!(r.end > 60.0);
    }

    #[test]
    fn line_chart_survives_empty_single_and_nan_data() {
        let d = dir();
        type Series = Vec<(&'static str, Vec<(f64, f64)>)>;
        let cases: Vec<(&str, Series)> = vec![
            ("empty", vec![]),
            ("empty-series", vec![("loss", vec![])]),
            ("single", vec![("loss", vec![(1.0, 2.0)])]),
            (
                "nan",
                vec![(
                    "loss",
                    vec![(0.0, f64::NAN), (1.0, 1.0), (2.0, f64::INFINITY), (3.0, 0.5), (4.0, 0.25)],
                )],
            ),
            ("all-nan", vec![("a", vec![(f64::NAN, f64::NAN)]), ("b", vec![])]),
        ];
        for (name, series) in cases {
            let p = d.path().join(format!("{name}.png"));
            line_chart(&p, name, "step", "value", &series).unwrap();
            assert_eq!(png(&p).dimensions(), (900, 560), "{name}");
        }
    }

    #[test]
    fn line_chart_draws_each_series_in_its_color_with_a_legend() {
        let d = dir();
        let p = d.path().join("two.png");
        let a: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, (i as f64 / 10.0).exp().recip())).collect();
        let b: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, 0.5 + 0.01 * i as f64)).collect();
        line_chart(&p, "curves", "epoch", "value", &[("loss", a), ("acc", b)]).unwrap();
        let img = png(&p);
        let has = |c: RGBColor| img.pixels().filter(|px| px.0 == [c.0, c.1, c.2]).count();
        assert!(has(PALETTE[0]) > 100, "first series not drawn");
        assert!(has(PALETTE[1]) > 100, "second series not drawn");
        assert!(inked(&img) > 2000);
    }

    #[test]
    fn bar_chart_and_heatmap_write_pngs() {
        let d = dir();
        let p = d.path().join("bars.png");
        let bars = vec![
            ("base".to_string(), Some(71.2)),
            ("no-color".into(), None),
            ("weak".into(), Some(f64::NAN)),
        ];
        bar_chart(&p, "linear top-1", "%", &bars).unwrap();
        let img = png(&p);
        // One bar (the NaN and missing values have none).
        assert!(img.pixels().filter(|px| px.0 == [PALETTE[0].0, PALETTE[0].1, PALETTE[0].2]).count() > 1000);
        assert!(inked(&img) > 1000);
        bar_chart(&d.path().join("none.png"), "t", "%", &[]).unwrap();

        let p = d.path().join("heat.png");
        let names: Vec<String> = ["crop", "color"].iter().map(|s| s.to_string()).collect();
        heatmap(
            &p,
            "top-1",
            "1st",
            "2nd",
            &names,
            &names,
            &[vec![Some(10.0), None], vec![Some(20.0), Some(56.5)]],
        )
        .unwrap();
        let img = png(&p);
        // The top value is the brightest viridis color.
        let top = viridis(1.0);
        assert!(img.pixels().filter(|px| px.0 == [top.0, top.1, top.2]).count() > 1000);
        heatmap(&d.path().join("empty.png"), "t", "r", "c", &[], &[], &[]).unwrap();
    }
}
