//! PNG line charts with plotters: one line per series through the medians, min–max bars, a legend, and the median
//! written next to each point. Text is drawn with a TrueType font loaded at run time (DejaVu Sans from Debian's
//! fonts-dejavu-core by default, or `$PHAUL_BENCH_FONT`).

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::Stat;
use crate::{BenchError, Result};

/// The font used unless `$PHAUL_BENCH_FONT` names another.
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT: &str = "sans-serif";

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Phaul,
    Criu,
    CriuDashed,
    Raw,
    RawDashed,
    /// Context figures (grey).
    Context,
}

impl Style {
    fn color(self) -> RGBColor {
        match self {
            Style::Phaul => RGBColor(0x1f, 0x77, 0xb4),
            Style::Criu | Style::CriuDashed => RGBColor(0xe0, 0x6c, 0x00),
            Style::Raw | Style::RawDashed => RGBColor(0x2c, 0xa0, 0x2c),
            Style::Context => RGBColor(0x70, 0x70, 0x70),
        }
    }

    fn dashed(self) -> bool {
        matches!(self, Style::CriuDashed | Style::RawDashed)
    }
}

/// One line: (workload size in MiB, statistic) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub style: Style,
    pub points: Vec<(u64, Stat)>,
}

/// Registers the font once per process; the font's bytes live for the rest of the process, as plotters needs.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let path = std::env::var_os("PHAUL_BENCH_FONT").unwrap_or_else(|| DEFAULT_FONT.into());
            let bytes = std::fs::read(&path).map_err(|e| {
                format!(
                    "cannot read the font {} for the plots: {e}; install fonts-dejavu-core (bench/run does) or set \
                     PHAUL_BENCH_FONT to a .ttf file",
                    Path::new(&path).display()
                )
            })?;
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FONT, FontStyle::Normal, bytes)
                .map_err(|_| format!("{} is not a usable TrueType font", Path::new(&path).display()))
        })
        .clone()
        .map_err(BenchError)
}

fn draw_err(path: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError(format!("drawing {} failed: {e}", path.display()))
}

