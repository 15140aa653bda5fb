//! Phi-accrual suspicion on heartbeat arrivals (Hayashibara et al.): how unlikely it is, given the
//! intervals seen so far, that a heartbeat still comes after this long. Phi 8 means about one
//! chance in 10^8.

use std::collections::VecDeque;

pub struct Phi {
    intervals: VecDeque<f64>,
    /// Sum and sum of squares of `intervals`, kept so that `phi` costs the same for any window.
    sum: f64,
    sum_sq: f64,
    last: Option<f64>,
    /// The interval the sender announced: the rhythm assumed until intervals are seen.
    expected: f64,
}

const WINDOW: usize = 100;

impl Phi {
    /// `expected`: the sender's announced heartbeat interval, in seconds.
    pub fn new(expected: f64) -> Phi {
        Phi { intervals: VecDeque::new(), sum: 0.0, sum_sq: 0.0, last: None, expected }
    }

    /// A heartbeat arrived at `t` (seconds).
    pub fn arrival(&mut self, t: f64) {
        if let Some(l) = self.last
            && t > l
        {
            // Gaps far from the announced interval are not the sender's rhythm: a long one is an
            // outage (learning it would make the next outage look normal), a short one a
            // reconnection that restarted the sender's timer.
            let gap = t - l;
            if gap >= self.expected / 2.0 && gap <= self.expected * 1.5 {
                if self.intervals.len() == WINDOW
                    && let Some(old) = self.intervals.pop_front()
                {
                    self.sum -= old;
                    self.sum_sq -= old * old;
                }
                self.intervals.push_back(gap);
                self.sum += gap;
                self.sum_sq += gap * gap;
            }
        }
        if self.last.is_none_or(|l| t > l) {
            self.last = Some(t);
        }
    }

    /// The mean and the variance of the learned intervals (the announced interval until then).
    pub fn rhythm(&self) -> (f64, f64) {
        let n = self.intervals.len() as f64;
        if self.intervals.is_empty() {
            (self.expected, 0.0)
        } else {
            let mean = self.sum / n;
            // Rounding in the running sums can leave a tiny negative variance.
            (mean, (self.sum_sq / n - mean * mean).max(0.0))
        }
    }

    /// The suspicion level at `now`; 0 until a heartbeat was seen.
    pub fn phi(&self, now: f64) -> f64 {
        let Some(last) = self.last else { return 0.0 };
        let (mean, var) = self.rhythm();
        // The deviation is held between a twentieth and a tenth of the interval: a very regular
        // sender is not suspected at the first small delay, and an irregular one (or one whose
        // outages' edges were learned) is still suspected soon. Suspicion only makes a node probed
        // every second (verdicts need failed probes), so it may come early: with phi 8 this puts
        // it 3 to 5 s after a 10 s heartbeat is due.
        let std = var.sqrt().clamp(self.expected / 20.0, self.expected / 10.0);
        let y = (now - last - mean) / std;
        // Logistic approximation of the normal CDF's tail.
        let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
        let p_later = if y > 0.0 { e / (1.0 + e) } else { 1.0 - 1.0 / (1.0 + e) };
        -p_later.max(1e-300).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspicion_grows_with_silence() {
        let mut p = Phi::new(10.0);
        for i in 0..20 {
            p.arrival(i as f64 * 10.0);
        }
        let last = 190.0;
        assert!(p.phi(last + 10.0) < 1.0, "on time");
        assert!(p.phi(last + 12.0) < 8.0, "a little late");
        assert!(p.phi(last + 14.0) > 8.0, "four seconds late with a 0.5 s deviation floor: suspected");
        assert!(p.phi(last + 30.0) > p.phi(last + 14.0));
        assert_eq!(Phi::new(10.0).phi(5.0), 0.0, "no heartbeat yet, no suspicion");
        // From the first heartbeat the announced interval is the rhythm.
        let mut fresh = Phi::new(10.0);
        fresh.arrival(100.0);
        assert!(fresh.phi(110.0) < 1.0);
        assert!(fresh.phi(114.0) > 8.0);
        // An outage is not learned as the rhythm: the next silence is suspected as fast.
        p.arrival(last + 100.0);
        p.arrival(last + 110.0);
        assert!(p.phi(last + 110.0 + 14.0) > 8.0);
        // Nor is a reconnection's short gap.
        p.arrival(last + 112.0);
        assert!(p.phi(last + 112.0 + 14.0) > 8.0);
        // Late heartbeats around outages that are learned widen the deviation only up to a tenth
        // of the interval: suspicion still comes within about 15 s of silence.
        let mut t = last + 112.0;
        for gap in [14.0, 13.0, 14.5, 6.0, 14.0, 13.5] {
            t += gap;
            p.arrival(t);
        }
        let (_, var) = p.rhythm();
        assert!(var.sqrt() > 1.0, "the learned deviation is wide: {}", var.sqrt());
        assert!(p.phi(t + 16.0) > 8.0, "phi {} after 16 s of silence", p.phi(t + 16.0));
    }

    #[test]
    fn the_running_window_equals_the_window() {
        // Irregular gaps (7 to 13 s) long enough for the window to slide.
        let (mut p, mut t) = (Phi::new(10.0), 0.0);
        let mut gaps = Vec::new();
        for i in 0..(3 * WINDOW) {
            let gap = 7.0 + (i * 37 % 61) as f64 / 10.0;
            t += gap;
            p.arrival(t);
            if i > 0 {
                gaps.push(gap);
            }
        }
        let w = &gaps[gaps.len() - WINDOW..];
        let mean = w.iter().sum::<f64>() / w.len() as f64;
        let var = w.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / w.len() as f64;
        let (m, v) = p.rhythm();
        assert!((m - mean).abs() < 1e-9 && (v - var).abs() < 1e-9, "({m}, {v}) vs ({mean}, {var})");
    }
}
