//! The Prometheus metrics of `run --metrics-addr`: what each metric is and how it is read from
//! a report of the trace so far. The trace loop publishes a report every `--interval`
//! ([`TraceMetrics::publish`]); a scrape encodes the last one in the Prometheus text format
//! with the `prometheus-client` crate. [`server`] serves them over HTTP.

pub mod server;

use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{
    governor::SampledFamily,
    plan::ProbeFamily,
    report::{Report, site_name},
};

/// Every metric's name starts with this (and `_`).
pub const PREFIX: &str = "deferprobe";

/// A metric's labels, as (name, value) pairs.
type Labels = Vec<(&'static str, String)>;

/// The metrics of one trace: the last report published, encoded at every scrape.
#[derive(Debug)]
pub struct TraceMetrics {
    published: Mutex<Option<Published>>,
    /// `--metrics-sites`: defer sites with a series of their own; the rest are `site="other"`.
    top_sites: usize,
}

/// What a scrape shows: the report of the trace so far, and the governor's duty cycles now.
#[derive(Debug)]
struct Published {
    report: Report,
    duty_cycles: [(SampledFamily, f64); 4],
}

impl TraceMetrics {
    pub fn new(top_sites: usize) -> Arc<TraceMetrics> {
        Arc::new(TraceMetrics { published: Mutex::new(None), top_sites })
    }

    /// From now on, scrapes show `report` and the duty cycles in force.
    pub fn publish(&self, report: Report, duty_cycles: [(SampledFamily, f64); 4]) {
        let mut published = self.published.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *published = Some(Published { report, duty_cycles });
    }

    /// A registry holding these metrics, every name prefixed with [`PREFIX`].
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(self.clone()));
        registry
    }
}

/// `registry` in the Prometheus text exposition format (version 0.0.4).
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing to a String does not fail; an encoder error would leave what was written.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, registry);
    text
}

/// The `Content-Type` of [`encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

impl Collector for TraceMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let published = self.published.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(published) = published.as_ref() else { return Ok(()) };
        let mut out = Families { encoder: &mut encoder };
        encode_target(&mut out, &published.report)?;
        encode_counts(&mut out, &published.report)?;
        encode_pending(&mut out, &published.report, self.top_sites)?;
        encode_governor(&mut out, &published.report, &published.duty_cycles)
    }
}

/// Writes metric families, each with its HELP and TYPE lines.
struct Families<'e, 'a> {
    encoder: &'e mut DescriptorEncoder<'a>,
}

impl Families<'_, '_> {
    /// A counter (its name gets `_total`): monotonic, as its source is.
    fn counter(&mut self, name: &str, help: &str, series: &[(Labels, u64)]) -> std::fmt::Result {
        self.family(name, help, MetricType::Counter, series, |value, encoder| {
            ConstCounter::new(*value).encode(encoder)
        })
    }

    /// A gauge of counts (`u64`) or of measures (`f64`).
    fn gauge<T: EncodeGaugeValue + Copy>(
        &mut self,
        name: &str,
        help: &str,
        series: &[(Labels, T)],
    ) -> std::fmt::Result {
        self.family(name, help, MetricType::Gauge, series, |value, encoder| {
            ConstGauge::new(*value).encode(encoder)
        })
    }

