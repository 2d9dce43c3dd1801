//! Latency and throughput figures from the per-request records (HdrHistogram).

use crate::engine::{Record, STATUS_ERROR, STATUS_REFUSED};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// 1 µs to one hour at 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, 3_600_000_000, 3) {
        Ok(h) => h,
        // The bounds are constants that hdrhistogram accepts.
        Err(e) => panic!("histogram bounds: {e}"),
    }
}

pub(crate) fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub fn status_key(status: u16) -> String {
    match status {
        STATUS_ERROR => "error".to_owned(),
        STATUS_REFUSED => "refused".to_owned(),
        s => s.to_string(),
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub requests: u64,
    pub achieved_rps: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Longest time between two successive successful answers (2xx or 409),
    /// counting from the run start: how long the wallet was unavailable at worst.
    pub longest_gap_ms: f64,
    pub status_counts: BTreeMap<String, u64>,
}

pub fn longest_gap_us(records: &[Record]) -> u64 {
    let mut done: Vec<u64> = records
        .iter()
        .filter(|r| (200..300).contains(&r.status) || r.status == 409)
        .map(Record::completed_us)
        .collect();
    done.sort_unstable();
    let mut prev = 0;
    let mut gap = 0;
    for t in done {
        gap = gap.max(t - prev);
        prev = t;
    }
    gap
}

pub fn summarize(records: &[Record], elapsed: Duration) -> Summary {
    let mut h = histogram();
    let mut status_counts = BTreeMap::new();
    for r in records {
        h.saturating_record(r.latency_us.max(1));
        *status_counts.entry(status_key(r.status)).or_insert(0) += 1;
    }
    let secs = elapsed.as_secs_f64();
    // Throughput counts HTTP answers; requests that got none are not throughput.
    let answered = records.iter().filter(|r| r.status >= 100).count() as f64;
    Summary {
        requests: records.len() as u64,
        achieved_rps: if secs > 0.0 {
            (answered / secs * 10.0).round() / 10.0
        } else {
            0.0
        },
        p50_ms: ms(h.value_at_quantile(0.50)),
        p95_ms: ms(h.value_at_quantile(0.95)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
        mean_ms: h.mean().round() / 1000.0,
        longest_gap_ms: ms(longest_gap_us(records)),
        status_counts,
    }
}

/// One second of the run, by completion time.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SecondPoint {
    pub t_s: u64,
    pub completed: u64,
    /// Answers other than 2xx and 409, plus requests with no answer.
    pub failed: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub fn series(records: &[Record]) -> Vec<SecondPoint> {
    let last = records.iter().map(|r| r.completed_us() / 1_000_000).max();
    let Some(last) = last else { return Vec::new() };
    let mut buckets: Vec<(Histogram<u64>, u64, u64)> =
        (0..=last).map(|_| (histogram(), 0, 0)).collect();
    for r in records {
        let b = &mut buckets[(r.completed_us() / 1_000_000) as usize];
        b.0.saturating_record(r.latency_us.max(1));
        b.1 += 1;
        if !(200..300).contains(&r.status) && r.status != 409 {
            b.2 += 1;
        }
    }
    buckets
        .into_iter()
        .enumerate()
        .map(|(t, (h, completed, failed))| SecondPoint {
            t_s: t as u64,
            completed,
            failed,
            p50_ms: if completed > 0 {
                ms(h.value_at_quantile(0.5))
            } else {
                0.0
            },
            p99_ms: if completed > 0 {
                ms(h.value_at_quantile(0.99))
            } else {
                0.0
            },
            max_ms: if completed > 0 { ms(h.max()) } else { 0.0 },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Op;

    fn rec(sched_us: u64, latency_us: u64, status: u16) -> Record {
        Record {
            sched_us,
            latency_us,
            status,
            op: Op {
                wallet: 0,
                variant: 0,
            },
            op_id: None,
        }
    }

    #[test]
    fn percentiles_and_statuses() {
        // Latencies 1..=1000 ms.
        let records: Vec<Record> = (1..=1000u64)
            .map(|i| rec(i * 1000, i * 1000, if i % 100 == 0 { 409 } else { 200 }))
            .collect();
        let s = summarize(&records, Duration::from_secs(2));
        assert_eq!(s.requests, 1000);
        assert!((s.p50_ms - 500.0).abs() <= 1.0, "{}", s.p50_ms);
        assert!((s.p95_ms - 950.0).abs() <= 1.0, "{}", s.p95_ms);
        assert!((s.p99_ms - 990.0).abs() <= 1.0, "{}", s.p99_ms);
        assert!((s.max_ms - 1000.0).abs() <= 1.0, "{}", s.max_ms);
        assert_eq!(s.achieved_rps, 500.0);
        assert_eq!(s.status_counts.get("200"), Some(&990));
        assert_eq!(s.status_counts.get("409"), Some(&10));
    }

    #[test]
    fn longest_gap_between_successful_answers() {
        let records = vec![
            rec(0, 1_000, 200),
            rec(10_000, 1_000, 200),   // done at 11 ms
            rec(20_000, 5_000, 0),     // no answer: not a success
            rec(30_000, 500_000, 409), // done at 530 ms: gap 519 ms
            rec(600_000, 1_000, 200),  // 601 ms
        ];
        assert_eq!(longest_gap_us(&records), 519_000);
        assert_eq!(longest_gap_us(&[]), 0);
    }

    #[test]
    fn unanswered_requests_are_not_throughput() {
        let records = vec![
            rec(0, 10, 200),
            rec(0, 10, STATUS_ERROR),
            rec(0, 10, STATUS_REFUSED),
            rec(0, 10, 503),
        ];
        let s = summarize(&records, Duration::from_secs(1));
        assert_eq!(s.achieved_rps, 2.0);
        assert_eq!(s.status_counts.get("error"), Some(&1));
        assert_eq!(s.status_counts.get("refused"), Some(&1));
        assert_eq!(s.status_counts.get("503"), Some(&1));
    }

    #[test]
    fn series_buckets_by_completion_second() {
        let records = vec![
            rec(0, 500_000, 200),
            rec(900_000, 200_000, 200),   // completes at 1.1 s
            rec(1_000_000, 2_500_000, 0), // completes at 3.5 s
            rec(1_500_000, 100_000, 503), // 1.6 s
        ];
        let s = series(&records);
        assert_eq!(s.len(), 4);
        assert_eq!((s[0].completed, s[0].failed), (1, 0));
        assert_eq!((s[1].completed, s[1].failed), (2, 1));
        assert_eq!((s[2].completed, s[2].failed), (0, 0));
        assert_eq!((s[3].completed, s[3].failed), (1, 1));
        assert!((s[3].max_ms - 2500.0).abs() <= 2.0);
        assert!(series(&[]).is_empty());
    }
}
