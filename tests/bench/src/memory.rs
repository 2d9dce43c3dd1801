//! Node memory during a scenario: resident set size (and open files) of every node,
//! sampled from its admin `/metrics` (`process_resident_memory_bytes`), or from
//! `/proc/<pid>/status` of the pid files when a node has no metrics, and compared
//! with the memory limit of the Helm chart.

use crate::client::{Conn, Target};
use crate::cluster;
use crate::report::RssSample;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the chart keeps the node's limit: `resources.limits.memory`.
pub const CHART_VALUES: &str = "charts/wallet/values.yaml";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeMemory {
    pub node: String,
    /// First sample, taken when the load starts.
    pub first_bytes: u64,
    pub peak_bytes: u64,
    pub peak_t_s: f64,
    pub last_bytes: u64,
    /// Peak as a share of the limit (1.0 = at the limit).
    pub peak_of_limit: Option<f64>,
    pub over_limit: bool,
    #[serde(default)]
    pub peak_open_fds: Option<u64>,
    /// The node's own open-files limit (`process_max_fds`, or /proc/<pid>/limits).
    #[serde(default)]
    pub max_fds: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemoryReport {
    /// "metrics" (admin /metrics), "proc" (/proc/<pid>/status) or "none".
    pub source: String,
    pub interval_s: f64,
    pub limit_bytes: Option<u64>,
    /// Where the limit came from, e.g. "charts/wallet/values.yaml resources.limits.memory = 512Mi".
    pub limit_source: String,
    pub nodes: Vec<NodeMemory>,
}

/// One reading of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    pub rss_bytes: u64,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

/// Reads `process_resident_memory_bytes`, `process_open_fds` and `process_max_fds`
/// from a Prometheus text exposition.
pub fn parse_metrics(text: &str) -> Option<Reading> {
    let value = |name: &str| {
        text.lines()
            .find_map(|l| {
                let rest = l.strip_prefix(name)?;
                // The exact name, not a longer one that starts with it.
                rest.starts_with(' ')
                    .then(|| rest.trim().parse::<f64>().ok())?
            })
            .map(|v| v as u64)
    };
    Some(Reading {
        rss_bytes: value("process_resident_memory_bytes")?,
        open_fds: value("process_open_fds"),
        max_fds: value("process_max_fds"),
    })
}

/// "Max open files" soft limit from /proc/<pid>/limits.
pub fn parse_limits_nofile(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn proc_reading(pid: u32) -> Option<Reading> {
    let rss_bytes = cluster::rss_bytes(pid)?;
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64);
    let max_fds = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|l| parse_limits_nofile(&l));
    Some(Reading {
        rss_bytes,
        open_fds,
        max_fds,
    })
}

/// A memory quantity of Kubernetes ("512Mi", "1Gi", "500M", "1048576").
pub fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim().trim_matches(|c| c == '"' || c == '\'');
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, unit) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        _ => return None,
    };
    Some((n * mult) as u64)
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start().len()
}

/// `resources.limits.memory` of a values.yaml (top-level `resources:` only), as
/// written: the chart is plain enough that a full YAML parser is not needed.
pub fn chart_memory_limit(values: &str) -> Option<String> {
    let lines: Vec<&str> = values
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .collect();
    let start = lines.iter().position(|l| l.trim_end() == "resources:")?;
    let mut in_limits: Option<usize> = None;
    for l in &lines[start + 1..] {
        let ind = indent(l);
        if ind == 0 {
            break;
        }
        let t = l.trim();
        if let Some(li) = in_limits {
            if ind <= li {
                in_limits = None;
            } else if let Some(v) = t.strip_prefix("memory:") {
                let v = v.split('#').next().unwrap_or("").trim();
                return Some(v.trim_matches(|c| c == '"' || c == '\'').to_owned());
            }
        }
        if t == "limits:" {
            in_limits = Some(ind);
        }
    }
    None
}

