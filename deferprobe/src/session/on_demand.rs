//! What `run` gives while tracing goes on: interim reports (on SIGUSR1 and every
//! `--report-every`: text on stderr, or JSON next to the `--report` file with the time in its
//! name) and the `--metrics-addr` metrics, refreshed every `--interval`. Neither changes what
//! the trace gathers, nor the final report.

use std::{io::Write as _, sync::Arc, time::SystemTime};

use tracing::{info, warn};

use crate::{
    governor::SampledFamily,
    metrics::TraceMetrics,
    output::OutputFile,
    report::{InterimCause, InterimReport, Report},
};

/// Where reports made while tracing goes on go.
pub(super) struct OnDemand<'a> {
    /// `--report`: interim JSON reports go next to it.
    pub(super) report_file: Option<&'a OutputFile>,
    pub(super) metrics: Option<Arc<TraceMetrics>>,
}

impl OnDemand<'_> {
    /// Whether the metrics want a report every `--interval`.
    pub(super) fn publishes_metrics(&self) -> bool {
        self.metrics.is_some()
    }

    pub(super) fn publish(&self, report: Report, duty_cycles: [(SampledFamily, f64); 4]) {
        if let Some(metrics) = &self.metrics {
            metrics.publish(report, duty_cycles);
        }
    }

    /// Writes the interim `report`: as JSON next to `--report`, else as text on stderr. A
    /// failure is logged, and tracing goes on.
    pub(super) fn write(&self, report: &Report) {
        let Some(interim) = &report.interim else { return };
        let cause = match interim.cause {
            InterimCause::Signal => "SIGUSR1",
            InterimCause::ReportEvery => "--report-every",
        };
        let Some(report_file) = self.report_file else {
            let mut stderr = std::io::stderr().lock();
            let text = format!("\n{}\n", report.to_text());
            let _ = stderr.write_all(text.as_bytes()).and_then(|()| stderr.flush());
            info!(cause, "interim report written to stderr");
            return;
        };
        let written = report_file
            .with_time(&file_stamp(&interim.written_at))
            .and_then(|file| file.write((report.to_json() + "\n").as_bytes()).map(|()| file));
        match written {
            Ok(file) => info!(cause, path = %file.path().display(), "interim report written"),
            Err(err) => {
                warn!(cause, %err, "the interim report could not be written: tracing goes on")
            }
        }
    }
}

/// An interim report's mark: why and when (now, UTC, to the second).
pub(super) fn interim(cause: InterimCause) -> InterimReport {
    InterimReport {
        cause,
        written_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    }
}

/// `2026-12-02T01:30:00Z` as it goes in a file name: `20261202T013000Z`.
fn file_stamp(written_at: &str) -> String {
    written_at.chars().filter(|c| !matches!(c, '-' | ':')).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_is_the_basic_iso_8601_time() {
        assert_eq!(file_stamp("2026-12-02T01:30:00Z"), "20261202T013000Z");
        let now = interim(InterimCause::Signal);
        assert_eq!(now.written_at.len(), "2026-12-02T01:30:00Z".len(), "{now:?}");
        assert_eq!(file_stamp(&now.written_at).len(), "20261202T013000Z".len());
    }
}
