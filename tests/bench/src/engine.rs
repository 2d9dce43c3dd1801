//! The two load shapes. Open loop: a dispatcher releases each request at its
//! scheduled time into a per-target queue and latency counts from that time, so a
//! stalled server shows up as latency instead of silently lowering the load
//! (no coordinated omission). Closed loop: each connection sends its next request
//! when the previous one answered, to find the saturation throughput.

use crate::client::{Conn, Target, extract_uuid};
use crate::rng::Rng;
use crate::schedule::Schedule;
use crate::workload::{Op, Workload};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Status recorded for a request that got no HTTP answer (timeout, reset): its
/// outcome is unknown to the client.
pub const STATUS_ERROR: u16 = 0;
/// Status recorded for a request that could not even connect anywhere: it was
/// certainly not applied.
pub const STATUS_REFUSED: u16 = 1;

/// One request as the bench saw it; kept for every request so the consistency
/// check and the time series can be computed after the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    /// Scheduled (open loop) or send (closed loop) time, µs after the run start.
    pub sched_us: u64,
    pub latency_us: u64,
    pub status: u16,
    pub op: Op,
    /// `operationId` of the answer (200 and 409 carry one).
    pub op_id: Option<Uuid>,
}

impl Record {
    pub fn completed_us(&self) -> u64 {
        self.sched_us + self.latency_us
    }
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub targets: Vec<Arc<Target>>,
    pub timeout: Duration,
    pub seed: u64,
    /// When set, every operation carries `Idempotency-Key: <prefix>-<n>` and a
    /// request without an answer (or with a 5xx) is retried with the same key.
    pub idempotency_prefix: Option<String>,
}

/// Retries of one request whose outcome was unknown (only with idempotency keys).
const MAX_RETRIES: u8 = 3;

fn unknown_outcome(answer: &Result<(u16, bytes::Bytes), crate::client::ClientError>) -> bool {
    match answer {
        Ok((status, _)) => *status >= 500,
        Err(e) => !e.never_sent(),
    }
}

