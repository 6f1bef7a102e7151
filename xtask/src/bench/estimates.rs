//! Section 9 of `cargo xtask bench`: how close the governor's estimates of sampled families
//! come to exact counts (issue 13's ±25 % goal). tests/go/benchphases makes a known number of
//! map writes and allocations in phases (a start-up burst, a steady paced phase); each
//! workload runs under `deferprobe run -- CMD` once with a budget that never samples (exact
//! counts: the reference) and once at each of [`BUDGETS`], interleaved, `reps` times.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};

use super::{Ctx, f, goal, median};

/// The budgets the sampled runs trace under (% of a CPU): the default, and one that samples
/// the workloads' families harder.
const BUDGETS: [&str; 2] = ["5", "2"];

/// Workloads: name, benchphases flags. 40,000 map writes and allocations a second cost about
/// 8 % of a CPU here: both families are sampled at either budget.
const WORKLOADS: [(&str, &[&str]); 3] = [
    ("steady", &["-rate", "40000", "-secs", "10"]),
    ("burst then steady", &["-burst", "200000", "-rate", "40000", "-secs", "10"]),
    ("big burst then idle", &["-burst", "1000000", "-rate", "1000", "-secs", "5"]),
];

/// Families compared: name in the report's `governor.sampled`, its counter in `counts`.
const FAMILIES: [(&str, &str); 2] = [("map_writes", "mapassign"), ("allocations", "mallocgc")];

/// The goal: an estimate within this fraction of the exact count.
const GOAL: f64 = 0.25;

/// One traced run: the report, and what the program printed.
fn traced(ctx: &Ctx, phases: &Path, args: &[&str], budget: &str, name: &str) -> Result<Value> {
    let report = ctx.out.join(format!("estimates-{name}.json"));
    let output = Command::new(&ctx.deferprobe)
        .args(["run", "--interval", "1h", "--max-overhead", budget, "--report"])
        .arg(&report)
        .arg("--")
        .arg(phases)
        .args(args)
        .output()
        .with_context(|| format!("running deferprobe on {}", phases.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "deferprobe run -- benchphases {args:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let program = stdout
        .lines()
        .find(|line| line.starts_with('{') && line.contains("map_writes"))
        .with_context(|| format!("no result line from benchphases:\n{stdout}"))?;
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    Ok(json!({ "program": serde_json::from_str::<Value>(program)?, "report": report }))
}

pub(super) fn estimates(ctx: &Ctx, phases: &Path) -> Result<Value> {
    let mut rows = Vec::new();
    for (name, args) in WORKLOADS {
        let slug = name.replace(' ', "-");
        // Per budget, per family: the runs.
        let mut runs: Vec<Vec<Vec<Value>>> = vec![vec![Vec::new(); FAMILIES.len()]; BUDGETS.len()];
        for rep in 0..ctx.reps {
            eprintln!("[bench] estimates: {name}, run {}/{}", rep + 1, ctx.reps);
            let exact = traced(ctx, phases, args, "1000", &format!("{slug}-exact"))?;
            let exact_sampled = &exact["report"]["governor"]["sampled"];
            ensure!(
                exact_sampled.as_array().is_none_or(Vec::is_empty),
                "the reference run of {name} was sampled: {exact_sampled}"
            );
            for (b, budget) in BUDGETS.into_iter().enumerate() {
                let sampled = traced(ctx, phases, args, budget, &format!("{slug}-p{budget}"))?;
                for (index, (family, counter)) in FAMILIES.into_iter().enumerate() {
                    runs[b][index].push(compare(&exact, &sampled, family, counter));
                }
            }
        }
        for (b, budget) in BUDGETS.into_iter().enumerate() {
            for (index, (family, _)) in FAMILIES.into_iter().enumerate() {
                let runs = &runs[b][index];
                let mut errors: Vec<f64> =
                    runs.iter().map(|r| f(&r["relative_error"]).abs()).collect();
                let worst = errors.iter().copied().fold(0.0, f64::max);
                rows.push(json!({
                    "workload": name,
                    "args": args,
                    "budget": budget,
                    "family": family,
                    "median_abs_error": median(&mut errors),
                    "worst_abs_error": worst,
                    "met": worst <= GOAL,
                    "runs": runs,
                }));
            }
        }
    }
    Ok(json!({ "reps": ctx.reps, "rows": rows }))
}

/// One family of one sampled run against the exact run of the same workload.
fn compare(exact: &Value, sampled: &Value, family: &str, counter: &str) -> Value {
    let reference = f(&exact["report"]["counts"][counter]);
    let report = &sampled["report"];
    // A family the governor never sampled was counted whole: its count is exact.
    let entry = (report["governor"]["sampled"].as_array().into_iter().flatten())
        .find(|s| s["family"] == family);
    let (estimated, error, duty) = match entry {
        Some(s) => (
            f(&s["estimated_calls"]),
            s["estimated_calls_error"].clone(),
            s["mean_duty_cycle"].clone(),
        ),
        None => (f(&report["counts"][counter]), json!(0.0), json!(1.0)),
    };
    json!({
        "program": sampled["program"][family],
        "exact": reference,
        "observed": report["counts"][counter],
        "estimated": estimated,
        "estimated_error": error,
        "sampled": entry.is_some(),
        "mean_duty_cycle": duty,
        "relative_error": estimated / reference.max(1.0) - 1.0,
    })
}

pub(super) fn render(s: &mut String, estimates: &Value) {
    let _ = writeln!(
        s,
        "\n#### 9. Estimates of sampled families ({} runs per workload and budget)\n",
        estimates["reps"]
    );
    let _ = writeln!(
        s,
        "tests/go/benchphases under `deferprobe run --max-overhead P -- …`, each run against the \
         same workload traced with every probe on (`--max-overhead 1000`: exact counts). Goal: \
         every estimate within ±{:.0} % of the exact count. Per run: estimated (± one standard \
         error, as the report gives it) against exact, the relative error, and the family's \
         mean duty cycle.\n",
        GOAL * 100.0
    );
    let _ = writeln!(
        s,
        "| workload | P | family | runs: estimated ± error / exact (error, duty) | worst | goal |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for row in estimates["rows"].as_array().into_iter().flatten() {
        let runs: Vec<String> = row["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                format!(
                    "{:.0} ± {:.0} / {:.0} ({:+.1} %, {:.2})",
                    f(&r["estimated"]),
                    f(&r["estimated_error"]),
                    f(&r["exact"]),
                    f(&r["relative_error"]) * 100.0,
                    f(&r["mean_duty_cycle"]),
                )
            })
            .collect();
        let args: Vec<&str> =
            row["args"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let _ = writeln!(
            s,
            "| {} (`{}`) | {} | {} | {} | {:.1} % | {} |",
            row["workload"].as_str().unwrap_or("?"),
            args.join(" "),
            row["budget"].as_str().unwrap_or("?"),
            row["family"].as_str().unwrap_or("?"),
            runs.join("; "),
            f(&row["worst_abs_error"]) * 100.0,
            goal(row["met"].as_bool().unwrap_or(false)),
        );
    }
}
