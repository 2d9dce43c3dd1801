//! Slow clients (slowloris): many connections to one public port that never finish
//! a request. Each one is watched until the scenario ends, so the report can say how
//! many the node kept open and when it closed the others.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What a slow connection sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Connects and never sends a byte.
    Idle,
    /// Sends a request line and a header that never ends, a byte every trickle interval.
    Header,
    /// Sends complete headers announcing a body, then a byte of it every trickle interval.
    Body,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Idle => "idle",
            Kind::Header => "partial-header",
            Kind::Body => "slow-body",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "idle" => Some(Kind::Idle),
            "header" | "partial-header" => Some(Kind::Header),
            "body" | "slow-body" => Some(Kind::Body),
            _ => None,
        }
    }
}

/// Under the node's 16 KiB body limit, so the body is not refused for its size.
const BODY_BYTES: usize = 16_000;
/// Connections being opened at once.
const OPENING_AT_ONCE: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Config {
    pub addr: String,
    pub host: String,
    /// `Authorization` header value of the body kind, if the API needs a token.
    pub authorization: Option<String>,
    pub connections: usize,
    pub kinds: Vec<Kind>,
    pub trickle: Duration,
    /// How long every connection is held, from `start`.
    pub duration: Duration,
}

/// How one connection ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub kind: Kind,
    /// Seconds after the start; `None` if it could not be opened.
    pub opened_s: Option<f64>,
    /// Seconds after the start at which the server closed it; `None` = still open at the end.
    pub closed_s: Option<f64>,
    /// "eof", "reset", "write failed", or the connect error.
    pub how: Option<String>,
    /// Status line the server sent before closing (e.g. 408), if any.
    pub answer: Option<u16>,
}

fn secs(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1000.0).round() / 1000.0
}

fn first_bytes(kind: Kind, host: &str, authorization: Option<&str>) -> Vec<u8> {
    // With a valid token the node reads the body instead of refusing at once.
    let auth = authorization
        .map(|value| format!("Authorization: {value}\r\n"))
        .unwrap_or_default();
    match kind {
        Kind::Idle => Vec::new(),
        Kind::Header => {
            format!("POST /api/v1/wallet HTTP/1.1\r\nHost: {host}\r\nX-Slow: ").into_bytes()
        }
        Kind::Body => format!(
            "POST /api/v1/wallet HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\nContent-Length: {BODY_BYTES}\r\n\r\n{{"
        )
        .into_bytes(),
    }
}

/// "HTTP/1.1 408 Request Timeout" -> 408.
pub fn status_of(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head.get(..head.len().min(16))?).ok()?;
    let mut parts = text.strip_prefix("HTTP/1.")?.split(' ');
    parts.next()?;
    parts.next()?.get(..3)?.parse().ok()
}

async fn hold(
    cfg: Arc<Config>,
    kind: Kind,
    start: Instant,
    opening: Arc<Semaphore>,
    open_now: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Outcome {
    let mut out = Outcome {
        kind,
        opened_s: None,
        closed_s: None,
        how: None,
        answer: None,
    };
    let stream = {
        // Only a few handshakes at a time, like clients arriving, not a SYN flood.
        let _permit = opening.acquire().await;
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&cfg.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                out.how = Some(format!("connect: {e}"));
                return out;
            }
            Err(_) => {
                out.how = Some("connect: timed out".to_owned());
                return out;
            }
        }
    };
    let mut stream = stream;
    out.opened_s = Some(secs(start));
    open_now.fetch_add(1, Ordering::Relaxed);
    let closed = |out: &mut Outcome, how: &str| {
        out.closed_s = Some(secs(start));
        out.how = Some(how.to_owned());
    };
    let first = first_bytes(kind, &cfg.host, cfg.authorization.as_deref());
    if !first.is_empty() && stream.write_all(&first).await.is_err() {
        closed(&mut out, "write failed");
        open_now.fetch_sub(1, Ordering::Relaxed);
        return out;
    }
    let mut buf = [0u8; 512];
    let mut trickle = tokio::time::interval(cfg.trickle);
    trickle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate and the first bytes were just sent.
    trickle.tick().await;
    let end = start + cfg.duration;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(end.into()) => break,
            read = stream.read(&mut buf) => match read {
                Ok(0) => { closed(&mut out, "eof"); break; }
                Ok(n) => {
                    if out.answer.is_none() {
                        out.answer = status_of(&buf[..n]);
                    }
                }
                Err(_) => {
                    answer_left_behind(&mut stream, &mut out).await;
                    closed(&mut out, "reset");
                    break;
                }
            },
            _ = trickle.tick(), if kind != Kind::Idle => {
                let byte: &[u8] = if kind == Kind::Header { b"a" } else { b" " };
                if stream.write_all(byte).await.is_err() {
                    answer_left_behind(&mut stream, &mut out).await;
                    closed(&mut out, "write failed");
                    break;
                }
            }
        }
    }
    open_now.fetch_sub(1, Ordering::Relaxed);
    out
}