/// The limit to compare with: `--memory-limit` if given, else the chart's.
pub fn memory_limit(root: &Path, flag: Option<&str>) -> (Option<u64>, String) {
    if let Some(f) = flag {
        return (parse_quantity(f), format!("--memory-limit {f}"));
    }
    let path = root.join(CHART_VALUES);
    match std::fs::read_to_string(&path) {
        Ok(text) => match chart_memory_limit(&text) {
            Some(q) => (
                parse_quantity(&q),
                format!("{CHART_VALUES} resources.limits.memory = {q}"),
            ),
            None => (
                None,
                format!("no resources.limits.memory in {}", path.display()),
            ),
        },
        Err(e) => (None, format!("{}: {e}", path.display())),
    }
}

async fn metrics_reading(admin: &Arc<Target>) -> Option<Reading> {
    let mut conn = Conn::new(admin.clone());
    match conn.get("/metrics", Duration::from_secs(2)).await {
        Ok((200, body)) => parse_metrics(&String::from_utf8_lossy(&body)),
        _ => None,
    }
}

/// Node i is `admin[i]` and, failing its metrics, the pid file `.data/run/node-<i>.pid`.
pub struct Sampler {
    pub admin: Vec<Arc<Target>>,
    pub root: std::path::PathBuf,
    pub interval: Duration,
}

#[derive(Default)]
pub struct Samples {
    pub rss: Vec<RssSample>,
    pub max_fds: Vec<(String, u64)>,
    pub metrics: u64,
    pub proc: u64,
}

impl Sampler {
    async fn sample_once(&self, t_s: f64, out: &Mutex<Samples>) {
        let n = self.admin.len().max(cluster::node_pids(&self.root).len());
        for i in 0..n {
            let node = format!("node-{i}");
            let mut reading = None;
            let mut from_metrics = false;
            if let Some(a) = self.admin.get(i) {
                reading = metrics_reading(a).await;
                from_metrics = reading.is_some();
            }
            if reading.is_none() {
                reading = cluster::read_pid(&self.root, i).ok().and_then(proc_reading);
            }
            let Some(r) = reading else { continue };
            let mut s = out.lock().unwrap_or_else(|p| p.into_inner());
            if from_metrics {
                s.metrics += 1;
            } else {
                s.proc += 1;
            }
            if let Some(m) = r.max_fds
                && !s.max_fds.iter().any(|(n, _)| *n == node)
            {
                s.max_fds.push((node.clone(), m));
            }
            s.rss.push(RssSample {
                t_s,
                node,
                rss_bytes: r.rss_bytes,
                open_fds: r.open_fds,
            });
        }
    }

    /// Samples every `interval` until the task is aborted; one sample right away.
    pub async fn run(self, start: Instant, out: Arc<Mutex<Samples>>) {
        loop {
            let t = start.elapsed().as_secs_f64();
            self.sample_once((t * 10.0).round() / 10.0, &out).await;
            let next = start + Duration::from_secs_f64(t) + self.interval;
            tokio::time::sleep_until(next.into()).await;
        }
    }

    /// One last sample (after the load ended).
    pub async fn final_sample(&self, start: Instant, out: &Mutex<Samples>) {
        let t = start.elapsed().as_secs_f64();
        self.sample_once((t * 10.0).round() / 10.0, out).await;
    }
}

