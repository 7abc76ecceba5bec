//! PNG charts of a [`Report`]: grouped bars (one group per metric, one bar per scenario at
//! its median, a whisker from min to max). plotters' bitmap backend draws text with
//! ab_glyph from a TTF file: DejaVu Sans from Debian's `fonts-dejavu-core`, which `cargo
//! xtask setup` installs.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::{prelude::*, style::FontStyle};

use super::report::{Report, Series, num};

pub fn draw_all(report: &Report, dir: &Path) -> Result<()> {
    register_font()?;
    let charts: [Chart; 4] = [
        (
            "throughput.png",
            "Throughput (higher is better)",
            "Gbit/s",
            &[
                ("throughput, 1 stream", "1 stream"),
                ("throughput, 8 streams", "8 streams"),
                ("throughput, 64 streams", "64 streams"),
            ],
        ),
        (
            "latency.png",
            "Round trip on one connection (lower is better)",
            "µs",
            &[
                ("1 B round trip p50", "1 B p50"),
                ("1 B round trip p99", "1 B p99"),
                ("1 B round trip, CPUs kept awake p50", "1 B p50, CPUs awake"),
                ("1 B round trip, CPUs kept awake p99", "1 B p99, CPUs awake"),
                ("1 KiB round trip p50", "1 KiB p50"),
                ("1 KiB round trip p99", "1 KiB p99"),
            ],
        ),
        (
            "connections.png",
            "New connections, one at a time (higher is better)",
            "connections/s",
            &[("new connections", "connect + 1 B round trip + close")],
        ),
        (
            "connection-latency.png",
            "New connection: connect + 1 B round trip + close (lower is better)",
            "µs",
            &[("new connection p50", "p50"), ("new connection p99", "p99")],
        ),
    ];
    for (file, title, unit, metrics) in charts {
        bars(report, &dir.join(file), title, unit, metrics)
            .with_context(|| format!("draw {file}"))?;
    }
    Ok(())
}

/// (file, title, unit, [(metric in the report, its label on the chart)]).
type Chart<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)]);

fn bars(
    report: &Report,
    path: &Path,
    title: &str,
    unit: &str,
    metrics: &[(&str, &str)],
) -> Result<()> {
    let scenarios: Vec<(&str, String)> = report
        .scenarios
        .iter()
        .filter(|s| {
            metrics
                .iter()
                .any(|(m, _)| report.get(&s.key, m).and_then(Series::median).is_some())
        })
        .map(|s| (s.key.as_str(), s.label.clone()))
        .collect();
    if scenarios.is_empty() {
        return Ok(());
    }
    // Whiskers may go off the top: one outlier must not flatten every bar.
    let highest = |pick: fn(&Series) -> Option<f64>| {
        metrics
            .iter()
            .flat_map(|(m, _)| {
                scenarios
                    .iter()
                    .filter_map(|(k, _)| pick(report.get(k, m)?))
            })
            .fold(0.0f64, f64::max)
    };
    let top = highest(Series::max).min(highest(Series::median) * 2.0) * 1.15;
    let groups = metrics.len() as f64;
    let root = BitMapBackend::new(path, (1400, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..groups, 0.0..top.max(1e-9))
        .map_err(err)?;
    let names: Vec<String> = metrics.iter().map(|(_, label)| label.to_string()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(metrics.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor();
            if (x - i - 0.5).abs() < 1e-6 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(unit)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(err)?;
    let width = 0.8 / scenarios.len() as f64;
    for (n, (key, label)) in scenarios.iter().enumerate() {
        let color = Palette99::pick(n).to_rgba();
        let mut rects = Vec::new();
        let mut whiskers = Vec::new();
        let mut values = Vec::new();
        for (g, (metric, _)) in metrics.iter().enumerate() {
            let Some(series) = report.get(key, metric) else {
                continue;
            };
            let (Some(median), Some(lo), Some(hi)) = (series.median(), series.min(), series.max())
            else {
                continue;
            };
            let x0 = g as f64 + 0.1 + n as f64 * width;
            let mid = x0 + width / 2.0;
            rects.push(Rectangle::new(
                [(x0, 0.0), (x0 + width * 0.9, median)],
                color.filled(),
            ));
            whiskers.push(PathElement::new(
                vec![(mid, lo), (mid, hi)],
                BLACK.stroke_width(2),
            ));
            values.push(Text::new(
                num(median),
                (x0, median + top * 0.01),
                ("sans-serif", 12).into_font(),
            ));
        }
        chart
            .draw_series(rects)
            .map_err(err)?
            .label(label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        chart.draw_series(whiskers).map_err(err)?;
        chart.draw_series(values).map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn register_font() -> Result<()> {
    let bytes = std::fs::read(FONT)
        .with_context(|| format!("read {FONT} (apt-get install fonts-dejavu-core)"))?;
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{FONT} is not a font plotters can read"))
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{e}")
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
