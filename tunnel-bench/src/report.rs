//! Reporting: the figures a run keeps for `--json`, medians and percentiles, thousands
//! separators, and the progress line on stderr. Depends on nothing else in the crate.

use serde::Serialize;
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

/// One measured figure, for `--json`.
#[derive(Debug, Clone, Serialize)]
struct Figure {
    scenario: String,
    name: String,
    value: f64,
    unit: String,
}

static FIGURES: std::sync::Mutex<Vec<Figure>> = std::sync::Mutex::new(Vec::new());

/// Keeps a figure for `--json` (scenarios print their own tables as well).
pub(crate) fn figure(scenario: &str, name: &str, value: f64, unit: &str) {
    FIGURES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Figure {
            scenario: scenario.into(),
            name: name.into(),
            value,
            unit: unit.into(),
        });
}

/// Writes every figure kept so far as one JSON document, with the machine's facts.
pub(crate) fn write_figures(path: &std::path::Path, scenario: &str) -> Result<(), String> {
    let figures = FIGURES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let doc = serde_json::json!({
        "tool": format!("tunnel-bench {}", env!("CARGO_PKG_VERSION")),
        "scenario": scenario,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "machine": {
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
        },
        "figures": figures,
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The median of `v` (the upper one of an even count); 0 for no values.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `p` quantile (0 to 1) of `sorted`, nearest rank; zero for no samples.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let Some(last) = sorted.len().checked_sub(1) else {
        return Duration::ZERO;
    };
    let i = (last as f64 * p.clamp(0.0, 1.0)).round() as usize;
    sorted[i.min(last)]
}

pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A status line while a scenario runs: rewritten in place on a terminal, one line
/// every few seconds otherwise. On stderr, so figures on stdout stay clean.
pub(crate) struct Progress {
    scenario: &'static str,
    started: Instant,
    last: Option<Instant>,
    tty: bool,
}

impl Progress {
    pub(crate) fn new(scenario: &'static str) -> Self {
        Progress {
            scenario,
            started: Instant::now(),
            last: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Shows `what` unless a line went out very recently.
    pub(crate) fn update(&mut self, what: impl FnOnce() -> String) {
        let every = if self.tty {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(5)
        };
        if self.last.is_some_and(|last| last.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        let line = format!(
            "  [{} {:>5.1}s] {}",
            self.scenario,
            self.started.elapsed().as_secs_f64(),
            what()
        );
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }

    /// Clears the status line.
    pub(crate) fn finish(self) {
        if self.tty && self.last.is_some() {
            eprint!("\r\x1b[2K");
        }
    }
}

/// `n` with a comma between each group of three digits: `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Whether log lines and the progress line on stderr may carry ANSI codes: only on a
/// terminal, and never with `NO_COLOR` set to anything but the empty string.
pub(crate) fn colour_on_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentile_take_the_middle_and_the_rank_and_survive_no_samples() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(Vec::new()), 0.0);
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 0.5), Duration::from_millis(51));
        assert_eq!(percentile(&ms, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&ms, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&ms, 7.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn thousands_groups_digits_in_threes() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
