//! Scaling a sampled probe family's hits up to the whole trace, with how uncertain that is.
//!
//! While a family is attached for a fraction `f` of a tick and sees `n` hits, the tick's calls
//! are estimated as `n / f`. Were hits to arrive one by one like a Poisson process, that
//! estimate's variance would be about `n (1 − f) / f²`; programs make their calls in clumps
//! (a request's, a batch's), so the sampler also gives the variance its windows show (see
//! [`slice_variance`]), and the larger of the two is kept. While it is detached (duty 0), nothing is seen: a detached span is
//! bridged by the mean of the rates measured on either side of it (the governor's refresh
//! windows measure again every few ticks), with the half-difference of those rates as its
//! uncertainty. A program busy on its CPUs runs slower while probes trap it, so its windows see
//! fewer calls than the rest of the time holds: where the probes took more than
//! [`SLOWED_SHARE`] of its time in the windows, that share of the tick's estimate is added to
//! its uncertainty, and the estimate says it may be low (correcting for it would divide by
//! the program's own share of its time, which a small error in the cost of a hit swamps).
//! Only windows of at least [`MIN_RATE_WINDOW_SECS`] attached measure a rate: the
//! first milliseconds of a trace (often a start-up burst) are counted, never extrapolated. A span still open when tracing ends can only carry the last rate measured: the
//! estimate is then weak, and says so. Pure: the governor's sampler feeds it tick by tick.

/// The shortest time attached in a tick for its hits to stand for a rate: most of one of the
/// governor's refresh windows (2 % of a 1 s tick; the timers that open and close its slices
/// may shorten it a little). Its first decision comes after half a second.
pub const MIN_RATE_WINDOW_SECS: f64 = 0.015;

/// The share of a program's time in its windows above which the probes may have slowed it
/// enough to bias the estimate (see the module's comment).
pub const SLOWED_SHARE: f64 = 0.2;

/// The most a slowed tick's estimate may be low by, as a share of it: the estimate rests on a
/// program whose own time in the windows is 1 − share, and it may be low by share / (1 − share);
/// past 0.9 the uncertainty is counted as that of 0.9 (nine times the estimate).
fn slowed_uncertainty(share: f64) -> f64 {
    let share = share.min(0.9);
    share / (1.0 - share)
}

/// One family's estimate, built tick by tick.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FamilyEstimate {
    /// Calls estimated in ticks where the family was attached, and their variance.
    sampled: f64,
    sampled_variance: f64,
    /// Calls estimated in closed detached spans, and their variance.
    bridged: f64,
    bridged_variance: f64,
    /// The rate (calls per second) measured in the last tick with the family attached for at
    /// least [`MIN_RATE_WINDOW_SECS`], and its variance.
    last_rate: Option<f64>,
    last_rate_variance: f64,
    /// Hits and attached seconds of the windows in a row since the last rate, too short
    /// together to stand for one yet.
    pool_hits: f64,
    pool_seconds: f64,
    /// The variance of those windows' scaled-up calls, and the seconds they stand for.
    pool_variance: f64,
    pool_span: f64,
    /// The rate of such windows before the open span: only for it, if no later window
    /// measures one.
    short_rate: Option<f64>,
    /// Seconds of the detached span since then.
    open_gap: f64,
    /// Seconds traced, and seconds not covered by a measured rate on both sides.
    seconds: f64,
    /// The largest share of a program's time the probes took in a tick's windows, over
    /// [`SLOWED_SHARE`] (None: never that much).
    slowed_share: Option<f64>,
}

/// A family's estimate over the whole trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub calls: f64,
    /// One standard deviation, in calls.
    pub error: f64,
    /// Whether the estimate rests on extrapolating a rate over a span no measurement closes
    /// (longer than a tenth of the trace), or on nothing at all, or on windows in which the
    /// probes may have slowed the program (see `slowed_share`).
    pub weak: bool,
    /// The largest share of the program's time the probes took in a tick's windows, when over
    /// [`SLOWED_SHARE`]: a CPU-bound program ran slower there, and the estimate may be low.
    pub slowed_share: Option<f64>,
}

