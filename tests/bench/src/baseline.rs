//! The machine's own latency beside a scenario's: while an open-loop scenario runs, a light
//! open-loop load on a trivial endpoint of every node (`GET /healthz` on the admin port: no
//! token, no database, no forwarding, the same process and runtime). Its p99 is what the
//! machine's scheduling, the loopback network and the node's HTTP stack alone cost under
//! that load, so a scenario's p99 can be read against it ("40 ms, with a 35 ms baseline"
//! says the machine, not the write path, is slow).

use crate::client::{Conn, Target};
use crate::stats::{self, ms};
use http::{Method, Uri};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

pub const ENDPOINT: &str = "/healthz";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BaselineReport {
    /// `GET /healthz` of each admin URL.
    pub endpoint: String,
    pub targets: Vec<String>,
    pub offered_rps: f64,
    pub requests: u64,
    /// Answers other than 200, and requests without one.
    pub failed: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub struct BaselineProbe {
    tasks: Vec<JoinHandle<Vec<(u64, bool)>>>,
    targets: Vec<String>,
    rps: f64,
}

/// Starts `rps` requests per second in all (spread evenly over `targets`, one keep-alive
/// connection each) for `duration` from `start`. Latency counts from each request's
/// scheduled time, so a stalled node shows as latency, not as fewer requests.
pub fn start(
    targets: &[Arc<Target>],
    rps: f64,
    duration: Duration,
    start: Instant,
    timeout: Duration,
) -> Option<BaselineProbe> {
    if targets.is_empty() || rps <= 0.0 {
        return None;
    }
    let per_target = rps / targets.len() as f64;
    let interval = Duration::from_secs_f64(1.0 / per_target);
    let count = (duration.as_secs_f64() * per_target).floor() as u64;
    let tasks = targets
        .iter()
        .enumerate()
        .map(|(i, target)| {
            let mut conn = Conn::new(target.clone());
            // Targets start staggered, so their requests interleave instead of coinciding.
            let offset = interval.mul_f64(i as f64 / targets.len() as f64);
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
                for k in 0..count {
                    let scheduled = start + offset + interval.mul_f64(k as f64);
                    tokio::time::sleep_until(scheduled.into()).await;
                    let answer = conn
                        .send(
                            Method::GET,
                            Uri::from_static(ENDPOINT),
                            bytes::Bytes::new(),
                            timeout,
                        )
                        .await;
                    let latency =
                        u64::try_from(scheduled.elapsed().as_micros()).unwrap_or(u64::MAX);
                    out.push((latency, matches!(answer, Ok((200, _)))));
                }
                out
            })
        })
        .collect();
    Some(BaselineProbe {
        tasks,
        targets: targets.iter().map(|t| t.base.clone()).collect(),
        rps,
    })
}

impl BaselineProbe {
    pub async fn finish(self) -> BaselineReport {
        let mut samples = Vec::new();
        for task in self.tasks {
            // A panicked task loses its samples; `requests` then shows the gap.
            samples.extend(task.await.unwrap_or_default());
        }
        summarize(&samples, self.targets, self.rps)
    }
}

fn summarize(samples: &[(u64, bool)], targets: Vec<String>, rps: f64) -> BaselineReport {
    let mut h = stats::histogram();
    for (latency, _) in samples {
        h.saturating_record((*latency).max(1));
    }
    BaselineReport {
        endpoint: format!("GET {ENDPOINT} (admin port)"),
        targets,
        offered_rps: rps,
        requests: samples.len() as u64,
        failed: samples.iter().filter(|(_, ok)| !ok).count() as u64,
        p50_ms: if samples.is_empty() {
            0.0
        } else {
            ms(h.value_at_quantile(0.50))
        },
        p99_ms: if samples.is_empty() {
            0.0
        } else {
            ms(h.value_at_quantile(0.99))
        },
        max_ms: ms(h.max()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_count_failures_and_take_percentiles_of_every_request() {
        let mut samples: Vec<(u64, bool)> = (1..=100).map(|i| (i * 1000, true)).collect();
        samples[10].1 = false;
        let r = summarize(&samples, vec!["http://a".into()], 50.0);
        assert_eq!(r.requests, 100);
        assert_eq!(r.failed, 1);
        assert!((r.p50_ms - 50.0).abs() < 0.1, "{r:?}");
        assert!((r.p99_ms - 99.0).abs() < 0.1, "{r:?}");
        assert!((r.max_ms - 100.0).abs() < 0.1, "{r:?}");
        assert_eq!(summarize(&[], vec![], 50.0).p99_ms, 0.0);
    }

    #[tokio::test]
    async fn a_probe_of_a_live_server_records_its_answers_on_schedule() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let target = Arc::new(Target::parse(&format!("http://{addr}")).expect("target"));
        let down = Arc::new(Target::parse("http://127.0.0.1:9").expect("target"));
        let probe = start(
            &[target, down],
            100.0,
            Duration::from_millis(500),
            Instant::now(),
            Duration::from_secs(1),
        )
        .expect("probe");
        let r = probe.finish().await;
        server.abort();
        // 50 per second to each target for half a second; the closed port's all fail.
        assert_eq!(r.requests, 50, "{r:?}");
        assert_eq!(r.failed, 25, "{r:?}");
    }
}
