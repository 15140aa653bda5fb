//! Phi-accrual suspicion on heartbeat arrivals (Hayashibara et al.): how unlikely it is, given the
//! intervals seen so far, that a heartbeat still comes after this long. Phi 8 means about one
//! chance in 10^8.

use std::collections::VecDeque;

pub struct Phi {
    intervals: VecDeque<f64>,
    last: Option<f64>,
    /// A floor on the deviation, so that a very regular sender is not suspected at the first delay.
    min_std: f64,
    /// Gaps longer than this are outages, not the sender's rhythm: they are not learned (one
    /// outage would otherwise make the next one look normal).
    max_interval: f64,
}

const WINDOW: usize = 100;

impl Phi {
    pub fn new(min_std: f64, max_interval: f64) -> Phi {
        Phi { intervals: VecDeque::new(), last: None, min_std, max_interval }
    }

    /// A heartbeat arrived at `t` (seconds).
    pub fn arrival(&mut self, t: f64) {
        if let Some(l) = self.last
            && t > l
            && t - l <= self.max_interval
        {
            if self.intervals.len() == WINDOW {
                self.intervals.pop_front();
            }
            self.intervals.push_back(t - l);
        }
        if self.last.is_none_or(|l| t > l) {
            self.last = Some(t);
        }
    }

    /// The suspicion level at `now`; 0 until two heartbeats were seen.
    pub fn phi(&self, now: f64) -> f64 {
        let (Some(last), false) = (self.last, self.intervals.is_empty()) else { return 0.0 };
        let n = self.intervals.len() as f64;
        let mean = self.intervals.iter().sum::<f64>() / n;
        let var = self.intervals.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let std = var.sqrt().max(self.min_std);
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
        let mut p = Phi::new(1.0, 20.0);
        for i in 0..20 {
            p.arrival(i as f64 * 10.0);
        }
        let last = 190.0;
        assert!(p.phi(last + 10.0) < 1.0, "on time");
        assert!(p.phi(last + 12.0) < 8.0, "a little late");
        assert!(p.phi(last + 16.0) > 8.0, "six seconds late with a 1 s deviation floor: suspected");
        assert!(p.phi(last + 30.0) > p.phi(last + 16.0));
        assert_eq!(Phi::new(1.0, 20.0).phi(5.0), 0.0, "no history, no suspicion");
        // An outage is not learned as the rhythm: the next silence is suspected as fast.
        p.arrival(last + 100.0);
        p.arrival(last + 110.0);
        assert!(p.phi(last + 110.0 + 16.0) > 8.0);
    }
}
