//! Open-loop schedules: the send time of every request is fixed before the run,
//! whatever the answers, so a slow server cannot slow the offered load down.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase {
    pub rps: f64,
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    phases: Vec<Phase>,
}

impl Schedule {
    pub fn new(phases: Vec<Phase>) -> Self {
        Self { phases }
    }

    pub fn constant(rps: f64, duration: Duration) -> Self {
        Self::new(vec![Phase { rps, duration }])
    }

    fn phase_requests(p: &Phase) -> u64 {
        (p.rps * p.duration.as_secs_f64()).floor().max(0.0) as u64
    }

    pub fn total_requests(&self) -> u64 {
        self.phases.iter().map(Self::phase_requests).sum()
    }

    pub fn total_duration(&self) -> Duration {
        self.phases.iter().map(|p| p.duration).sum()
    }

    /// Mean offered rate over the whole schedule.
    pub fn offered_rps(&self) -> f64 {
        let secs = self.total_duration().as_secs_f64();
        if secs == 0.0 {
            0.0
        } else {
            self.total_requests() as f64 / secs
        }
    }

    /// Offered rate at offset `t` (for plotting the target line).
    pub fn rps_at(&self, t: Duration) -> f64 {
        let mut start = Duration::ZERO;
        for p in &self.phases {
            if t < start + p.duration {
                return p.rps;
            }
            start += p.duration;
        }
        0.0
    }

    /// Scheduled offsets from the run start, in microseconds, in order.
    pub fn offsets_us(&self) -> impl Iterator<Item = u64> + '_ {
        let mut phase_start_us = 0u64;
        self.phases.iter().flat_map(move |p| {
            let start = phase_start_us;
            phase_start_us += p.duration.as_micros() as u64;
            let n = Self::phase_requests(p);
            let rps = p.rps;
            (0..n).map(move |j| start + (j as f64 * 1_000_000.0 / rps) as u64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_schedule_is_evenly_spaced() {
        let s = Schedule::constant(1000.0, Duration::from_secs(2));
        let offs: Vec<u64> = s.offsets_us().collect();
        assert_eq!(offs.len(), 2000);
        assert_eq!(s.total_requests(), 2000);
        assert_eq!(offs[0], 0);
        assert_eq!(offs[1], 1000);
        assert_eq!(offs[1999], 1_999_000);
        assert!(offs.windows(2).all(|w| w[1] - w[0] == 1000));
    }

    #[test]
    fn spike_phases_follow_each_other() {
        let s = Schedule::new(vec![
            Phase {
                rps: 100.0,
                duration: Duration::from_secs(2),
            },
            Phase {
                rps: 2000.0,
                duration: Duration::from_secs(1),
            },
            Phase {
                rps: 100.0,
                duration: Duration::from_secs(2),
            },
        ]);
        let offs: Vec<u64> = s.offsets_us().collect();
        assert_eq!(offs.len(), 200 + 2000 + 200);
        assert_eq!(offs[199], 1_990_000);
        assert_eq!(offs[200], 2_000_000);
        assert_eq!(offs[201], 2_000_500);
        assert_eq!(offs[2200], 3_000_000);
        assert!(offs.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s.total_duration(), Duration::from_secs(5));
        assert_eq!(s.rps_at(Duration::from_millis(2500)), 2000.0);
        assert_eq!(s.rps_at(Duration::from_secs(6)), 0.0);
        assert!((s.offered_rps() - 480.0).abs() < 1e-9);
    }
}
