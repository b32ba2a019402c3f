//! What every benchmark shares: the results directory, the JSON file with its header, the SVG
//! plot, progress bars and the summary table.
//!
//! ```text
//! results/<name>.json = {
//!   "benchmark": "<name>",
//!   "header": { "git_rev", "date_utc", "quick", "command", "load_avg",
//!               "machine": { "cpu", "nproc", "kernel" } },
//!   "rows": [ { ... one object per measured point ... } ]
//! }
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::coord::ranged1d::ValueFormatter;
use plotters::prelude::*;
use serde::Serialize;

use crate::Opts;

/// `<workspace root>/results`: the parent of this crate's manifest directory.
pub fn default_results_dir() -> PathBuf {
    workspace_root().join("results")
}

fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The machine a result was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu: String,
    /// Logical CPUs available to this process.
    pub nproc: usize,
    /// Kernel release.
    pub kernel: String,
}

/// The header of every results file.
#[derive(Debug, Clone, Serialize)]
pub struct Header {
    /// `git rev-parse --short HEAD` of the workspace (or "unknown").
    pub git_rev: String,
    /// When the run finished, `YYYY-MM-DDTHH:MM:SSZ`.
    pub date_utc: String,
    /// Whether `--quick` was given.
    pub quick: bool,
    /// The command line that produced the file.
    pub command: String,
    /// `/proc/loadavg` (1, 5, 15 minutes) when the file was written: on a 2-core machine
    /// anything above ~2 means the figures were taken with other work competing for the cores.
    pub load_avg: String,
    /// Where it ran.
    pub machine: Machine,
}

impl Header {
    /// Collects the header for a run now.
    pub fn collect(opts: &Opts) -> Self {
        let args: Vec<String> = std::env::args().skip(1).collect();
        Self {
            git_rev: git_rev(),
            date_utc: utc_now(),
            quick: opts.quick,
            command: format!("cargo run --release -p ftvm-bench -- {}", args.join(" ")),
            load_avg: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|_| "unknown".into()),
            machine: machine(),
        }
    }
}