    /// A family with no series is left out (an unknown value is absent, never 0).
    fn family<T>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        series: &[(Labels, T)],
        encode: impl Fn(&T, prometheus_client::encoding::MetricEncoder) -> std::fmt::Result,
    ) -> std::fmt::Result {
        if series.is_empty() {
            return Ok(());
        }
        let mut family = self.encoder.encode_descriptor(name, help, None, kind)?;
        for (labels, value) in series {
            encode(value, family.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn info(&mut self, name: &str, help: &str, labels: &Labels) -> std::fmt::Result {
        self.encoder.encode_descriptor(name, help, None, MetricType::Info)?.encode_info(labels)
    }
}

fn no_labels<T>(value: T) -> Vec<(Labels, T)> {
    vec![(Vec::new(), value)]
}

fn encode_target(out: &mut Families, report: &Report) -> std::fmt::Result {
    let target = &report.target;
    out.info(
        "target",
        "The process deferprobe traces: its pid, executable and Go release (always 1).",
        &vec![
            ("pid", target.pid.to_string()),
            ("exe", target.exe.clone()),
            ("go_version", target.go_version.clone()),
        ],
    )?;
    out.gauge(
        "traced_seconds",
        "How long the probes have been attached.",
        &no_labels(report.duration_secs),
    )?;
    out.gauge(
        "probes_attached",
        "Attach points of the probe plan (one per probed function or call site).",
        &no_labels(report.probes.attached as u64),
    )
}

/// The probe families' counts: calls seen since the probes were attached.
fn encode_counts(out: &mut Families, report: &Report) -> std::fmt::Result {
    let c = &report.counts;
    let calls: Vec<(Labels, u64)> = [
        (ProbeFamily::Defers, "deferproc", c.deferproc),
        (ProbeFamily::Defers, "deferproc_stack", c.deferproc_stack),
        (ProbeFamily::Defers, "deferreturn", c.deferreturn),
        (ProbeFamily::Defers, "goroutine_exit", c.goroutine_exits),
        (ProbeFamily::MapWrites, "mapassign", c.mapassign),
        (ProbeFamily::Allocations, "mallocgc", c.mallocgc),
        (
            ProbeFamily::Allocations,
            "profilealloc",
            report.allocations.profiled.as_ref().map(|profiled| profiled.samples),
        ),
    ]
    .into_iter()
    // A family not probed has no count: no series, never 0.
    .filter_map(|(family, call, count)| {
        Some((vec![("family", family.name().to_owned()), ("call", call.to_owned())], count?))
    })
    .collect();
    out.counter(
        "calls",
        "Calls of Go runtime functions seen by the probes of a --probes family since they were \
         attached: deferproc (heap defer registrations), deferproc_stack, deferreturn (in \
         frames owning heap defers), goroutine_exit, mapassign, mallocgc, profilealloc (the \
         runtime's memory-profile samples, --alloc-mode profiled). Exact, except the calls of a \
         family the governor sampled (deferprobe_governor_sampled): then only the sampled \
         windows' calls.",
        &calls,
    )?;
    out.counter(
        "allocated_bytes",
        "Bytes requested by the allocations counted in deferprobe_calls_total{call=\"mallocgc\"}.",
        &c.alloc_bytes.map(no_labels).unwrap_or_default(),
    )?;
    let lost = &report.lost;
    out.counter(
        "lost_events",
        "Events lost or incomplete, by cause: ring_buffer_full (see --ring-buffer-kib), \
         undecodable, without_goroutine_id, user_read_failed. The counts stay exact.",
        &[
            ("ring_buffer_full", lost.ring_buffer_full),
            ("undecodable", lost.undecodable),
            ("without_goroutine_id", lost.without_goroutine_id),
            ("user_read_failed", lost.user_read_failed),
        ]
        .map(|(cause, n)| (vec![("cause", cause.to_owned())], n)),
    )
}

/// One defer site's series: its name and pending defers, and the estimate of what they keep
/// alive (None: unknown).
#[derive(Debug, PartialEq)]
struct SiteSeries {
    site: String,
    pending: u64,
    est_bytes: Option<u64>,
}

/// The sites with the most pending defers (at most `top`, as the report orders them), each
/// under its name (sites of the same name merged), and the others summed as `other`.
fn site_series(report: &Report, top: usize) -> Vec<SiteSeries> {
    let mut named: Vec<SiteSeries> = Vec::new();
    for site in &report.sites {
        let name = site_name(site);
        match named.iter_mut().find(|s| s.site == name) {
            Some(same) => {
                same.pending += site.pending;
                same.est_bytes = same.est_bytes.zip(site.est_bytes).map(|(a, b)| a + b);
            }
            None => named.push(SiteSeries {
                site: name,
                pending: site.pending,
                est_bytes: site.est_bytes,
            }),
        }
    }
    named.sort_by_key(|s| std::cmp::Reverse(s.pending));
    if named.len() > top {
        let rest = named.split_off(top);
        named.push(SiteSeries {
            site: "other".into(),
            pending: rest.iter().map(|s| s.pending).sum(),
            est_bytes: rest.iter().map(|s| s.est_bytes).sum(),
        });
    }
    named
}

fn encode_pending(out: &mut Families, report: &Report, top_sites: usize) -> std::fmt::Result {
    let sites = site_series(report, top_sites);
    let label = |site: &SiteSeries| vec![("site", site.site.clone())];
    out.gauge(
        "pending_defers",
        "Heap defer records pending now, per defer site (function (file:line)) as the last \
         snapshot of the runtime's state shows them: the sites with the most (--metrics-sites), \
         the rest summed as site=\"other\".",
        &sites.iter().map(|s| (label(s), s.pending)).collect::<Vec<_>>(),
    )?;
    out.gauge(
        "retained_bytes",
        "Estimate of the bytes a defer site's pending records keep alive: _defer records, \
         closures and what they capture (map slots, slice capacities, string bytes, one pointee \
         per pointer); absent when what the closures capture is unknown.",
        &sites.iter().filter_map(|s| Some((label(s), s.est_bytes?))).collect::<Vec<_>>(),
    )?;
    out.gauge(
        "pending_goroutines",
        "Goroutines holding pending heap defer records.",
        &no_labels(report.pending.goroutines),
    )?;
    out.gauge(
        "captured_maps",
        "Distinct maps the pending deferred closures capture; absent when unknown.",
        &report.pending.captured_maps.map(no_labels).unwrap_or_default(),
    )
}

fn encode_governor(
    out: &mut Families,
    report: &Report,
    duty_cycles: &[(SampledFamily, f64); 4],
) -> std::fmt::Result {
    let governor = &report.governor;
    let family = |f: SampledFamily| vec![("family", f.name().to_owned())];
    let sampled = |f: SampledFamily| governor.sampled.iter().find(|s| s.family == f);
    out.gauge(
        "governor_duty_cycle",
        "Fraction of each second a probe family the governor may sample is attached now \
         (goroutine_exits, stack_defers, allocations, map_writes); 1: always on.",
        &duty_cycles.map(|(f, duty)| (family(f), duty)),
    )?;
    out.gauge(
        "governor_sampled",
        "1 once the governor has sampled the family: its deferprobe_calls_total then counts \
         only the sampled windows (goroutine_exits: goroutine_exit, stack_defers: \
         deferproc_stack, allocations: mallocgc, map_writes: mapassign); 0 while exact.",
        &duty_cycles.map(|(f, _)| (family(f), sampled(f).is_some() as u64)),
    )?;
    out.gauge(
        "governor_estimated_calls",
        "Estimate of a sampled family's calls since the probes were attached: the calls seen, \
         scaled up by the duty cycle (an estimate, not a count).",
        &governor.sampled.iter().map(|s| (family(s.family), s.estimated_calls)).collect::<Vec<_>>(),
    )?;
    out.gauge(
        "governor_estimated_calls_error",
        "One standard deviation of deferprobe_governor_estimated_calls.",
        &governor
            .sampled
            .iter()
            .map(|s| (family(s.family), s.estimated_calls_error))
            .collect::<Vec<_>>(),
    )?;
    let seconds = |ns: Option<u64>| ns.map(|ns| no_labels(ns as f64 / 1e9)).unwrap_or_default();
    out.gauge(
        "governor_calibrated_hit_cost_seconds",
        "What one probe hit cost on this machine, calibrated at start; absent if calibration \
         failed.",
        &seconds(governor.hit_cost_ns),
    )?;
    out.gauge(
        "governor_measured_hit_cost_seconds",
        "What a probe hit really costs the target, measured from its CPU time across the \
         sampling windows; absent until enough ticks had windows.",
        &seconds(governor.measured_hit_cost_ns),
    )?;
    out.gauge(
        "governor_measured_hit_cost_error_seconds",
        "One standard error of deferprobe_governor_measured_hit_cost_seconds.",
        &seconds(governor.measured_hit_cost_error_ns),
    )?;
    out.gauge(
        "governor_planned_hit_cost_seconds",
        "What the governor counts a probe hit as costing when it keeps the budget.",
        &seconds(Some(governor.planned_hit_cost_ns)),
    )?;
    out.gauge(
        "governor_max_overhead_ratio",
        "The budget: --max-overhead as a fraction of one CPU.",
        &no_labels(governor.max_overhead_percent / 100.0),
    )?;
    out.gauge(
        "governor_defer_probes_cpu_ratio",
        "What the always-on defer probes cost on average, as a fraction of one CPU (their hits \
         times the planned cost per hit).",
        &no_labels(governor.defer_probes_percent / 100.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{SiteReport, tests::sample};

    fn site(function: &str, line: u32, pending: u64, est_bytes: Option<u64>) -> SiteReport {
        SiteReport {
            pc: format!("{:#x}", 0x1000 + line),
            module: None,
            function: Some(function.into()),
            file: Some("/src/app/main.go".into()),
            line: Some(line),
            registered: Some(pending + 1),
            pending_before_trace: 0,
            pending_registration_lost: 0,
            pending_unprobed: 0,
            released: Some(1),
            pending,
            est_bytes,
            captures: Vec::new(),
        }
    }

    const DUTY: [(SampledFamily, f64); 4] = [
        (SampledFamily::GoroutineExits, 1.0),
        (SampledFamily::StackDefers, 1.0),
        (SampledFamily::Allocations, 0.25),
        (SampledFamily::MapWrites, 1.0),
    ];

    fn scrape(report: Report, top_sites: usize) -> String {
        let metrics = TraceMetrics::new(top_sites);
        metrics.publish(report, DUTY);
        encode(&metrics.registry())
    }

    /// The value of the series `series` (name and labels, as written) in `text`.
    fn value(text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|line| Some(line.strip_prefix(series)?.strip_prefix(' ')?.to_owned()))
    }

    #[test]
    fn nothing_before_the_first_report() {
        assert_eq!(encode(&TraceMetrics::new(20).registry()), "");
    }

    #[test]
    fn counters_are_totals_per_family_and_call() {
        let text = scrape(sample(), 20);
        assert_eq!(
            value(&text, r#"deferprobe_calls_total{family="defers",call="deferproc"}"#),
            Some("20".into()),
            "{text}"
        );
        assert!(text.contains("# TYPE deferprobe_calls_total counter\n"), "{text}");
        assert_eq!(
            value(&text, r#"deferprobe_lost_events_total{cause="ring_buffer_full"}"#),
            Some("2".into())
        );
        assert_eq!(
            value(&text, r#"deferprobe_lost_events_total{cause="undecodable"}"#),
            Some("1".into())
        );
        assert_eq!(value(&text, "deferprobe_allocated_bytes_total"), Some("0".into()));
        assert_eq!(
            value(
                &text,
                r#"deferprobe_target_info{pid="42",exe="/srv/app",go_version="go1.27.3"}"#
            ),
            Some("1".into()),
            "{text}"
        );
    }

    #[test]
    fn families_not_probed_have_no_series() {
        let mut report = sample();
        report.counts.mapassign = None;
        report.counts.mallocgc = None;
        report.counts.alloc_bytes = None;
        let text = scrape(report, 20);
        assert!(!text.contains(r#"call="mapassign""#), "{text}");
        assert!(!text.contains(r#"call="mallocgc""#), "{text}");
        assert!(!text.contains("deferprobe_allocated_bytes_total"), "{text}");
        assert!(!text.contains(r#"call="profilealloc""#), "{text}");
    }

    #[test]
    fn every_metric_has_help_and_a_type() {
        let text = scrape(sample(), 20);
        let mut names: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(['{', ' ']).next().unwrap())
            .collect();
        names.dedup();
        assert!(names.len() > 15, "{text}");
        for name in names {
            assert!(name.starts_with("deferprobe_"), "{name}");
            let help = text.lines().find_map(|l| l.strip_prefix(&format!("# HELP {name} ")));
            assert!(help.is_some_and(|h| h.len() > 20), "no HELP for {name}:\n{text}");
            assert!(text.contains(&format!("# TYPE {name} ")), "no TYPE for {name}");
            if text.contains(&format!("# TYPE {name} counter")) {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
    }

    #[test]
    fn the_governor_shows_duty_cycles_estimates_and_costs() {
        let text = scrape(sample(), 20);
        let v = |series: &str| value(&text, series).unwrap_or_else(|| panic!("{series}\n{text}"));
        assert_eq!(v(r#"deferprobe_governor_duty_cycle{family="allocations"}"#), "0.25");
        assert_eq!(v(r#"deferprobe_governor_duty_cycle{family="map_writes"}"#), "1.0");
        assert_eq!(v(r#"deferprobe_governor_sampled{family="allocations"}"#), "1");
        assert_eq!(v(r#"deferprobe_governor_sampled{family="stack_defers"}"#), "0");
        assert_eq!(v(r#"deferprobe_governor_estimated_calls{family="allocations"}"#), "4000");
        assert!(!text.contains(r#"deferprobe_governor_estimated_calls{family="map_writes"}"#));
        assert_eq!(v("deferprobe_governor_calibrated_hit_cost_seconds"), "0.00002");
        assert_eq!(v("deferprobe_governor_planned_hit_cost_seconds"), "0.00003");
        assert_eq!(v("deferprobe_governor_max_overhead_ratio"), "0.05");
        // Unknown until measured: absent, not 0.
        assert!(!text.contains("deferprobe_governor_measured_hit_cost_seconds "), "{text}");
    }

    #[test]
    fn sites_beyond_the_top_are_summed_as_other() {
        let mut report = sample();
        report.sites = vec![
            site("main.a", 10, 50, Some(5000)),
            site("main.b", 20, 30, None),
            site("main.c", 30, 7, Some(700)),
            site("main.d", 40, 3, Some(300)),
            // Two sites with one name (two defers on a line): one series.
            site("main.a", 10, 5, Some(500)),
        ];
        let text = scrape(report, 2);
        let v = |series: &str| value(&text, series);
        assert_eq!(
            v(r#"deferprobe_pending_defers{site="main.a (main.go:10)"}"#),
            Some("55".into())
        );
        assert_eq!(
            v(r#"deferprobe_pending_defers{site="main.b (main.go:20)"}"#),
            Some("30".into())
        );
        assert_eq!(v(r#"deferprobe_pending_defers{site="other"}"#), Some("10".into()));
        assert_eq!(text.matches("deferprobe_pending_defers{").count(), 3, "{text}");
        assert_eq!(
            v(r#"deferprobe_retained_bytes{site="main.a (main.go:10)"}"#),
            Some("5500".into())
        );
        // Unknown: no series.
        assert_eq!(v(r#"deferprobe_retained_bytes{site="main.b (main.go:20)"}"#), None);
        assert_eq!(v(r#"deferprobe_retained_bytes{site="other"}"#), Some("1000".into()));
    }

    #[test]
    fn a_new_report_replaces_the_last() {
        let metrics = TraceMetrics::new(20);
        let registry = metrics.registry();
        let mut report = sample();
        metrics.publish(report.clone(), DUTY);
        report.counts.deferproc = Some(25);
        metrics.publish(report, DUTY);
        let text = encode(&registry);
        assert_eq!(
            value(&text, r#"deferprobe_calls_total{family="defers",call="deferproc"}"#),
            Some("25".into())
        );
    }
}
