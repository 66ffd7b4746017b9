//! The files of `vqclip bench all` ([`super::all`]): the peer column merged from
//! `tools/peer_bench_all.py`'s output, `report.md`, `roofline.svg` and `report.json`.

use super::all::Report;
use crate::{Error, Result};

/// What `tools/peer_bench_all.py` writes: a description and, per item name, its times.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct PeerFile {
    /// E.g. "PyTorch 2.5.1 CPU (2 threads)".
    pub peer: String,
    /// Per item.
    pub items: Vec<PeerItem>,
}

/// One item of a [`PeerFile`].
#[derive(Debug, Clone, serde::Deserialize)]
pub struct PeerItem {
    /// [`Spec::name`](super::all::Spec::name) of the item it ran.
    pub name: String,
    /// Fastest run, ms.
    pub ms_min: f64,
    /// Median run, ms.
    pub ms_median: f64,
}

/// Adds the peer's figures to the items of the same name; returns how many matched.
pub fn merge_peer(report: &mut Report, peer: &PeerFile) -> Result<usize> {
    let mut matched = 0;
    for p in &peer.items {
        if !(p.ms_median > 0.0 && p.ms_median.is_finite() && p.ms_min > 0.0) {
            return Err(Error::invalid(format!(
                "peer item '{}' has no positive finite times ({} / {} ms)",
                p.name, p.ms_min, p.ms_median
            )));
        }
        if let Some(it) = report.items.iter_mut().find(|i| i.name == p.name) {
            it.peer_ms_median = Some(p.ms_median);
            it.peer_ms_min = Some(p.ms_min);
            it.ratio_to_peer = Some(it.ms_median / p.ms_median);
            matched += 1;
        }
    }
    report.peer = Some(peer.peer.clone());
    Ok(matched)
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("—".to_string(), |v| format!("{v:.digits$}"))
}

/// `report.md`: the adapter, its limits and one table row per item.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "# vqclip bench all: {} ({})\n\n- driver: {}\n- vqclip {}, started at Unix time {}{}\n\
         - peak: f32 FMA {:.1} GFLOP/s{}, copy {:.1} GB/s (`vqclip bench peak`, best runs)\n",
        r.adapter,
        r.backend,
        r.driver,
        r.version,
        r.started_unix,
        if r.quick { " (--quick list)" } else { "" },
        r.peak.f32_gflops,
        r.peak
            .f16_gflops
            .map_or(String::new(), |f| format!(", f16 FMA {f:.1} GFLOP/s")),
        r.peak.copy_gbs
    ));
    if let Some(half) = r.f16_activations {
        let products = match r.f16_coop_matrix {
            Some(n) => format!("on {n}×{n}×{n} cooperative matrices (tensor cores)"),
            None => "on the FMA kernels, not on cooperative matrices".to_string(),
        };
        s.push_str(&format!(
            "- `f16` items: `--precision f16`, f16 linear weights and {} activations \
             (`VQCLIP_F16_ACTIVATIONS`), products {products} (`VQCLIP_COOP_MATRIX`); the \
             peer runs them in f32\n",
            if half { "f16" } else { "f32" }
        ));
    }
    if let Some(p) = &r.peer {
        s.push_str(&format!(
            "- peer column: {p}, run right after on the same machine\n"
        ));
    }
    for t in &r.tuning {
        let all: Vec<String> =
            t.ms.iter()
                .map(|(n, ms)| format!("{n} {ms:.2} ms"))
                .collect();
        s.push_str(&format!(
            "- tuning `{}` on {}: **{}** ({})\n",
            t.key,
            t.shape,
            t.variant,
            all.join(", ")
        ));
    }
    s.push_str(
        "\n% of peak: median throughput over the roofline at the item's arithmetic intensity \
         (min of peak FLOP/s and intensity × peak bandwidth); ratio: vqclip median / peer \
         median (above 1: vqclip slower).\n\n",
    );
    s.push_str("| item | family | ms median | ms min | GFLOP/s | GB/s | % of peak | peer ms median | ratio |\n");
    s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for i in &r.items {
        s.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {} | {} | {} | {} | {} |\n",
            i.name,
            i.family,
            i.ms_median,
            i.ms_min,
            opt(i.gflops, 2),
            opt(i.gbs, 2),
            opt(i.pct_of_peak, 1),
            opt(i.peer_ms_median, 3),
            opt(i.ratio_to_peer, 2),
        ));
    }
    s
}

