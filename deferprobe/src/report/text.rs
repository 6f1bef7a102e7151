//! The report as text for an 80-column terminal: header, counts, pending heap defers, findings
//! (most memory first), the top defer sites and notes.

use std::fmt::Write as _;

use super::*;

/// The findings section of a text report (also `snapshot`'s).
pub fn write_findings(out: &mut String, findings: &[Finding]) {
    if findings.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nfindings (most memory first)");
    for f in findings {
        let age = match f.oldest_pending_secs {
            Some(secs) => format!("oldest {secs:.1}s"),
            None if f.pending_registration_lost > 0 => {
                format!("age unknown ({} registration events lost)", f.pending_registration_lost)
            }
            None if f.pending_before_trace == f.pending_defers => "pending at attach".to_owned(),
            None => format!("{} pending at attach", f.pending_before_trace),
        };
        let _ = writeln!(
            out,
            "  defer accumulation in goroutine {}: {} pending, {age}",
            f.goid, f.pending_defers
        );
        let _ = writeln!(out, "    at   {}", truncate(&place(&f.function, &f.file, f.line), 72));
        match (f.captured_maps, f.captured_maps_by_value, f.captured_maps_by_reference) {
            (Some(maps), Some(by_value), Some(by_reference)) => {
                let _ = writeln!(
                    out,
                    "    maps {maps} captured ({by_value} by value, {by_reference} by \
                     reference), {} entries",
                    f.captured_map_entries.unwrap_or(0)
                );
            }
            _ => _ = writeln!(out, "    captures unknown (the runtime's state was not read)"),
        }
        for capture in f.captures.iter().take(4) {
            let what = match capture.entries {
                Some(n) if capture.kind.starts_with("map") => format!(", {n} entries"),
                Some(n) if capture.kind == "slice" => format!(", len {n}"),
                Some(n) if capture.kind == "string" => format!(", {n} bytes"),
                _ => String::new(),
            };
            let line = format!(
                "{} × {} ({}{what}, ~{})",
                capture.captures,
                capture.type_name,
                capture.kind,
                human_bytes(capture.est_bytes)
            );
            let _ = writeln!(out, "    held {}", truncate(&line, 71));
        }
        for origin in f.captured_map_origins.iter().take(3) {
            let place = place(&origin.function, &origin.file, origin.line);
            let _ = writeln!(out, "         {} written at {}", origin.maps, truncate(&place, 56));
        }
        if let Some(bytes) = f.est_bytes {
            let _ = writeln!(out, "    holds ~{} (estimate)", human_bytes(bytes));
        }
    }
}

impl Report {
    /// The human-readable report, at most 80 columns wide.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let t = &self.target;
        let ended = match self.ended_by {
            Some(EndReason::Duration) => "duration reached",
            Some(EndReason::Signal) => "interrupted",
            Some(EndReason::TargetExited) => "target exited",
            Some(EndReason::Exec) => "exec'd another program",
            Some(EndReason::CommandExited) => "the command exited",
            None => "still tracing",
        };
        match &self.interim {
            Some(interim) => {
                _ = writeln!(out, "deferprobe interim report ({} UTC)", interim.written_at)
            }
            None => _ = writeln!(out, "deferprobe report"),
        }
        let _ = writeln!(out, "  target    pid {} ({})", t.pid, t.go_version);
        let _ = writeln!(out, "  exe       {}", truncate(&t.exe, 68));
        if let Some(module) = &t.go_module {
            let _ = writeln!(out, "  go module {}", truncate(module, 68));
        }
        write_namespace(&mut out, t.namespace.as_ref());
        let _ = writeln!(out, "  traced    {:.1}s, {ended}", self.duration_secs);
        if let Some(code) = t.exit_code {
            let _ = writeln!(out, "  exit code {code}");
        }
        let c = &self.counts;
        let _ = writeln!(out, "\ncounts");
        for (label, value) in [
            ("heap defers (deferproc)", c.deferproc),
            ("stack defers (deferprocStack)", c.deferproc_stack),
            ("deferreturn calls", c.deferreturn),
            ("map writes (mapassign)", c.mapassign),
            ("allocations (mallocgc)", c.mallocgc),
            ("allocated bytes", c.alloc_bytes),
            ("goroutine exits", c.goroutine_exits),
            ("lost events", Some(c.lost_events)),
        ] {
            match value {
                Some(value) => _ = writeln!(out, "  {label:<32}{value:>14}"),
                None => _ = writeln!(out, "  {label:<32}{:>14}", "not probed"),
            }
        }
        for cause in self.lost.causes() {
            let _ = writeln!(out, "    {cause}");
        }
        if !self.governor.sampled.is_empty() {
            let _ = writeln!(
                out,
                "\nsampled to stay under {}% of a CPU (counts above: sampled windows only)",
                self.governor.max_overhead_percent
            );
            for sampled in &self.governor.sampled {
                let _ = writeln!(
                    out,
                    "  {:<12} duty min {:.0}%, mean {:.0}%; estimated ~{} calls{}",
                    sampled.family.name(),
                    sampled.min_duty_cycle * 100.0,
                    sampled.mean_duty_cycle * 100.0,
                    sampled.estimated_calls,
                    sampled
                        .estimated_bytes
                        .map(|b| format!(", ~{}", human_bytes(b)))
                        .unwrap_or_default()
                );
                if let (Some(ns), Some(error)) =
                    (sampled.measured_hit_cost_ns, sampled.measured_hit_cost_error_ns)
                {
                    let _ = writeln!(out, "  {:<12} a hit cost the program {ns} ± {error} ns", "");
                }
            }
            if let (Some(ns), Some(error)) =
                (self.governor.measured_hit_cost_ns, self.governor.measured_hit_cost_error_ns)
            {
                let _ = writeln!(
                    out,
                    "  any probe's hit cost the program {ns} ± {error} ns (measured, {} windows)",
                    self.governor.measured_ticks
                );
            }
        }
        if let Some(profiled) = &self.allocations.profiled {
            let _ = writeln!(
                out,
                "\nallocations sampled by the Go runtime's memory profile (--alloc-mode \
                 profiled)\n  {} samples, {}, at MemProfileRate {} ({:?})\n  stand for \
                 ~{} allocations, ~{} (estimates)",
                profiled.samples,
                human_bytes(profiled.sampled_bytes),
                profiled.memprofile_rate,
                profiled.rate_source,
                profiled.estimated_calls,
                human_bytes(profiled.estimated_bytes)
            );
        }
        write_pending(&mut out, &self.pending);
        write_findings(&mut out, &self.findings);
        if !self.sites.is_empty() {
            // "before": already pending when tracing started; "lost": pending, registration
            // event lost (a column only when there are some).
            let lost = self.sites.iter().any(|site| site.pending_registration_lost > 0);
            let _ = write!(
                out,
                "\n{:<38}{:>8}{:>12}{:>10}{:>10}",
                "defer site", "before", "registered", "released", "pending"
            );
            let _ =
                writeln!(out, "{}", if lost { format!("{:>8}", "lost") } else { String::new() });
            for site in self.sites.iter().take(10) {
                let name = truncate(&site_name(site), 36);
                let count =
                    |n: Option<u64>| n.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
                let _ = write!(
                    out,
                    "  {name:<36}{:>8}{:>12}{:>10}{:>10}",
                    site.pending_before_trace,
                    count(site.registered),
                    count(site.released),
                    site.pending
                );
                let _ = match lost {
                    true => writeln!(out, "{:>8}", site.pending_registration_lost),
                    false => writeln!(out),
                };
            }
            write_more_sites(&mut out, self.sites.len());
        }
        write_notes(&mut out, &self.notes);
        out
    }
}