/// Draws `series` against workload size (log2 x axis) into the PNG `path`.
pub fn line_chart(path: &Path, title: &str, y_label: &str, series: &[Series]) -> Result<()> {
    ensure_font()?;
    let mut sizes: Vec<u64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.is_empty() {
        return Err(BenchError(format!("nothing to plot in {}", path.display())));
    }
    let xs: Vec<f64> = sizes.iter().map(|&s| (s as f64).log2()).collect();
    let (x0, x1) = (xs[0] - 0.6, xs[xs.len() - 1] + 0.6);
    let y_top = series.iter().flat_map(|s| s.points.iter().map(|p| p.1.max)).fold(0.0f64, f64::max);
    // Headroom above the data for the legend.
    let y_top = if y_top > 0.0 { y_top * 1.4 } else { 1.0 };

    let root = BitMapBackend::new(path, (1100, 680)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 24))
        .margin(18)
        .x_label_area_size(55)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, 0.0..y_top)
        .map_err(|e| draw_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("workload size (MiB, log scale)")
        .y_desc(y_label)
        .x_labels(8)
        // Only whole powers of two are labelled (the axis is log2 of the size).
        .x_label_formatter(&|x| if (x - x.round()).abs() < 1e-6 { format!("{:.0}", x.exp2()) } else { String::new() })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| draw_err(path, e))?;

    let n = series.len() as f64;
    for (i, s) in series.iter().enumerate() {
        if s.points.is_empty() {
            continue;
        }
        let color = s.style.color();
        // Side by side so that bars at the same size do not hide each other.
        let dx = (i as f64 - (n - 1.0) / 2.0) * 0.045;
        let pts: Vec<(f64, f64)> = s.points.iter().map(|(size, st)| ((*size as f64).log2() + dx, st.median)).collect();
        // Every other series writes its medians a little lower, so that labels of close points do not overlap.
        let label_drop = if i % 2 == 1 { y_top * 0.035 } else { 0.0 };
        let line_style = ShapeStyle { color: color.to_rgba(), filled: false, stroke_width: 2 };
        let anno = if s.style.dashed() {
            chart.draw_series(DashedLineSeries::new(pts.clone(), 10, 7, line_style))
        } else {
            chart.draw_series(LineSeries::new(pts.clone(), line_style))
        }
        .map_err(|e| draw_err(path, e))?;
        let dashed = s.style.dashed();
        anno.label(s.name.clone()).legend(move |(x, y)| {
            let style = color.stroke_width(3);
            // A dashed entry is two short strokes; a solid one, two touching ones.
            let gap = if dashed { 6 } else { 0 };
            EmptyElement::at((x, y))
                + PathElement::new(vec![(0, 0), (9 + 6 - gap, 0)], style)
                + PathElement::new(vec![(9 + gap, 0), (24, 0)], style)
        });
        if s.style.dashed() {
            continue;
        }
        chart
            .draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 5, color.filled())))
            .map_err(|e| draw_err(path, e))?;
        for (&(x, y), (_, st)) in pts.iter().zip(&s.points) {
            let bar = [(x, st.min), (x, st.max)];
            let caps = [[(x - 0.02, st.min), (x + 0.02, st.min)], [(x - 0.02, st.max), (x + 0.02, st.max)]];
            chart
                .draw_series(
                    std::iter::once(PathElement::new(bar.to_vec(), color.stroke_width(2)))
                        .chain(caps.iter().map(|c| PathElement::new(c.to_vec(), color.stroke_width(2)))),
                )
                .map_err(|e| draw_err(path, e))?;
            let label = if y >= 100.0 { format!("{y:.0}") } else { format!("{y:.1}") };
            chart
                .draw_series(std::iter::once(Text::new(
                    label,
                    (x + 0.03, y - label_drop),
                    (FONT, 14).into_font().color(&color),
                )))
                .map_err(|e| draw_err(path, e))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .label_font((FONT, 16))
        .draw()
        .map_err(|e| draw_err(path, e))?;
    root.present().map_err(|e| draw_err(path, e))?;
    Ok(())
}

/// One bar of a [`bar_chart`]: its label, its value (ms) and how it is drawn.
#[derive(Debug, Clone)]
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub style: Style,
}

/// Draws `bars` side by side on a log-scale y axis (the values span orders of magnitude) into the PNG `path`,
/// each with its value written above it.
pub fn bar_chart(path: &Path, title: &str, y_label: &str, bars: &[Bar]) -> Result<()> {
    ensure_font()?;
    let bars: Vec<&Bar> = bars.iter().filter(|b| b.value > 0.0).collect();
    if bars.is_empty() {
        return Err(BenchError(format!("nothing to plot in {}", path.display())));
    }
    let top = bars.iter().map(|b| b.value).fold(1.0f64, f64::max) * 4.0;
    let bottom = bars.iter().map(|b| b.value).fold(f64::MAX, f64::min).min(10.0) / 2.0;
    let n = bars.len();
    let root = BitMapBackend::new(path, (1100, 680)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 24))
        .margin(18)
        .x_label_area_size(55)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..n as f64, (bottom..top).log_scale())
        .map_err(|e| draw_err(path, e))?;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    chart
        .configure_mesh()
        .y_desc(y_label)
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 18))
        .disable_x_mesh()
        .draw()
        .map_err(|e| draw_err(path, e))?;
    for (i, b) in bars.iter().enumerate() {
        let (x0, x1) = (i as f64 + 0.2, i as f64 + 0.8);
        chart
            .draw_series(std::iter::once(Rectangle::new([(x0, bottom), (x1, b.value)], b.style.color().filled())))
            .map_err(|e| draw_err(path, e))?;
        let label = if b.value >= 100.0 { format!("{:.0} ms", b.value) } else { format!("{:.1} ms", b.value) };
        chart
            .draw_series(std::iter::once(Text::new(label, (x0, b.value * 1.25), (FONT, 16).into_font())))
            .map_err(|e| draw_err(path, e))?;
    }
    root.present().map_err(|e| draw_err(path, e))?;
    Ok(())
}