/// `roofline.svg`: log-log GFLOP/s over FLOP/byte, the roof from the peak figures and one
/// point per item with both counts.
pub fn roofline_svg(r: &Report) -> String {
    let (w, h, pad) = (760.0f64, 480.0f64, 60.0f64);
    let (x0, x1) = (-2.0f64, 3.0f64); // log10 FLOP/byte
    let top = (r.peak.f32_gflops * 2.0).log10().ceil();
    let (y0, y1) = (top - 5.0, top); // log10 GFLOP/s
    let px = |i: f64| pad + (i.log10().clamp(x0, x1) - x0) / (x1 - x0) * (w - 2.0 * pad);
    let py = |g: f64| h - pad - (g.log10().clamp(y0, y1) - y0) / (y1 - y0) * (h - 2.0 * pad);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" \
         fill=\"white\"/>\n<text x=\"{pad}\" y=\"20\" font-size=\"14\">Roofline: {} ({})</text>\n",
        escape(&r.adapter),
        escape(&r.backend)
    );
    // Axes with decade ticks.
    s.push_str(&format!(
        "<rect x=\"{pad}\" y=\"{pad}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"black\"/>\n",
        w - 2.0 * pad,
        h - 2.0 * pad
    ));
    for e in (x0 as i32)..=(x1 as i32) {
        let x = px(10f64.powi(e));
        s.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{pad}\" stroke=\"#ddd\"/>\
             <text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">1e{e}</text>\n",
            h - pad,
            h - pad + 16.0
        ));
    }
    for e in (y0 as i32)..=(y1 as i32) {
        let y = py(10f64.powi(e));
        s.push_str(&format!(
            "<line x1=\"{pad}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">1e{e}</text>\n",
            w - pad,
            pad - 4.0,
            y + 4.0
        ));
    }
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">arithmetic intensity (FLOP/byte)</text>\n\
         <text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">GFLOP/s</text>\n",
        w / 2.0,
        h - 16.0,
        h / 2.0,
        h / 2.0
    ));
    // The roof: bandwidth slope up to the ridge, then flat at peak FLOP/s.
    let ridge = r.peak.f32_gflops / r.peak.copy_gbs;
    let lo = 10f64.powf(x0);
    let hi = 10f64.powf(x1);
    s.push_str(&format!(
        "<polyline fill=\"none\" stroke=\"#c00\" stroke-width=\"2\" points=\"{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#c00\">f32 FMA {:.1} GFLOP/s, copy {:.1} GB/s</text>\n",
        px(lo),
        py(lo * r.peak.copy_gbs),
        px(ridge),
        py(r.peak.f32_gflops),
        px(hi),
        py(r.peak.f32_gflops),
        px(ridge) + 4.0,
        py(r.peak.f32_gflops) - 6.0,
        r.peak.f32_gflops,
        r.peak.copy_gbs
    ));
    let colour = |f: &str| match f {
        "matmul" => "#1f77b4",
        "attention" => "#ff7f0e",
        "conv" => "#2ca02c",
        "norm" => "#9467bd",
        "elementwise" => "#8c564b",
        _ => "#555",
    };
    for i in &r.items {
        let (Some(f), Some(b)) = (i.spec.flop(), i.spec.bytes()) else {
            continue;
        };
        let g = f / (i.ms_median / 1e3) / 1e9;
        let (x, y) = (px(f / b), py(g));
        s.push_str(&format!(
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"{}\"><title>{}: {g:.2} GFLOP/s</title></circle>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" fill=\"{}\">{}</text>\n",
            colour(&i.family),
            escape(&i.name),
            x + 5.0,
            y - 3.0,
            colour(&i.family),
            escape(&i.name)
        ));
    }
    s.push_str("</svg>\n");
    s
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes `report.json`, `report.md` and `roofline.svg` into `dir` (created if needed),
/// each file whole or not at all.
pub fn write_report(r: &Report, dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let json = serde_json::to_string_pretty(r)
        .map_err(|e| Error::invalid(format!("cannot serialise the report: {e}")))?;
    for (name, text) in [
        ("report.json", json),
        ("report.md", markdown(r)),
        ("roofline.svg", roofline_svg(r)),
    ] {
        crate::atomic::write(dir.join(name), text.as_bytes())?;
    }
    Ok(())
}
