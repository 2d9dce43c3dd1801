//! Load loops for the ledger scenarios, whose requests are not the one POST of
//! engine.rs: transfers, hold-then-capture pairs (two dependent requests per
//! iteration) and point-in-time reads. Same two shapes and the same rules: closed loop,
//! each connection starts its next iteration when the last one answered; open loop,
//! send times fixed beforehand and latency counted from the scheduled time.
//! Every request becomes an `engine::Record`, so stats.rs and the plots work unchanged;
//! `Record::op` carries a tag (which wallet, which kind of request) instead of a mix variant.

use crate::client::{ClientError, Conn, Target};
use crate::engine::{Record, RunOutput, STATUS_ERROR, STATUS_REFUSED};
use crate::rng::Rng;
use crate::schedule::Schedule;
use crate::workload::Op;
use bytes::Bytes;
use http::{Method, Uri};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One connection of a closed loop: sends requests, moving on to the next target when
/// one refuses the connection (the request never left, like engine.rs), and records each.
pub struct Session {
    targets: Vec<Arc<Target>>,
    t: usize,
    conn: Conn,
    start: Instant,
    timeout: Duration,
    pub records: Vec<Record>,
    pub reroutes: u64,
    /// The last request could not connect to any target.
    refused: bool,
}

impl Session {
    pub fn new(targets: Vec<Arc<Target>>, first: usize, start: Instant, timeout: Duration) -> Self {
        let t = first % targets.len().max(1);
        let conn = Conn::new(targets[t].clone());
        Self {
            targets,
            t,
            conn,
            start,
            timeout,
            records: Vec::with_capacity(4096),
            reroutes: 0,
            refused: false,
        }
    }

    /// Base URL of the target the next request goes to (the last one that answered).
    pub fn base(&self) -> &str {
        &self.targets[self.t].base
    }

    /// Sends one request and records it under `tag`; no answer is `STATUS_ERROR` (outcome
    /// unknown), no connection anywhere `STATUS_REFUSED` (certainly not applied).
    pub async fn send(&mut self, method: Method, path: &str, body: Bytes, tag: Op) -> (u16, Bytes) {
        let sent_us = micros(self.start.elapsed());
        let answer = match Uri::try_from(path) {
            Ok(uri) => {
                let n = self.targets.len().max(1);
                let mut answer = self
                    .conn
                    .send(method.clone(), uri.clone(), body.clone(), self.timeout)
                    .await;
                let mut tries = 1;
                while matches!(&answer, Err(e) if e.never_sent()) && tries < n {
                    tries += 1;
                    self.reroutes += 1;
                    self.t = (self.t + 1) % n;
                    self.conn.retarget(self.targets[self.t].clone());
                    answer = self
                        .conn
                        .send(method.clone(), uri.clone(), body.clone(), self.timeout)
                        .await;
                }
                answer
            }
            Err(_) => Err(ClientError::BadUrl(path.to_owned())),
        };
        let latency_us = micros(self.start.elapsed()).saturating_sub(sent_us);
        let (status, body) = match answer {
            Ok(a) => a,
            Err(e) if e.never_sent() => (STATUS_REFUSED, Bytes::new()),
            Err(_) => (STATUS_ERROR, Bytes::new()),
        };
        self.refused = status == STATUS_REFUSED;
        self.records.push(Record {
            sched_us: sent_us,
            latency_us,
            status,
            op: tag,
            op_id: None,
        });
        (status, body)
    }
}

/// What one closed-loop iteration does; `Out` is what the check needs to know about it.
pub trait Iteration: Send + Sync + 'static {
    type Out: Send + 'static;
    fn run(&self, s: &mut Session, rng: &mut Rng) -> impl Future<Output = Self::Out> + Send;
}