/// A server that answers 408 and closes while bytes are still arriving resets the
/// connection; the answer may already be in our receive buffer, and a write that
/// fails first must not hide it.
async fn answer_left_behind(stream: &mut TcpStream, out: &mut Outcome) {
    if out.answer.is_some() {
        return;
    }
    let mut buf = [0u8; 512];
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await
    {
        out.answer = status_of(&buf[..n]);
    }
}

/// Holds `cfg.connections` slow connections (kinds round-robin) until
/// `cfg.duration` after `start`; `open_series` gets (second, connections open)
/// once a second.
pub async fn run(
    cfg: Config,
    start: Instant,
    open_series: Arc<std::sync::Mutex<Vec<(f64, u64)>>>,
) -> Vec<Outcome> {
    let cfg = Arc::new(cfg);
    let opening = Arc::new(Semaphore::new(OPENING_AT_ONCE));
    let open_now = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let kinds = if cfg.kinds.is_empty() {
        vec![Kind::Idle]
    } else {
        cfg.kinds.clone()
    };
    let watcher = {
        let open_now = open_now.clone();
        let series = open_series.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                series
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((secs(start).round(), open_now.load(Ordering::Relaxed)));
            }
        })
    };
    let handles: Vec<_> = (0..cfg.connections)
        .map(|i| {
            tokio::spawn(hold(
                cfg.clone(),
                kinds[i % kinds.len()],
                start,
                opening.clone(),
                open_now.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(o) = h.await {
            out.push(o);
        }
    }
    stop.cancel();
    watcher.abort();
    open_series
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((secs(start), open_now.load(Ordering::Relaxed)));
    out
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KindSummary {
    pub kind: String,
    pub requested: u64,
    pub opened: u64,
    pub failed_to_open: u64,
    pub open_at_end: u64,
    pub closed_by_server: u64,
    /// Seconds between opening and the server's close: first, median, last.
    pub close_after_s_min: Option<f64>,
    pub close_after_s_p50: Option<f64>,
    pub close_after_s_max: Option<f64>,
    /// How the closed ones ended ("eof", "reset", ...).
    pub closes: BTreeMap<String, u64>,
    /// Status lines the server sent them (e.g. "408").
    pub answers: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SlowReport {
    pub target: String,
    pub requested: u64,
    pub opened: u64,
    pub failed_to_open: u64,
    pub open_at_end: u64,
    pub closed_by_server: u64,
    pub trickle_s: f64,
    pub held_s: f64,
    /// Seconds after the start by which every opened connection was open.
    pub all_opened_by_s: Option<f64>,
    pub kinds: Vec<KindSummary>,
    /// (second, connections open) as the bench saw them.
    pub open_series: Vec<(f64, u64)>,
    /// The first connect errors (e.g. EMFILE), at most a few.
    pub connect_errors: Vec<String>,
    /// Open-files limit of the bench process: soft before raising it, soft after, hard.
    pub bench_nofile_before: Option<u64>,
    pub bench_nofile: Option<u64>,
    pub bench_nofile_hard: Option<u64>,
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn summarize_kind(name: &str, outcomes: &[&Outcome]) -> KindSummary {
    let mut s = KindSummary {
        kind: name.to_owned(),
        requested: outcomes.len() as u64,
        ..KindSummary::default()
    };
    let mut after = Vec::new();
    for o in outcomes {
        let Some(opened) = o.opened_s else {
            s.failed_to_open += 1;
            continue;
        };
        s.opened += 1;
        match o.closed_s {
            None => s.open_at_end += 1,
            Some(c) => {
                s.closed_by_server += 1;
                after.push(round3(c - opened));
                *s.closes
                    .entry(o.how.clone().unwrap_or_default())
                    .or_insert(0) += 1;
            }
        }
        if let Some(a) = o.answer {
            *s.answers.entry(a.to_string()).or_insert(0) += 1;
        }
    }
    s.close_after_s_min = after.iter().copied().reduce(f64::min);
    s.close_after_s_max = after.iter().copied().reduce(f64::max);
    s.close_after_s_p50 = median(&mut after);
    s
}

pub fn summarize(cfg: &Config, outcomes: &[Outcome], open_series: Vec<(f64, u64)>) -> SlowReport {
    let all: Vec<&Outcome> = outcomes.iter().collect();
    let total = summarize_kind("all", &all);
    let mut kinds: Vec<Kind> = outcomes.iter().map(|o| o.kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let per_kind = kinds
        .iter()
        .map(|k| {
            let mine: Vec<&Outcome> = outcomes.iter().filter(|o| o.kind == *k).collect();
            summarize_kind(k.as_str(), &mine)
        })
        .collect();
    let mut connect_errors: Vec<String> = outcomes
        .iter()
        .filter(|o| o.opened_s.is_none())
        .filter_map(|o| o.how.clone())
        .collect();
    connect_errors.sort();
    connect_errors.dedup();
    connect_errors.truncate(5);
    SlowReport {
        target: cfg.addr.clone(),
        requested: total.requested,
        opened: total.opened,
        failed_to_open: total.failed_to_open,
        open_at_end: total.open_at_end,
        closed_by_server: total.closed_by_server,
        trickle_s: cfg.trickle.as_secs_f64(),
        held_s: cfg.duration.as_secs_f64(),
        all_opened_by_s: outcomes.iter().filter_map(|o| o.opened_s).reduce(f64::max),
        kinds: per_kind,
        open_series,
        connect_errors,
        bench_nofile_before: None,
        bench_nofile: None,
        bench_nofile_hard: None,
    }
}

/// Raises this process's soft open-files limit to its hard limit (the slow
/// connections need one descriptor each): (soft before, soft after, hard).
pub fn raise_nofile() -> (Option<u64>, Option<u64>, Option<u64>) {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).ok();
    let raised = rlimit::increase_nofile_limit(u64::MAX).ok();
    let after = rlimit::getrlimit(rlimit::Resource::NOFILE).ok();
    (
        before.map(|(soft, _)| soft),
        raised.or(after.map(|(soft, _)| soft)),
        after.map(|(_, hard)| hard),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn kinds_and_status_lines_parse() {
        assert_eq!(Kind::parse("header"), Some(Kind::Header));
        assert_eq!(Kind::parse("slow-body"), Some(Kind::Body));
        assert_eq!(Kind::parse("nope"), None);
        assert_eq!(status_of(b"HTTP/1.1 408 Request Timeout\r\n"), Some(408));
        assert_eq!(status_of(b"HTTP/1.0 503 x"), Some(503));
        assert_eq!(status_of(b"garbage"), None);
        assert!(first_bytes(Kind::Body, "h:1", None).ends_with(b"\r\n\r\n{"));
        assert!(first_bytes(Kind::Idle, "h:1", None).is_empty());
        let with_token = first_bytes(Kind::Body, "h:1", Some("Bearer t"));
        assert!(
            with_token
                .windows(23)
                .any(|w| w == b"Authorization: Bearer t")
        );
    }

    #[test]
    fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
        let (before, after, hard) = raise_nofile();
        assert!(before.is_some() && after.is_some() && hard.is_some());
        assert!(after >= before);
    }

    /// A server that keeps connections for `keep` and then closes them, after
    /// answering 408 to those that sent something.
    async fn server(keep: Duration) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    let got = tokio::time::timeout(keep, s.read(&mut buf)).await;
                    tokio::time::sleep(keep).await;
                    if matches!(got, Ok(Ok(n)) if n > 0) {
                        let _ = s.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n").await;
                    }
                });
            }
        });
        addr
    }

    fn cfg(addr: String, duration: Duration) -> Config {
        Config {
            host: addr.clone(),
            authorization: None,
            addr,
            connections: 9,
            kinds: vec![Kind::Idle, Kind::Header, Kind::Body],
            trickle: Duration::from_millis(50),
            duration,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_connections_the_server_closes_and_those_it_keeps() {
        // Closes everything after 300 ms, long before the scenario ends.
        let c = cfg(
            server(Duration::from_millis(300)).await,
            Duration::from_secs(3),
        );
        let series = Arc::default();
        let out = run(c.clone(), Instant::now(), series).await;
        let r = summarize(&c, &out, Vec::new());
        assert_eq!((r.requested, r.opened, r.failed_to_open), (9, 9, 0));
        assert_eq!((r.closed_by_server, r.open_at_end), (9, 0), "{r:?}");
        let header = r.kinds.iter().find(|k| k.kind == "partial-header");
        assert_eq!(header.and_then(|k| k.answers.get("408")), Some(&3));
        let after = r.kinds[0].close_after_s_max.expect("closed");
        assert!((0.2..2.5).contains(&after), "{after}");

        // Keeps them longer than the scenario lasts.
        let c = cfg(
            server(Duration::from_secs(30)).await,
            Duration::from_millis(500),
        );
        let series = Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = run(c.clone(), Instant::now(), series.clone()).await;
        let r = summarize(
            &c,
            &out,
            std::mem::take(&mut *series.lock().expect("series")),
        );
        assert_eq!((r.closed_by_server, r.open_at_end), (0, 9), "{r:?}");
        assert!(r.open_series.iter().any(|(_, n)| *n == 9) || r.open_series.len() <= 2);

        // Nobody listens: every connection fails to open.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .to_string();
        let c = cfg(dead, Duration::from_millis(200));
        let out = run(c.clone(), Instant::now(), Arc::default()).await;
        let r = summarize(&c, &out, Vec::new());
        assert_eq!(r.failed_to_open, 9);
        assert!(!r.connect_errors.is_empty());
    }
}