impl FamilyEstimate {
    /// One tick of `seconds`, the family attached for `fraction` of it, seeing `hits`.
    pub fn tick(&mut self, seconds: f64, fraction: f64, hits: u64) {
        self.tick_with_windows(seconds, fraction, hits, Windows::default());
    }

    /// [`FamilyEstimate::tick`], with what the tick's windows showed.
    pub fn tick_with_windows(&mut self, seconds: f64, fraction: f64, hits: u64, windows: Windows) {
        self.seconds += seconds;
        if fraction <= 0.0 || seconds <= 0.0 {
            if self.pool_seconds > 0.0 {
                self.short_rate = Some(self.pool_hits / self.pool_seconds);
                (self.pool_hits, self.pool_seconds) = (0.0, 0.0);
            }
            self.open_gap += seconds;
            return;
        }
        let fraction = fraction.min(1.0);
        let hits = hits as f64;
        self.sampled += hits / fraction;
        let poisson = hits * (1.0 - fraction) / (fraction * fraction);
        let mut variance = windows.variance.map_or(poisson, |v| v.max(poisson));
        if let Some(share) = windows.probe_share.filter(|share| *share > SLOWED_SHARE)
            && fraction < 1.0
        {
            variance += windows.low_by * windows.low_by;
            self.slowed_share = Some(self.slowed_share.unwrap_or(0.0).max(share));
        }
        self.sampled_variance += variance;
        // Short windows are pooled until together they stand for a rate: a detached span
        // around them waits for it.
        self.pool_hits += hits;
        self.pool_seconds += fraction * seconds;
        self.pool_variance += variance;
        self.pool_span += seconds;
        if self.pool_seconds < MIN_RATE_WINDOW_SECS {
            return;
        }
        let rate = self.pool_hits / self.pool_seconds;
        let rate_variance = self.pool_variance / (self.pool_span * self.pool_span);
        (self.pool_hits, self.pool_seconds, self.short_rate) = (0.0, 0.0, None);
        (self.pool_variance, self.pool_span) = (0.0, 0.0);
        if self.open_gap > 0.0 {
            let (before, before_variance) = match self.last_rate {
                Some(before) => (before, self.last_rate_variance),
                None => (rate, rate_variance),
            };
            self.bridged += (before + rate) / 2.0 * self.open_gap;
            // The rates' own uncertainty, and how far apart they are (the span's calls may
            // have followed either).
            let spread = (rate - before).abs() / 2.0 * self.open_gap;
            let gap = self.open_gap * self.open_gap;
            self.bridged_variance +=
                spread * spread + (before_variance + rate_variance) / 4.0 * gap;
            self.open_gap = 0.0;
        }
        self.last_rate = Some(rate);
        self.last_rate_variance = rate_variance;
    }

    /// The estimate so far: an open detached span carries the last rate (that of a short
    /// window when no longer one measured any), with all of it as its uncertainty.
    pub fn estimate(&self) -> Estimate {
        let open = self.last_rate.or(self.short_rate).unwrap_or(0.0) * self.open_gap;
        let variance = self.sampled_variance + self.bridged_variance + open * open;
        Estimate {
            calls: self.sampled + self.bridged + open,
            error: variance.sqrt(),
            weak: self.last_rate.is_none()
                || self.open_gap > self.seconds / 10.0
                || self.slowed_share.is_some(),
            slowed_share: self.slowed_share,
        }
    }
}

/// What a tick's windows showed of a family, beyond its hits.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Windows {
    /// The variance of the tick's estimate ([`slice_variance`]).
    pub variance: Option<f64>,
    /// The largest share of the program's time the probes took in one of the family's
    /// windows: the probes' hits times their cost, over the longer of the wall time and the
    /// program's CPU time in it.
    pub probe_share: Option<f64>,
    /// How many calls the tick's estimate may be low by: of each window with a share over
    /// [`SLOWED_SHARE`], its calls scaled up to its slice times share / (1 − share).
    pub low_by: f64,
}

