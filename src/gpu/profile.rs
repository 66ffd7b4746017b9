//! Per-kernel timing (`VQCLIP_PROFILE=1`): every dispatch is submitted on its own and waited
//! for, and its wall time is added to its kernel's total.
//!
//! Profiling serialises the GPU (no overlap between dispatches, one submission each), so the
//! totals are larger than an unprofiled run's time: read them as shares, to see which kernels
//! a workload spends its time in. Buffer copies and uploads are not counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// 0: not yet read from the environment, 1: off, 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);
static TABLE: Mutex<Option<HashMap<String, Entry>>> = Mutex::new(None);

#[derive(Default, Clone, Copy)]
struct Entry {
    calls: u64,
    workgroups: u64,
    time: Duration,
}

/// One kernel's share of the profiled time.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    /// `shader:entry` with its pipeline constants, e.g. `matmul:register4x4:TRANS_B=1`.
    pub kernel: String,
    /// Dispatches recorded.
    pub calls: u64,
    /// Workgroups launched over all calls.
    pub workgroups: u64,
    /// Wall time of its dispatches, each submitted alone and waited for.
    pub seconds: f64,
}

/// Whether dispatches are being timed: `VQCLIP_PROFILE` set to anything but `""` or `0`,
/// unless [`set_enabled`] said otherwise.
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var("VQCLIP_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
    }
}

/// Turns timing on or off for the whole process (all devices).
pub fn set_enabled(on: bool) {
    STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

pub(crate) fn add(kernel: String, workgroups: [u32; 3], time: Duration) {
    let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let e = t
        .get_or_insert_with(HashMap::new)
        .entry(kernel)
        .or_default();
    e.calls += 1;
    e.workgroups += workgroups.iter().map(|&w| w as u64).product::<u64>();
    e.time += time;
}

/// The kernels timed so far, most time first.
pub fn report() -> Vec<KernelTime> {
    let t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<KernelTime> = t
        .iter()
        .flatten()
        .map(|(k, e)| KernelTime {
            kernel: k.clone(),
            calls: e.calls,
            workgroups: e.workgroups,
            seconds: e.time.as_secs_f64(),
        })
        .collect();
    v.sort_by(|a, b| {
        b.seconds
            .total_cmp(&a.seconds)
            .then_with(|| a.kernel.cmp(&b.kernel))
    });
    v
}

/// Forgets the times recorded so far.
pub fn reset() {
    *TABLE.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// The report as a text table: kernel, calls, total ms, mean µs per call, share of the
/// total; the `top` longest kernels, the rest summed in one line.
pub fn format_table(rows: &[KernelTime], top: usize) -> String {
    use std::fmt::Write;
    let total: f64 = rows.iter().map(|r| r.seconds).sum();
    let share = |s: f64| if total > 0.0 { 100.0 * s / total } else { 0.0 };
    let width = rows
        .iter()
        .take(top)
        .map(|r| r.kernel.len())
        .max()
        .unwrap_or(0)
        .max(6);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$} {:>8} {:>10} {:>10} {:>6}",
        "kernel", "calls", "total ms", "mean µs", "share"
    );
    let line = |out: &mut String, name: &str, calls: u64, secs: f64| {
        let mean = if calls > 0 {
            1e6 * secs / calls as f64
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "{name:<width$} {calls:>8} {:>10.1} {mean:>10.1} {:>5.1}%",
            1e3 * secs,
            share(secs)
        );
    };
    for r in rows.iter().take(top) {
        line(&mut out, &r.kernel, r.calls, r.seconds);
    }
    if rows.len() > top {
        let rest = &rows[top..];
        let name = format!("({} others)", rest.len());
        line(
            &mut out,
            &name,
            rest.iter().map(|r| r.calls).sum(),
            rest.iter().map(|r| r.seconds).sum(),
        );
    }
    let calls: u64 = rows.iter().map(|r| r.calls).sum();
    line(&mut out, "total", calls, total);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_sorts_sums_and_folds_the_tail() {
        let rows = vec![
            KernelTime {
                kernel: "matmul:a".into(),
                calls: 4,
                workgroups: 40,
                seconds: 0.006,
            },
            KernelTime {
                kernel: "softmax:b".into(),
                calls: 2,
                workgroups: 2,
                seconds: 0.003,
            },
            KernelTime {
                kernel: "add:c".into(),
                calls: 1,
                workgroups: 1,
                seconds: 0.001,
            },
        ];
        let t = format_table(&rows, 2);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(
            lines[1].starts_with("matmul:a") && lines[1].contains("60.0%"),
            "{t}"
        );
        assert!(lines[1].contains("1500.0"), "mean µs of matmul: {t}");
        assert!(
            lines[3].starts_with("(1 others)") && lines[3].contains("10.0%"),
            "{t}"
        );
        assert!(
            lines[4].starts_with("total") && lines[4].contains("10.0 "),
            "{t}"
        );
    }
}
