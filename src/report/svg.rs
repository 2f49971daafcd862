//! Inline SVG charts for report.html: a self-contained page needs no plotting library,
//! scripts or network. Line charts (loss curves, trade-off curves) and scatter plots.
use std::fmt::Write;

const PALETTE: [&str; 12] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#393b79", "#e7969c",
];

pub fn color(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

struct Frame {
    w: f64,
    h: f64,
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

const PAD: f64 = 48.0;
/// Width of the legend column right of the plot area.
const LEGEND: f64 = 150.0;

impl Frame {
    fn new(w: f64, h: f64, pts: impl Iterator<Item = (f64, f64)>) -> Frame {
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for (x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 - x0 < 1e-12 {
            x1 = x0 + 1.0;
        }
        if y1 - y0 < 1e-12 {
            y1 = y0 + 1.0;
        }
        Frame { w, h, x0, x1, y0, y1 }
    }
    fn sx(&self, x: f64) -> f64 {
        PAD + (x - self.x0) / (self.x1 - self.x0) * (self.w - PAD - LEGEND)
    }
    fn sy(&self, y: f64) -> f64 {
        self.h - PAD - (y - self.y0) / (self.y1 - self.y0) * (self.h - 2.0 * PAD)
    }
    fn axes(&self, s: &mut String, title: &str, xlabel: &str, ylabel: &str) {
        let (w, h) = (self.w, self.h);
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">
<text x="{}" y="16" text-anchor="middle" font-size="13">{}</text>
<line x1="{PAD}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{}</text><text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">{}</text>
<text x="{PAD}" y="{}" text-anchor="start">{:.3}</text><text x="{}" y="{}" text-anchor="end">{:.3}</text>
<text x="{}" y="{}" text-anchor="end">{:.3}</text><text x="{}" y="{}" text-anchor="end">{:.3}</text>
"#,
            w / 2.0,
            escape(title),
            h - PAD,
            w - LEGEND,
            h - PAD,
            h - PAD,
            w / 2.0,
            h - 8.0,
            escape(xlabel),
            h / 2.0,
            h / 2.0,
            escape(ylabel),
            h - PAD + 14.0,
            self.x0,
            w - LEGEND,
            h - PAD + 14.0,
            self.x1,
            PAD - 4.0,
            h - PAD,
            self.y0,
            PAD - 4.0,
            PAD + 4.0,
            self.y1
        );
    }
}

fn legend(s: &mut String, w: f64, names: &[String]) {
    for (i, n) in names.iter().enumerate() {
        let y = PAD + 14.0 * i as f64;
        let _ = write!(
            s,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            w - LEGEND + 12.0,
            y - 9.0,
            color(i),
            w - LEGEND + 26.0,
            y,
            escape(n)
        );
    }
}

/// A line chart of several series.
pub fn line_chart(title: &str, xlabel: &str, ylabel: &str, series: &[Series]) -> String {
    let f = Frame::new(720.0, 300.0, series.iter().flat_map(|s| s.points.iter().copied()));
    let mut s = String::new();
    f.axes(&mut s, title, xlabel, ylabel);
    for (i, ser) in series.iter().enumerate() {
        let pts: Vec<String> = ser
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", f.sx(x), f.sy(y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
            color(i),
            pts.join(" ")
        );
        if ser.points.len() <= 40 {
            for p in &pts {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = write!(s, r#"<circle cx="{x}" cy="{y}" r="2.5" fill="{}"/>"#, color(i));
            }
        }
    }
    legend(&mut s, f.w, &series.iter().map(|x| x.name.clone()).collect::<Vec<_>>());
    s.push_str("</svg>");
    s
}

/// A scatter plot; `class[i]` picks the colour of point i, `names` labels the classes.
pub fn scatter(title: &str, pts: &[(f64, f64)], class: &[usize], names: &[String], bounds: Option<[f64; 4]>) -> String {
    scatter_with(title, ("PC 1", "PC 2"), 2.0, pts, class, names, bounds)
}

/// A scatter plot with axis labels and point radius of its own.
pub fn scatter_with(
    title: &str, axes: (&str, &str), radius: f64, pts: &[(f64, f64)], class: &[usize], names: &[String],
    bounds: Option<[f64; 4]>,
) -> String {
    let mut f = Frame::new(520.0, 380.0, pts.iter().copied());
    if let Some([x0, x1, y0, y1]) = bounds {
        (f.x0, f.x1, f.y0, f.y1) = (x0, x1, y0, y1);
    }
    let mut s = String::new();
    f.axes(&mut s, title, axes.0, axes.1);
    for (&(x, y), &k) in pts.iter().zip(class) {
        let _ = write!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="{radius}" fill="{}" fill-opacity="0.7"/>"#,
            f.sx(x),
            f.sy(y),
            color(k)
        );
    }
    legend(&mut s, f.w, names);
    s.push_str("</svg>");
    s
}

/// Bounds covering several point sets, so before/after pictures share axes.
pub fn common_bounds(sets: &[&[(f64, f64)]]) -> [f64; 4] {
    let f = Frame::new(1.0, 1.0, sets.iter().flat_map(|s| s.iter().copied()));
    [f.x0, f.x1, f.y0, f.y1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_wellformed_svg() {
        let s = line_chart(
            "loss <a&b>",
            "step",
            "loss",
            &[Series {
                name: "ce".into(),
                points: vec![(0.0, 1.0), (1.0, 0.5), (2.0, f64::NAN)],
            }],
        );
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(s.contains("loss &lt;a&amp;b&gt;"));
        assert!(!s.contains("NaN"));
        let p = scatter(
            "z",
            &[(0.0, 0.0), (1.0, 2.0)],
            &[0, 1],
            &["O".into(), "B-X".into()],
            None,
        );
        assert_eq!(p.matches("<circle").count(), 2);
    }
}