impl Windows {
    /// One window, its calls scaled up to its slice, and the share of the program's time the
    /// probes took in it.
    pub fn add_window(&mut self, scaled_calls: f64, probe_share: f64) {
        // More than the whole time: the cost of a hit was overestimated (a calibrated one).
        let probe_share = probe_share.min(1.0);
        self.probe_share = Some(self.probe_share.unwrap_or(0.0).max(probe_share));
        if probe_share > SLOWED_SHARE {
            self.low_by += scaled_calls * slowed_uncertainty(probe_share);
        }
    }
}

/// The variance of a tick's estimate from its windows, one per slice: `windows` holds each
/// window's hits and its share of its slice. Each window scaled up to its slice is a draw of
/// the slice's calls; their scatter, times the number of slices, less the share of the tick
/// seen (a tick seen whole is exact), is the variance of their sum. None with fewer than two
/// windows.
pub fn slice_variance(windows: &[(u64, f64)]) -> Option<f64> {
    let scaled: Vec<f64> = windows
        .iter()
        .filter(|(_, share)| *share > 0.0)
        .map(|(hits, share)| *hits as f64 / share)
        .collect();
    let m = scaled.len();
    if m < 2 {
        return None;
    }
    let mean = scaled.iter().sum::<f64>() / m as f64;
    let scatter = scaled.iter().map(|e| (e - mean) * (e - mean)).sum::<f64>() / (m - 1) as f64;
    let seen = windows.iter().map(|(_, share)| share.min(1.0)).sum::<f64>() / m as f64;
    Some(m as f64 * scatter * (1.0 - seen))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(estimate: &Estimate, exact: f64, tolerance: f64) -> bool {
        (estimate.calls - exact).abs() <= tolerance * exact
    }

    /// Calls in clumps of 400 every 10 ms, seen in 20–30 ms windows of 200 ms slices: the
    /// windows' scatter says far more than Poisson would.
    #[test]
    fn clumped_calls_carry_their_scatter() {
        let windows = [(800, 0.1), (1200, 0.1), (800, 0.1), (800, 0.1), (1200, 0.1)];
        let variance = slice_variance(&windows).unwrap();
        // Scaled: 8000, 12000, 8000, 8000, 12000 → mean 9600, sample variance 4.8 M, × 5 × 0.9.
        assert!((variance - 21.6e6).abs() < 1.0, "{variance}");
        let mut family = FamilyEstimate::default();
        family.tick_with_windows(
            1.0,
            0.1,
            4800,
            Windows { variance: Some(variance), ..Windows::default() },
        );
        let poisson = 4800.0 * 0.9 / 0.01;
        assert!(variance > 40.0 * poisson);
        assert_eq!(family.estimate().error, variance.sqrt());
        // Whole slices seen: exact, whatever the scatter; one window says nothing.
        assert_eq!(slice_variance(&[(10, 1.0), (30, 1.0)]), Some(0.0));
        assert_eq!(slice_variance(&[(10, 0.5)]), None);
    }

    /// A CPU-bound loop in windows where the probes took 60 % of its time: the estimate says it
    /// may be low, and its error covers it.
    #[test]
    fn a_slowed_program_is_flagged_and_uncertain() {
        let mut family = FamilyEstimate::default();
        let mut windows = Windows { variance: Some(0.0), ..Windows::default() };
        // Two windows scaled up to 1000 calls each, the probes taking 60 % and 10 %.
        windows.add_window(1000.0, 0.6);
        windows.add_window(1000.0, 0.1);
        for _ in 0..5 {
            family.tick_with_windows(1.0, 0.5, 1000, windows);
        }
        let estimate = family.estimate();
        assert_eq!(estimate.calls, 10_000.0);
        assert!(estimate.weak);
        assert_eq!(estimate.slowed_share, Some(0.6));
        // Each tick may be low by 1000 × 0.6 / 0.4 = 1500, besides Poisson's 2000 × 0.5 / 0.25:
        // √(5 × (1500² + 2000)).
        assert!((estimate.error - 3355.6).abs() < 0.1, "{estimate:?}");
        // A paced program whose probes took 4 % of its time: no flag.
        let mut paced = FamilyEstimate::default();
        let mut windows = Windows::default();
        windows.add_window(2000.0, 0.04);
        paced.tick_with_windows(1.0, 0.5, 1000, windows);
        assert_eq!(paced.estimate().slowed_share, None);
    }

    #[test]
    fn fully_attached_is_exact() {
        let mut family = FamilyEstimate::default();
        for _ in 0..10 {
            family.tick(1.0, 1.0, 1000);
        }
        assert_eq!(
            family.estimate(),
            Estimate { calls: 10_000.0, error: 0.0, weak: false, slowed_share: None }
        );
    }

    #[test]
    fn windows_scale_up_with_a_poisson_error() {
        let mut family = FamilyEstimate::default();
        for _ in 0..10 {
            family.tick(1.0, 0.25, 250);
        }
        let estimate = family.estimate();
        assert_eq!(estimate.calls, 10_000.0);
        // sqrt(10 × 250 × 0.75 / 0.0625) ≈ 173
        assert!((estimate.error - 173.2).abs() < 0.1, "{estimate:?}");
        assert!(!estimate.weak);
    }

    /// A start-up burst in the first 10 ms, detached at once, then a steady phase: the burst
    /// is counted, and the detached span is bridged by the next window's rate, not the burst's.
    /// (Holding the burst's rate over the span, as before, was off by 34×.)
    #[test]
    fn a_start_up_burst_is_counted_not_extrapolated() {
        let mut family = FamilyEstimate::default();
        family.tick(0.01, 1.0, 1_000); // 100,000/s for 10 ms
        for _ in 0..4 {
            family.tick(1.0, 0.0, 0); // detached: 4 s at 1,000/s really
        }
        family.tick(1.0, 0.05, 50); // a refresh window: 1,000/s
        for _ in 0..5 {
            family.tick(1.0, 1.0, 1_000);
        }
        let exact = 1_000.0 + 4_000.0 + 1_000.0 + 5_000.0;
        let estimate = family.estimate();
        assert!(within(&estimate, exact, 0.01), "{estimate:?}");
        assert!(!estimate.weak);
        let held = 1_000.0 + 100_000.0 * 4.0 + 1_000.0 + 5_000.0;
        assert!(held / exact > 30.0);
    }

    /// A rate that changes while detached: bridged by the mean of both sides, with half their
    /// difference over the span as its error.
    #[test]
    fn a_rate_change_while_detached_is_bridged_with_its_error() {
        let mut family = FamilyEstimate::default();
        family.tick(1.0, 1.0, 2_000);
        for _ in 0..2 {
            family.tick(1.0, 0.0, 0);
        }
        family.tick(1.0, 1.0, 1_000);
        let estimate = family.estimate();
        assert_eq!(estimate.calls, 2_000.0 + 3_000.0 + 1_000.0);
        assert_eq!(estimate.error, 1_000.0);
    }

    #[test]
    fn steady_windows_after_a_burst_are_within_a_quarter() {
        let mut family = FamilyEstimate::default();
        family.tick(0.01, 1.0, 1_000);
        for _ in 0..30 {
            family.tick(1.0, 0.1, 100);
        }
        let estimate = family.estimate();
        assert!(within(&estimate, 31_000.0, 0.25), "{estimate:?}");
    }

    #[test]
    fn an_open_span_at_the_end_is_weak() {
        let mut family = FamilyEstimate::default();
        family.tick(1.0, 1.0, 1_000);
        for _ in 0..5 {
            family.tick(1.0, 0.0, 0);
        }
        let estimate = family.estimate();
        assert_eq!(estimate.calls, 6_000.0);
        assert!(estimate.weak && estimate.error >= 5_000.0, "{estimate:?}");
        assert!(FamilyEstimate::default().estimate().weak);
        // Only a 10 ms window before a span that lasts: that rate, weak, all of it uncertain.
        let mut family = FamilyEstimate::default();
        family.tick(0.01, 1.0, 20);
        family.tick(0.2, 0.005, 0); // attached for 1 ms, nothing seen
        family.tick(3.78, 0.0, 0);
        let estimate = family.estimate();
        let rate = 20.0 / 0.011;
        assert!(
            estimate.weak && (estimate.calls - (20.0 + rate * 3.78)).abs() < 1e-6,
            "{estimate:?}"
        );
        assert!(estimate.error > 3_590.0, "{estimate:?}");
    }
}