/// The header lines of a target in namespaces of its own (a container).
pub fn write_namespace(out: &mut String, namespace: Option<&crate::target::Namespaces>) {
    let Some(namespace) = namespace else { return };
    let pids: Vec<String> = namespace.pids.iter().map(u32::to_string).collect();
    let own: Vec<&str> =
        [(namespace.own_pid_namespace, "pid"), (namespace.own_mount_namespace, "mount")]
            .into_iter()
            .filter_map(|(own, kind)| own.then_some(kind))
            .collect();
    let _ = writeln!(out, "  namespace own {}; pids {}", own.join(" and "), pids.join(" / "));
    if let Some(path) = &namespace.exe_from_here {
        let _ = writeln!(out, "  read at   {}", truncate(path, 68));
    }
}

/// The notes section of a text report: each note a list item, wrapped at 78 columns.
/// The pending line of a report: records, goroutines, and the maps they capture ("unknown"
/// when what closures capture could not be read).
pub fn write_pending(out: &mut String, pending: &PendingReport) {
    let _ = writeln!(
        out,
        "\npending heap defers: {} in {} goroutine(s), capturing {} map(s)",
        pending.heap_defers,
        pending.goroutines,
        pending.captured_maps.map_or_else(|| "unknown".to_owned(), |n| n.to_string())
    );
}

pub fn write_notes(out: &mut String, notes: &[String]) {
    if notes.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nnotes");
    for note in notes {
        let mut prefix = "  - ";
        for line in wrap(note, 74) {
            let _ = writeln!(out, "{prefix}{line}");
            prefix = "    ";
        }
    }
}

/// After the first 10 of `sites` site rows: how many more the JSON report has.
pub fn write_more_sites(out: &mut String, sites: usize) {
    if sites > 10 {
        let _ = writeln!(out, "  ... {} more sites in the JSON report", sites - 10);
    }
}

/// A site as `function (file:line)`, or its pc when nothing else is known.
pub fn site_name(site: &SiteReport) -> String {
    match (&site.function, &site.file) {
        (Some(_), _) | (_, Some(_)) => place(&site.function, &site.file, site.line),
        _ => site.pc.clone(),
    }
}

/// `function (file:line)`, with what is known.
fn place(function: &Option<String>, file: &Option<String>, line: Option<u32>) -> String {
    let function = function.as_deref().unwrap_or("?");
    match (file, line) {
        (Some(file), Some(line)) => {
            let base = file.rsplit('/').next().unwrap_or(file);
            format!("{function} ({base}:{line})")
        }
        _ => function.to_owned(),
    }
}

/// `text` broken into lines of at most `width` characters at spaces (a longer word stands alone).
pub(super) fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

pub(super) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// `text` cut to `width` characters, with `…` marking the cut (keeps the end: the function
/// name and offset are the informative part).
pub fn truncate(text: &str, width: usize) -> String {
    let len = text.chars().count();
    if len <= width {
        return text.to_owned();
    }
    let tail: String = text.chars().skip(len - (width - 1)).collect();
    format!("…{tail}")
}