/// `connections` connections (round-robin over the targets), each running iterations
/// back to back until `duration` has passed since `start`.
pub async fn closed<I: Iteration>(
    targets: &[Arc<Target>],
    timeout: Duration,
    connections: usize,
    duration: Duration,
    start: Instant,
    seed: u64,
    iteration: Arc<I>,
) -> (RunOutput, Vec<I::Out>) {
    let mut handles = Vec::new();
    for c in 0..connections.max(1) {
        let targets = targets.to_vec();
        let iteration = iteration.clone();
        let mut rng = Rng::new(seed ^ (c as u64).wrapping_mul(0x9E37_79B9));
        handles.push(tokio::spawn(async move {
            let mut s = Session::new(targets, c, start, timeout);
            let mut outs = Vec::with_capacity(2048);
            while start.elapsed() < duration {
                outs.push(iteration.run(&mut s, &mut rng).await);
                if s.refused {
                    // Every target refused: do not spin at full speed on refusals.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            let connects = s.conn.connects;
            (s.records, outs, s.reroutes, connects)
        }));
    }
    let mut out = RunOutput::default();
    let mut outs = Vec::new();
    for h in handles {
        // A panicking connection loses its records; the counts then show the gap.
        if let Ok((records, o, reroutes, connects)) = h.await {
            out.records.extend(records);
            outs.extend(o);
            out.reroutes += reroutes;
            out.connects += connects;
        }
    }
    finish(&mut out);
    (out, outs)
}

fn finish(out: &mut RunOutput) {
    out.records.sort_by_key(|r| r.sched_us);
    out.elapsed = Duration::from_micros(
        out.records
            .iter()
            .map(Record::completed_us)
            .max()
            .unwrap_or(0),
    );
}

/// The GETs of an open loop: request `i` of the schedule and what to keep of its answer.
pub trait OpenRequest: Send + Sync + 'static {
    type Out: Send + 'static;
    fn path(&self, i: u64) -> String;
    fn tag(&self, i: u64) -> Op;
    fn keep(&self, i: u64, status: u16, body: &[u8]) -> Option<Self::Out>;
}

#[derive(Debug, Clone, Copy)]
struct Job {
    i: u64,
    sched_us: u64,
}

/// Runs `schedule` as GETs with `connections` keep-alive connections spread over the
/// targets (request i to target i mod n; a refused connection tries the next target).
pub async fn open_get<R: OpenRequest>(
    targets: &[Arc<Target>],
    timeout: Duration,
    schedule: &Schedule,
    connections: usize,
    start: Instant,
    request: Arc<R>,
) -> (RunOutput, Vec<R::Out>) {
    let n = targets.len().max(1);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| flume::unbounded::<Job>()).unzip();
    let mut handles = Vec::new();
    for c in 0..connections.max(n) {
        let t = c % n;
        let rx = rxs[t].clone();
        let request = request.clone();
        let targets = targets.to_vec();
        handles.push(tokio::spawn(async move {
            let mut conn = Conn::new(targets[t].clone());
            let mut records = Vec::with_capacity(1024);
            let mut outs = Vec::new();
            let mut reroutes = 0u64;
            while let Ok(job) = rx.recv_async().await {
                let path = request.path(job.i);
                let answer = match Uri::try_from(path.as_str()) {
                    Ok(uri) => {
                        let mut answer = conn.get(&path, timeout).await;
                        let mut k = 1;
                        while matches!(&answer, Err(e) if e.never_sent()) && k < n {
                            // Rare (a node is down): a one-off connection to the next one.
                            reroutes += 1;
                            let mut other = Conn::new(targets[(t + k) % n].clone());
                            answer = other
                                .send(Method::GET, uri.clone(), Bytes::new(), timeout)
                                .await;
                            k += 1;
                        }
                        answer
                    }
                    Err(_) => Err(ClientError::BadUrl(path.clone())),
                };
                let latency_us = micros(start.elapsed()).saturating_sub(job.sched_us);
                let (status, body) = match answer {
                    Ok(a) => a,
                    Err(e) if e.never_sent() => (STATUS_REFUSED, Bytes::new()),
                    Err(_) => (STATUS_ERROR, Bytes::new()),
                };
                if let Some(o) = request.keep(job.i, status, &body) {
                    outs.push(o);
                }
                records.push(Record {
                    sched_us: job.sched_us,
                    latency_us,
                    status,
                    op: request.tag(job.i),
                    op_id: None,
                });
            }
            (records, outs, reroutes, conn.connects)
        }));
    }
    drop(rxs);
    for (i, sched_us) in schedule.offsets_us().enumerate() {
        let at = start + Duration::from_micros(sched_us);
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
        }
        // The workers hold the receivers until the senders are dropped below.
        let _ = txs[i % n].send(Job {
            i: i as u64,
            sched_us,
        });
    }
    drop(txs);
    let mut out = RunOutput::default();
    let mut outs = Vec::new();
    for h in handles {
        if let Ok((records, o, reroutes, connects)) = h.await {
            out.records.extend(records);
            outs.extend(o);
            out.reroutes += reroutes;
            out.connects += connects;
        }
    }
    finish(&mut out);
    (out, outs)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn fake_target() -> Arc<Target> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(crate::fake::serve(listener));
        Arc::new(Target::parse(&format!("http://{addr}")).expect("target"))
    }

    struct CreateWallet;

    impl Iteration for CreateWallet {
        type Out = u16;
        async fn run(&self, s: &mut Session, _rng: &mut Rng) -> u16 {
            let tag = Op {
                wallet: 0,
                variant: 7,
            };
            s.send(
                Method::POST,
                crate::client::WALLETS_PATH,
                Bytes::from_static(b"{}"),
                tag,
            )
            .await
            .0
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_runs_iterations_until_the_end_and_records_each_request() {
        let targets = vec![fake_target().await, fake_target().await];
        let (out, outs) = closed(
            &targets,
            Duration::from_secs(5),
            4,
            Duration::from_millis(300),
            Instant::now(),
            1,
            Arc::new(CreateWallet),
        )
        .await;
        assert!(!outs.is_empty());
        assert_eq!(outs.len(), out.records.len());
        assert!(outs.iter().all(|s| *s == 201));
        assert!(out.records.iter().all(|r| r.op.variant == 7));
        assert!(out.connects <= 4);
        assert!(out.records.iter().all(|r| r.sched_us < 300_000));
    }

    struct Missing;

    impl OpenRequest for Missing {
        type Out = (u64, u16);
        fn path(&self, i: u64) -> String {
            format!("/api/v1/wallets/{}", uuid::Uuid::from_u128(u128::from(i)))
        }
        fn tag(&self, i: u64) -> Op {
            Op {
                wallet: 0,
                variant: (i % 2) as u8,
            }
        }
        fn keep(&self, i: u64, status: u16, _body: &[u8]) -> Option<(u64, u16)> {
            i.is_multiple_of(10).then_some((i, status))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_gets_follow_the_schedule_and_keep_what_is_asked() {
        let targets = vec![fake_target().await, fake_target().await];
        let schedule = Schedule::constant(200.0, Duration::from_millis(500));
        let (out, kept) = open_get(
            &targets,
            Duration::from_secs(5),
            &schedule,
            4,
            Instant::now(),
            Arc::new(Missing),
        )
        .await;
        assert_eq!(out.records.len(), 100);
        let scheds: Vec<u64> = out.records.iter().map(|r| r.sched_us).collect();
        assert_eq!(scheds, schedule.offsets_us().collect::<Vec<_>>());
        assert!(out.records.iter().all(|r| r.status == 404));
        let mut kept = kept;
        kept.sort_unstable();
        assert_eq!(kept.len(), 10);
        assert_eq!(kept[3], (30, 404));
    }
}