pub fn summarize(
    samples: &Samples,
    interval: Duration,
    limit: (Option<u64>, String),
) -> MemoryReport {
    let mut names: Vec<&str> = samples.rss.iter().map(|s| s.node.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let (limit_bytes, limit_source) = limit;
    let nodes = names
        .into_iter()
        .filter_map(|n| {
            let mine: Vec<&RssSample> = samples.rss.iter().filter(|s| s.node == n).collect();
            let first = mine.first()?;
            let last = mine.last()?;
            let peak = mine.iter().max_by_key(|s| s.rss_bytes)?;
            Some(NodeMemory {
                node: n.to_owned(),
                first_bytes: first.rss_bytes,
                peak_bytes: peak.rss_bytes,
                peak_t_s: peak.t_s,
                last_bytes: last.rss_bytes,
                peak_of_limit: limit_bytes
                    .filter(|l| *l > 0)
                    .map(|l| (peak.rss_bytes as f64 / l as f64 * 1000.0).round() / 1000.0),
                over_limit: limit_bytes.is_some_and(|l| peak.rss_bytes > l),
                peak_open_fds: mine.iter().filter_map(|s| s.open_fds).max(),
                max_fds: samples
                    .max_fds
                    .iter()
                    .find(|(m, _)| m == n)
                    .map(|(_, v)| *v),
            })
        })
        .collect();
    MemoryReport {
        source: match (samples.metrics, samples.proc) {
            (0, 0) => "none",
            (_, 0) => "metrics",
            (0, _) => "proc",
            _ => "metrics+proc",
        }
        .to_owned(),
        interval_s: interval.as_secs_f64(),
        limit_bytes,
        limit_source,
        nodes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_process_metrics() {
        let text = "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
                    # TYPE process_resident_memory_bytes gauge\n\
                    process_resident_memory_bytes 3.6012032e+07\n\
                    process_resident_memory_bytes_total 1\n\
                    process_open_fds 42\n\
                    process_max_fds 20000\n";
        assert_eq!(
            parse_metrics(text),
            Some(Reading {
                rss_bytes: 36_012_032,
                open_fds: Some(42),
                max_fds: Some(20_000),
            })
        );
        assert_eq!(parse_metrics("wallet_x 1\n"), None);
    }

    #[test]
    fn reads_the_open_files_limit_of_a_process() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95000                95000                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_limits_nofile(limits), Some(1024));
        let own = std::fs::read_to_string("/proc/self/limits").expect("limits");
        assert!(parse_limits_nofile(&own).is_some());
    }

    #[test]
    fn quantities_in_kubernetes_units() {
        assert_eq!(parse_quantity("512Mi"), Some(512 * 1024 * 1024));
        assert_eq!(parse_quantity("\"1Gi\""), Some(1024 * 1024 * 1024));
        assert_eq!(parse_quantity("500M"), Some(500_000_000));
        assert_eq!(parse_quantity("1048576"), Some(1_048_576));
        assert_eq!(parse_quantity("1.5Gi"), Some(1_610_612_736));
        assert_eq!(parse_quantity("12parsecs"), None);
    }

    #[test]
    fn finds_the_top_level_memory_limit_of_the_chart() {
        let values = "replicaCount: 3\n\
                      resources:\n  requests:\n    cpu: 250m\n    memory: 128Mi\n\
                      \x20 # a comment\n  limits:\n    cpu: \"2\"\n    memory: 512Mi  # per pod\n\
                      other:\n  resources:\n    limits:\n      memory: 64Mi\n";
        assert_eq!(chart_memory_limit(values).as_deref(), Some("512Mi"));
        assert_eq!(chart_memory_limit("resources: {}\n"), None);
        // The repository's own chart, as the scenarios read it.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let (bytes, source) = memory_limit(&root, None);
        assert!(bytes.is_some_and(|b| b >= 64 * 1024 * 1024), "{source}");
        assert_eq!(memory_limit(&root, Some("1Gi")).0, Some(1024 * 1024 * 1024));
    }

    #[test]
    fn summary_has_first_peak_and_last_per_node() {
        let s = |t_s: f64, node: &str, mib: u64| RssSample {
            t_s,
            node: node.to_owned(),
            rss_bytes: mib * 1024 * 1024,
            open_fds: Some(mib),
        };
        let samples = Samples {
            rss: vec![
                s(0.0, "node-0", 30),
                s(0.0, "node-1", 25),
                s(1.0, "node-0", 600),
                s(1.0, "node-1", 40),
                s(2.0, "node-0", 550),
                s(2.0, "node-1", 41),
            ],
            max_fds: vec![("node-1".to_owned(), 1024)],
            metrics: 6,
            proc: 0,
        };
        let limit = (Some(512 * 1024 * 1024), "test".to_owned());
        let r = summarize(&samples, Duration::from_secs(1), limit);
        assert_eq!(r.source, "metrics");
        assert_eq!(r.nodes.len(), 2);
        let n0 = &r.nodes[0];
        assert_eq!(
            (n0.first_bytes, n0.peak_bytes, n0.last_bytes),
            (30 << 20, 600 << 20, 550 << 20)
        );
        assert_eq!(n0.peak_t_s, 1.0);
        assert!(n0.over_limit);
        assert_eq!(n0.peak_of_limit, Some(1.172));
        assert!(!r.nodes[1].over_limit);
        assert_eq!(r.nodes[1].max_fds, Some(1024));
        assert_eq!(r.nodes[1].peak_open_fds, Some(41));
    }
}