fn git_rev() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The machine this runs on.
pub fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Machine { cpu, nproc, kernel }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ` (no time-zone database needed).
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[derive(Serialize)]
struct ResultsFile<'a, R: Serialize> {
    benchmark: &'a str,
    header: Header,
    rows: &'a [R],
}

/// Writes `<out>/<name>.json` with the header and `rows`; returns the path.
///
/// # Errors
/// If the directory cannot be created or the file written.
pub fn write_json<R: Serialize>(opts: &Opts, name: &str, rows: &[R]) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let path = opts.out.join(format!("{name}.json"));
    let file = ResultsFile {
        benchmark: name,
        header: Header::collect(opts),
        rows,
    };
    let mut text = serde_json::to_string_pretty(&file)?;
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// One line of a plot (or, in a panel with categories, one bar per category).
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// (x, y) points, in x order; with categories, x is the category's index.
    pub points: Vec<(f64, f64)>,
}

/// One panel of a plot: a line chart, or grouped bars over named categories.
#[derive(Debug, Clone, Default)]
pub struct Panel {
    /// Title above the panel.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Logarithmic x axis (e.g. record sizes 64..1024).
    pub log_x: bool,
    /// Logarithmic y axis: for values that span decades (latencies of shm vs tcp).
    pub log_y: bool,
    /// Named categories on the x axis (transports, configurations): the panel is drawn as
    /// grouped bars, one per series in each category; empty: lines over a numeric x axis.
    pub categories: Vec<String>,
    /// The lines (or bar groups).
    pub series: Vec<Series>,
}

/// Ten distinct colours (matplotlib's tab10): no two series of a panel share one up to ten.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// Draws `panels` side by side into `<out>/<name>.svg`, stamped with the workspace's git
/// revision and the date; returns the path.
///
/// # Errors
/// If the file cannot be written or a panel has no points.
pub fn plot_svg(opts: &Opts, name: &str, panels: &[Panel]) -> anyhow::Result<PathBuf> {
    let stamp = format!("ftvm {} · {}", git_rev(), utc_now());
    plot_svg_stamped(&opts.out, name, panels, &stamp)
}

/// [`plot_svg`], or [`plot_svg_stamped`] into `opts.out` when a stamp is given.
///
/// # Errors
/// If the file cannot be written or a panel has no points.
pub fn plot_any(
    opts: &Opts,
    name: &str,
    panels: &[Panel],
    stamp: Option<&str>,
) -> anyhow::Result<PathBuf> {
    match stamp {
        Some(s) => plot_svg_stamped(&opts.out, name, panels, s),
        None => plot_svg(opts, name, panels),
    }
}

/// [`plot_svg`] into `dir`, stamped with `stamp` (a results file's revision and date when a
/// plot is redrawn from it: `ftvm-bench replot`).
///
/// # Errors
/// If the file cannot be written or a panel has no points.
pub fn plot_svg_stamped(
    dir: &Path,
    name: &str,
    panels: &[Panel],
    stamp: &str,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}.svg"));
    let width = 620 * u32::try_from(panels.len().max(1)).unwrap_or(1);
    {
        let root = SVGBackend::new(&path, (width, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (body, footer) = root.split_vertically(420);
        let areas = body.split_evenly((1, panels.len().max(1)));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(panel, area)?;
        }
        footer
            .draw(&Text::new(
                stamp.to_string(),
                (8, 2),
                ("sans-serif", 13)
                    .into_font()
                    .color(&RGBColor(0x55, 0x55, 0x55)),
            ))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(path)
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// Draws the mesh, every series (lines + points, or grouped bars over the categories) and the
/// legend of `panel`.
fn draw_series<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    panel: &Panel,
    y_floor: f64,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let cats = &panel.categories;
    let name_of = |x: &f64| {
        let i = x.round();
        if cats.is_empty() {
            format!("{x}")
        } else if (x - i).abs() < 1e-6 && i >= 0.0 {
            cats.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    // Whole numbers without a ".0"; small values with their digits.
    let number = |v: &f64| {
        if v.fract() == 0.0 {
            format!("{v:.0}")
        } else {
            format!("{v}")
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(&panel.x_label)
        .y_desc(&panel.y_label)
        .y_label_formatter(&number);
    if !cats.is_empty() {
        // Long names of many categories would run into each other.
        let size = if cats.len() > 6 { 10 } else { 12 };
        mesh.x_labels(cats.len())
            .x_label_formatter(&name_of)
            .x_label_style(("sans-serif", size))
            .disable_x_mesh();
    }
    mesh.draw().map_err(plot_err)?;
    let n = panel.series.len().max(1) as f64;
    for (i, s) in panel.series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        if cats.is_empty() {
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
                .map_err(plot_err)?
                .label(&s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(plot_err)?;
        } else {
            // Bars of one category side by side, 0.8 of the slot wide together.
            let w = 0.8 / n;
            let left = -0.4 + w * i as f64;
            chart
                .draw_series(s.points.iter().map(|&(x, y)| {
                    Rectangle::new([(x + left, y_floor), (x + left + w * 0.9, y)], c.filled())
                }))
                .map_err(plot_err)?
                .label(&s.label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

fn draw_panel(
    panel: &Panel,
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
) -> anyhow::Result<()> {
    let pts = || panel.series.iter().flat_map(|s| s.points.iter().copied());
    let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut y0, mut y1) = (f64::INFINITY, 0f64);
    for (x, y) in pts() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
        if y > 0.0 {
            y0 = y0.min(y);
        }
    }
    anyhow::ensure!(x0.is_finite(), "panel {:?} has no points", panel.title);
    if !panel.categories.is_empty() {
        (x0, x1) = (-0.5, panel.categories.len() as f64 - 0.5);
    } else if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(&panel.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64);
    let xr = if panel.categories.is_empty() && !panel.log_x {
        let pad = (x1 - x0) * 0.05;
        x0 - pad..x1 + pad
    } else if panel.log_x {
        x0 * 0.8..x1 * 1.25
    } else {
        x0..x1
    };
    macro_rules! draw {
        ($x:expr, $y:expr, $floor:expr) => {{
            let mut chart = builder.build_cartesian_2d($x, $y).map_err(plot_err)?;
            draw_series(&mut chart, panel, $floor)?;
        }};
    }
    if panel.log_y {
        // Whole decades around the data, so a reader sees the ratios.
        // A decade of headroom for the legend above the tallest bar.
        let lo = 10f64.powf(y0.min(y1).max(1e-12).log10().floor());
        let hi = 10f64.powf(y1.max(lo * 10.0).log10().ceil() + 1.0);
        match panel.log_x {
            true => draw!(xr.log_scale(), (lo..hi).log_scale(), lo),
            false => draw!(xr, (lo..hi).log_scale(), lo),
        }
    } else {
        // Headroom for the legend above the tallest line or bar.
        let top = if y1 > 0.0 { y1 * 1.3 } else { 1.0 };
        match panel.log_x {
            true => draw!(xr.log_scale(), 0f64..top, 0.0),
            false => draw!(xr, 0f64..top, 0.0),
        }
    }
    Ok(())
}

/// A progress bar over `len` steps (hidden automatically when stderr is not a terminal).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
    {
        bar.set_style(style);
    }
    bar.set_prefix(what.to_string());
    bar
}

/// Prints a summary table with right-aligned columns.
pub fn print_table(title: &str, headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}", w = *w))
            .collect();
        println!("  {}", parts.join("  "));
    };
    println!("\n{title}");
    line(&mut headers.iter().copied());
    println!(
        "  {}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  ")
    );
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    println!();
}

/// The median of `v` (sorted in place); 0 for an empty slice.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_date_has_the_iso_shape() {
        let d = utc_now();
        assert_eq!(d.len(), 20, "{d}");
        assert!(
            d.starts_with("20") && d.ends_with('Z') && &d[10..11] == "T",
            "{d}"
        );
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }
}