#[derive(Debug, Default)]
pub struct RunOutput {
    pub records: Vec<Record>,
    /// From the run start to the last answer.
    pub elapsed: Duration,
    /// Requests that could not connect to their target and went to the next one.
    pub reroutes: u64,
    /// Requests sent again with the same idempotency key after an unknown outcome.
    pub retries: u64,
    pub connects: u64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn record_answer(
    op: Op,
    sched_us: u64,
    latency_us: u64,
    answer: Result<(u16, bytes::Bytes), crate::client::ClientError>,
) -> Record {
    match answer {
        Ok((status, body)) => Record {
            sched_us,
            latency_us,
            status,
            op,
            op_id: if status == 200 || status == 409 {
                extract_uuid(&body, "operationId")
            } else {
                None
            },
        },
        Err(e) => Record {
            sched_us,
            latency_us,
            status: if e.never_sent() {
                STATUS_REFUSED
            } else {
                STATUS_ERROR
            },
            op,
            op_id: None,
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct Job {
    seq: u64,
    sched_us: u64,
    op: Op,
    attempts: u8,
    retries: u8,
}

struct Shared {
    start: Instant,
    workload: Arc<Workload>,
    queues: Vec<flume::Sender<Job>>,
    done: AtomicU64,
    /// Requests to wait for: the schedule's count, lowered to the number actually
    /// dispatched when the run is stopped early.
    total: AtomicU64,
    all_done: Notify,
    timeout: Duration,
    idempotency_prefix: Option<String>,
}

impl Shared {
    fn finish_one(&self) {
        if self.done.fetch_add(1, Ordering::SeqCst) + 1 >= self.total.load(Ordering::SeqCst) {
            self.all_done.notify_one();
        }
    }
}

#[derive(Default)]
struct WorkerOut {
    records: Vec<Record>,
    reroutes: u64,
    retries: u64,
    connects: u64,
}

async fn open_worker(
    shared: Arc<Shared>,
    target_idx: usize,
    target: Arc<Target>,
    rx: flume::Receiver<Job>,
    stop: CancellationToken,
) -> WorkerOut {
    let mut conn = Conn::new(target);
    let mut out = WorkerOut {
        records: Vec::with_capacity(1024),
        ..WorkerOut::default()
    };
    let n_targets = shared.queues.len();
    loop {
        let job = tokio::select! {
            biased;
            job = rx.recv_async() => match job { Ok(j) => j, Err(_) => break },
            () = stop.cancelled() => break,
        };
        let body = shared.workload.body(job.op);
        let key = shared
            .idempotency_prefix
            .as_ref()
            .map(|p| format!("{p}-{}", job.seq));
        let answer = conn
            .post_operation(body, key.as_deref(), shared.timeout)
            .await;
        if let Err(e) = &answer
            && e.never_sent()
            && usize::from(job.attempts) + 1 < n_targets
        {
            // Like a load balancer skipping a dead backend: the request never
            // left, so it goes to the next target and keeps its scheduled time.
            let next = (target_idx + usize::from(job.attempts) + 1) % n_targets;
            let rerouted = Job {
                attempts: job.attempts + 1,
                ..job
            };
            out.reroutes += 1;
            if shared.queues[next].send(rerouted).is_ok() {
                continue;
            }
        }
        if key.is_some() && job.retries < MAX_RETRIES && unknown_outcome(&answer) {
            // Safe to send again: the key makes the server answer a replay with the
            // first outcome. Another node, since this one may be the one that died.
            let retried = Job {
                retries: job.retries + 1,
                ..job
            };
            out.retries += 1;
            if shared.queues[(target_idx + 1) % n_targets]
                .send(retried)
                .is_ok()
            {
                continue;
            }
        }
        let latency = micros(shared.start.elapsed()).saturating_sub(job.sched_us);
        out.records
            .push(record_answer(job.op, job.sched_us, latency, answer));
        shared.finish_one();
    }
    out.connects = conn.connects;
    out
}

/// Runs `schedule` with `connections` keep-alive connections spread over the targets
/// (request i goes to target i mod n). `start` is the run's time zero.
pub async fn open_loop(
    cfg: &LoadConfig,
    workload: Arc<Workload>,
    schedule: &Schedule,
    connections: usize,
    start: Instant,
) -> RunOutput {
    open_loop_until(
        cfg,
        workload,
        schedule,
        connections,
        start,
        CancellationToken::new(),
    )
    .await
}

/// `open_loop` that stops sending when `until` is cancelled (the requests already
/// sent are still waited for): background load that lasts as long as another one.
pub async fn open_loop_until(
    cfg: &LoadConfig,
    workload: Arc<Workload>,
    schedule: &Schedule,
    connections: usize,
    start: Instant,
    until: CancellationToken,
) -> RunOutput {
    let n_targets = cfg.targets.len().max(1);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n_targets).map(|_| flume::unbounded::<Job>()).unzip();
    let total = schedule.total_requests();
    let shared = Arc::new(Shared {
        start,
        workload: workload.clone(),
        queues: txs,
        done: AtomicU64::new(0),
        total: AtomicU64::new(total),
        all_done: Notify::new(),
        timeout: cfg.timeout,
        idempotency_prefix: cfg.idempotency_prefix.clone(),
    });
    let stop = CancellationToken::new();
    let mut handles = Vec::new();
    for c in 0..connections.max(n_targets) {
        let t = c % n_targets;
        handles.push(tokio::spawn(open_worker(
            shared.clone(),
            t,
            cfg.targets[t].clone(),
            rxs[t].clone(),
            stop.clone(),
        )));
    }
    drop(rxs);

    let mut rng = Rng::new(cfg.seed);
    let mut offsets = schedule.offsets_us().enumerate().peekable();
    let mut dispatched = 0u64;
    while offsets.peek().is_some() && !until.is_cancelled() {
        let now_us = micros(start.elapsed());
        while let Some((i, sched_us)) = offsets.next_if(|(_, s)| *s <= now_us) {
            let job = Job {
                seq: i as u64,
                sched_us,
                op: workload.next(&mut rng),
                attempts: 0,
                retries: 0,
            };
            // Receivers live as long as `shared`, so the send cannot fail.
            let _ = shared.queues[i % n_targets].send(job);
            dispatched += 1;
        }
        if let Some((_, next)) = offsets.peek() {
            tokio::select! {
                () = tokio::time::sleep_until((start + Duration::from_micros(*next)).into()) => {}
                () = until.cancelled() => {}
            }
        }
    }
    shared.total.store(dispatched, Ordering::SeqCst);
    // A permit left by an earlier notify may wake this early: check the count.
    while shared.done.load(Ordering::SeqCst) < dispatched {
        shared.all_done.notified().await;
    }
    stop.cancel();
    collect(handles).await
}

async fn collect(handles: Vec<tokio::task::JoinHandle<WorkerOut>>) -> RunOutput {
    let mut out = RunOutput::default();
    for h in handles {
        // A panicking worker loses its records; the counts then show the gap.
        if let Ok(w) = h.await {
            out.records.extend(w.records);
            out.reroutes += w.reroutes;
            out.retries += w.retries;
            out.connects += w.connects;
        }
    }
    out.records.sort_by_key(|r| r.sched_us);
    out.elapsed = Duration::from_micros(
        out.records
            .iter()
            .map(Record::completed_us)
            .max()
            .unwrap_or(0),
    );
    out
}

/// `connections` connections (round-robin over targets), each sending back to back
/// until `duration` has passed since `start`.
pub async fn closed_loop(
    cfg: &LoadConfig,
    workload: Arc<Workload>,
    connections: usize,
    duration: Duration,
    start: Instant,
) -> RunOutput {
    let n_targets = cfg.targets.len().max(1);
    let end_us = micros(duration);
    let mut handles = Vec::new();
    for c in 0..connections {
        let targets = cfg.targets.clone();
        let workload = workload.clone();
        let timeout = cfg.timeout;
        let prefix = cfg.idempotency_prefix.clone();
        let mut rng = Rng::new(cfg.seed ^ (c as u64).wrapping_mul(0x9E37_79B9));
        handles.push(tokio::spawn(async move {
            let mut t = c % n_targets;
            let mut conn = Conn::new(targets[t].clone());
            let mut out = WorkerOut {
                records: Vec::with_capacity(4096),
                ..WorkerOut::default()
            };
            let mut sent = 0u64;
            loop {
                let sent_us = micros(start.elapsed());
                if sent_us >= end_us {
                    break;
                }
                let Some(op) = workload.try_next(&mut rng) else {
                    break;
                };
                let key = prefix.as_ref().map(|p| format!("{p}-c{c}-{sent}"));
                sent += 1;
                let mut answer = conn
                    .post_operation(workload.body(op), key.as_deref(), timeout)
                    .await;
                let (mut tries, mut retries) = (1, 0);
                loop {
                    if matches!(&answer, Err(e) if e.never_sent()) && tries < n_targets {
                        tries += 1;
                        out.reroutes += 1;
                    } else if key.is_some() && retries < MAX_RETRIES && unknown_outcome(&answer) {
                        retries += 1;
                        out.retries += 1;
                    } else {
                        break;
                    }
                    t = (t + 1) % n_targets;
                    conn.retarget(targets[t].clone());
                    answer = conn
                        .post_operation(workload.body(op), key.as_deref(), timeout)
                        .await;
                }
                let failed_to_connect = matches!(&answer, Err(e) if e.never_sent());
                let latency = micros(start.elapsed()).saturating_sub(sent_us);
                out.records
                    .push(record_answer(op, sent_us, latency, answer));
                if failed_to_connect {
                    // Every target refused: do not spin at full speed on refusals.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            out.connects = conn.connects;
            out
        }));
    }
    collect(handles).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Mix, Picker};
    use std::collections::HashSet;

    async fn fake_target() -> Arc<Target> {
        fake_node(Arc::default()).await
    }

    async fn fake_node(state: Arc<crate::fake::State>) -> Arc<Target> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(crate::fake::serve_state(listener, state));
        Arc::new(Target::parse(&format!("http://{addr}")).expect("target"))
    }

    async fn setup(targets: &[Arc<Target>], wallets: usize) -> Arc<Workload> {
        let w =
            crate::setup::create_wallets(targets, wallets, 1_000_000, 4, Duration::from_secs(5))
                .await
                .expect("wallets");
        assert_eq!(w.len(), wallets);
        assert_eq!(w.iter().collect::<HashSet<_>>().len(), wallets);
        Arc::new(Workload::new(
            w,
            Picker::Uniform,
            Mix {
                deposit_ratio: 0.6,
                reject_ratio: 0.05,
            },
        ))
    }

    /// `expect_409`: only where the number of requests, hence the drawn mix, is fixed.
    fn assert_all_answered(records: &[Record], expect_409: bool) {
        let mut ids = HashSet::new();
        for r in records {
            assert!(r.status == 200 || r.status == 409, "status {}", r.status);
            assert!(ids.insert(r.op_id.expect("operationId")), "duplicate id");
        }
        assert!(
            !expect_409 || records.iter().any(|r| r.status == 409),
            "the reject share produced no 409"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_sends_every_scheduled_request_round_robin() {
        let state = Arc::new(crate::fake::State::default());
        let targets = vec![fake_node(state.clone()).await, fake_node(state).await];
        let workload = setup(&targets, 3).await;
        let cfg = LoadConfig {
            targets,
            timeout: Duration::from_secs(5),
            seed: 1,
            idempotency_prefix: None,
        };
        let schedule = Schedule::constant(400.0, Duration::from_millis(500));
        let out = open_loop(&cfg, workload, &schedule, 8, Instant::now()).await;
        assert_eq!(out.records.len(), 200);
        assert_eq!(out.reroutes, 0);
        let scheds: Vec<u64> = out.records.iter().map(|r| r.sched_us).collect();
        assert_eq!(scheds, schedule.offsets_us().collect::<Vec<_>>());
        assert_all_answered(&out.records, true);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_until_stops_sending_when_cancelled() {
        let targets = vec![fake_target().await];
        let workload = setup(&targets, 2).await;
        let cfg = LoadConfig {
            targets,
            timeout: Duration::from_secs(5),
            seed: 6,
            idempotency_prefix: None,
        };
        let until = CancellationToken::new();
        let stopper = until.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stopper.cancel();
        });
        let schedule = Schedule::constant(200.0, Duration::from_secs(30));
        let out = open_loop_until(&cfg, workload, &schedule, 4, Instant::now(), until).await;
        // About 60 of the 6000 scheduled requests, each answered.
        assert!(
            (20..200).contains(&out.records.len()),
            "{}",
            out.records.len()
        );
        assert!(out.elapsed < Duration::from_secs(5));
        assert_all_answered(&out.records, false);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_stops_when_each_wallet_was_touched_once() {
        let targets = vec![fake_target().await];
        let w = crate::setup::create_wallets(&targets, 50, 0, 4, Duration::from_secs(5))
            .await
            .expect("wallets");
        let workload = Arc::new(Workload::new(
            w,
            Picker::EachOnce,
            Mix {
                deposit_ratio: 1.0,
                reject_ratio: 0.0,
            },
        ));
        let cfg = LoadConfig {
            targets,
            timeout: Duration::from_secs(5),
            seed: 7,
            idempotency_prefix: None,
        };
        let out = closed_loop(&cfg, workload, 4, Duration::from_secs(30), Instant::now()).await;
        assert_eq!(out.records.len(), 50);
        let touched: HashSet<u32> = out.records.iter().map(|r| r.op.wallet).collect();
        assert_eq!(touched.len(), 50);
        assert!(out.elapsed < Duration::from_secs(10));
        assert_all_answered(&out.records, false);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_reroutes_around_a_dead_target() {
        let live = fake_target().await;
        // A port nobody listens on: bind, read the port, close.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            Arc::new(
                Target::parse(&format!("http://{}", l.local_addr().expect("addr")))
                    .expect("target"),
            )
        };
        let workload = setup(std::slice::from_ref(&live), 1).await;
        let cfg = LoadConfig {
            targets: vec![live, dead],
            timeout: Duration::from_secs(5),
            seed: 2,
            idempotency_prefix: None,
        };
        let out = open_loop(
            &cfg,
            workload,
            &Schedule::constant(200.0, Duration::from_millis(500)),
            4,
            Instant::now(),
        )
        .await;
        assert_eq!(out.records.len(), 100);
        assert_eq!(out.reroutes, 50);
        assert_all_answered(&out.records, true);
    }

    /// A node that accepts connections and closes them without answering.
    async fn mute_target() -> Arc<Target> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        Arc::new(Target::parse(&format!("http://{addr}")).expect("target"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unanswered_requests_are_unknown_or_retried_with_their_key() {
        let live = fake_target().await;
        let mute = mute_target().await;
        let workload = setup(std::slice::from_ref(&live), 1).await;
        let schedule = Schedule::constant(200.0, Duration::from_millis(500));
        let mut cfg = LoadConfig {
            targets: vec![live, mute],
            timeout: Duration::from_secs(5),
            seed: 4,
            idempotency_prefix: None,
        };
        let out = open_loop(&cfg, workload.clone(), &schedule, 4, Instant::now()).await;
        assert_eq!(out.records.len(), 100);
        assert_eq!(out.retries, 0);
        let errors = out
            .records
            .iter()
            .filter(|r| r.status == STATUS_ERROR)
            .count();
        assert_eq!(errors, 50, "every request sent to the mute node is unknown");

        cfg.idempotency_prefix = Some("test".to_owned());
        let out = open_loop(&cfg, workload, &schedule, 4, Instant::now()).await;
        assert_eq!(out.records.len(), 100);
        assert_eq!(out.retries, 50);
        assert_all_answered(&out.records, true);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_retries_an_unanswered_request_on_the_next_target() {
        let live = fake_target().await;
        let mute = mute_target().await;
        let workload = setup(std::slice::from_ref(&live), 1).await;
        let cfg = LoadConfig {
            targets: vec![live, mute],
            timeout: Duration::from_secs(5),
            seed: 5,
            idempotency_prefix: Some("test".to_owned()),
        };
        // Connection 1 starts on the mute node, fails once and moves on.
        let out = closed_loop(&cfg, workload, 2, Duration::from_secs(1), Instant::now()).await;
        assert!(out.retries >= 1);
        assert_all_answered(&out.records, false);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_sends_back_to_back_until_the_end() {
        let targets = vec![fake_target().await];
        let workload = setup(&targets, 2).await;
        let cfg = LoadConfig {
            targets,
            timeout: Duration::from_secs(5),
            seed: 3,
            idempotency_prefix: None,
        };
        let out = closed_loop(&cfg, workload, 4, Duration::from_secs(1), Instant::now()).await;
        // How many requests fit in the second depends on the machine; that each
        // connection keeps its single keep-alive connection and nothing starts
        // after the end does not.
        assert!(!out.records.is_empty());
        assert!(out.connects <= 4);
        assert!(out.records.iter().all(|r| r.sched_us < 1_000_000));
        assert_all_answered(&out.records, false);
    }
}
