//! Talking to the local cluster of scripts/cluster.sh: who owns a wallet, the
//! node pids, kill -9, restart, and resident memory from /proc.

use crate::client::{Conn, Target, extract_uuid};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no admin endpoint answered /cluster/owner/{0}: {1}")]
    Owner(Uuid, String),
    #[error("node id {0:?} is not of the form node-<i>")]
    NodeId(String),
    #[error("reading pid file {0}: {1}")]
    Pid(PathBuf, String),
    #[error("{0}: {1}")]
    Command(String, String),
}

pub fn node_index(node_id: &str) -> Result<usize, ClusterError> {
    node_id
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ClusterError::NodeId(node_id.to_owned()))
}

/// Asks each admin endpoint in turn which node owns `wallet`.
pub async fn owner_of(admin: &[Arc<Target>], wallet: Uuid) -> Result<String, ClusterError> {
    let mut last = String::from("no admin endpoints");
    for t in admin {
        let mut conn = Conn::new(t.clone());
        match conn
            .get(&format!("/cluster/owner/{wallet}"), Duration::from_secs(5))
            .await
        {
            Ok((200, body)) => match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) => match v.get("owner").and_then(|o| o.as_str()) {
                    Some(owner) => return Ok(owner.to_owned()),
                    None => last = format!("{}: no owner yet", t.base),
                },
                Err(e) => last = format!("{}: {e}", t.base),
            },
            Ok((status, _)) => last = format!("{}: HTTP {status}", t.base),
            Err(e) => last = format!("{}: {e}", t.base),
        }
    }
    Err(ClusterError::Owner(wallet, last))
}

pub fn pid_file(root: &Path, index: usize) -> PathBuf {
    root.join(".data/run").join(format!("node-{index}.pid"))
}

pub fn read_pid(root: &Path, index: usize) -> Result<u32, ClusterError> {
    let path = pid_file(root, index);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ClusterError::Pid(path.clone(), e.to_string()))?;
    text.trim()
        .parse()
        .map_err(|_| ClusterError::Pid(path, format!("not a pid: {:?}", text.trim())))
}

/// All node pids that have a pid file, as (node name, pid).
pub fn node_pids(root: &Path) -> Vec<(String, u32)> {
    (0..16)
        .filter_map(|i| read_pid(root, i).ok().map(|p| (format!("node-{i}"), p)))
        .collect()
}

pub async fn kill9(pid: u32) -> Result<(), ClusterError> {
    let out = tokio::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .output()
        .await
        .map_err(|e| ClusterError::Command(format!("kill -9 {pid}"), e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Command(
            format!("kill -9 {pid}"),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

pub async fn start_node(root: &Path, index: usize) -> Result<(), ClusterError> {
    let what = format!("scripts/cluster.sh start-node {index}");
    let out = tokio::process::Command::new(root.join("scripts/cluster.sh"))
        .args(["start-node", &index.to_string()])
        .current_dir(root)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| ClusterError::Command(what.clone(), e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Command(
            what,
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }
}

/// VmRSS of a process in bytes, from /proc/<pid>/status.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    parse_vmrss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// User plus system CPU time of a process in seconds, from /proc/<pid>/stat
/// (fields 14 and 15, in USER_HZ ticks, which the Linux ABI fixes at 100).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    parse_stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

pub fn parse_stat_cpu(stat: &str) -> Option<f64> {
    // The command name (field 2) may contain spaces: count from its closing paren.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// CPU seconds so far of every process under `proc_root` (normally /proc) whose
/// `comm` is `name`, by pid. Processes that vanish or cannot be read are skipped.
pub fn cpu_by_comm(proc_root: &Path, name: &str) -> HashMap<u32, f64> {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return HashMap::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            if comm.trim_end_matches('\n') != name {
                return None;
            }
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            Some((pid, parse_stat_cpu(&stat)?))
        })
        .collect()
}

/// PostgreSQL's processes (the postmaster and its backends) with their CPU seconds.
pub fn postgres_cpu() -> HashMap<u32, f64> {
    cpu_by_comm(Path::new("/proc"), "postgres")
}

/// CPU seconds between two samples of `cpu_by_comm`: the growth of every pid in both,
/// plus all of the CPU of pids only in `after` (backends started in between). Backends
/// that exited in between are lost; the nodes' pools keep theirs for the whole run.
/// None when `after` saw no process.
pub fn cpu_between(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>) -> Option<f64> {
    if after.is_empty() {
        return None;
    }
    Some(
        after
            .iter()
            .map(|(pid, a)| match before.get(pid) {
                Some(b) if b <= a => a - b,
                // Less CPU than before: another process reused the pid, all of it is new.
                _ => *a,
            })
            .sum(),
    )
}

pub fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Extracts the id of a created wallet from a 201 body.
pub fn wallet_id(body: &[u8]) -> Option<Uuid> {
    extract_uuid(body, "walletId")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_map_to_indexes() {
        assert_eq!(node_index("node-0").expect("index"), 0);
        assert_eq!(node_index("node-12").expect("index"), 12);
        assert!(node_index("wallet-abc").is_err());
    }

    #[test]
    fn vmrss_is_read_in_bytes() {
        let status = "Name:\twallet\nVmPeak:\t  200000 kB\nVmRSS:\t   51234 kB\nThreads:\t4\n";
        assert_eq!(parse_vmrss(status), Some(51234 * 1024));
        assert_eq!(parse_vmrss("Name: x\n"), None);
        // Our own process always has a resident set.
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
    }

    #[test]
    fn cpu_time_is_read_from_proc_stat() {
        let stat =
            "1234 (wallet (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 100 0 0";
        assert_eq!(parse_stat_cpu(stat), Some(3.0));
        assert_eq!(parse_stat_cpu("garbage"), None);
        assert!(cpu_seconds(std::process::id()).is_some());
    }

    /// A fake /proc entry: `comm` and a `stat` with `utime` and `stime` ticks.
    fn fake_proc(root: &Path, pid: &str, comm: &str, utime: u64, stime: u64) {
        let dir = root.join(pid);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("comm"), format!("{comm}\n")).expect("comm");
        std::fs::write(
            dir.join("stat"),
            format!(
                "{pid} ({comm}) S 1 1 1 0 -1 4194560 100 0 0 0 {utime} {stime} 0 0 20 0 1 0 100 0 0"
            ),
        )
        .expect("stat");
    }

    #[test]
    fn processes_are_found_by_name_in_proc() {
        let root = std::env::temp_dir().join(format!("wallet-bench-proc-{}", Uuid::new_v4()));
        fake_proc(&root, "100", "postgres", 150, 50);
        fake_proc(&root, "101", "postgres", 10, 0);
        fake_proc(&root, "102", "wallet", 999, 999);
        // A comm that only starts with the name is another program.
        fake_proc(&root, "103", "postgres_exporter", 999, 999);
        fake_proc(&root, "self", "postgres", 999, 999);
        // A process that exited between listing and reading has no stat.
        std::fs::create_dir_all(root.join("104")).expect("mkdir");
        std::fs::write(root.join("104/comm"), "postgres\n").expect("comm");
        std::fs::write(root.join("uptime"), "1 1\n").expect("file");
        let found = cpu_by_comm(&root, "postgres");
        assert_eq!(found, HashMap::from([(100, 2.0), (101, 0.1)]));
        assert!(cpu_by_comm(&root.join("absent"), "postgres").is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn cpu_between_two_samples_counts_growth_and_newcomers() {
        let root = std::env::temp_dir().join(format!("wallet-bench-proc-{}", Uuid::new_v4()));
        fake_proc(&root, "100", "postgres", 100, 0);
        fake_proc(&root, "101", "postgres", 50, 0);
        fake_proc(&root, "102", "postgres", 900, 0);
        let before = cpu_by_comm(&root, "postgres");
        // 100 grows by 2.5 s, 101 exits, 102 is a new process on a reused pid with less
        // CPU than the old one, 103 is a backend started in between.
        fake_proc(&root, "100", "postgres", 300, 50);
        std::fs::remove_dir_all(root.join("101")).expect("rm");
        fake_proc(&root, "102", "postgres", 30, 0);
        fake_proc(&root, "103", "postgres", 70, 10);
        let after = cpu_by_comm(&root, "postgres");
        let cpu = cpu_between(&before, &after).expect("measured");
        assert!((cpu - (2.5 + 0.3 + 0.8)).abs() < 1e-9, "{cpu}");
        assert_eq!(cpu_between(&before, &HashMap::new()), None);
        assert_eq!(
            cpu_between(&HashMap::new(), &after).map(|c| (c * 10.0).round()),
            Some(46.0)
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn pid_files_are_read_from_the_run_folder() {
        let root = std::env::temp_dir().join(format!("wallet-bench-pids-{}", Uuid::new_v4()));
        std::fs::create_dir_all(root.join(".data/run")).expect("mkdir");
        std::fs::write(pid_file(&root, 1), "4242\n").expect("write");
        std::fs::write(pid_file(&root, 2), "garbage").expect("write");
        assert_eq!(read_pid(&root, 1).expect("pid"), 4242);
        assert!(read_pid(&root, 2).is_err());
        assert!(read_pid(&root, 0).is_err());
        assert_eq!(node_pids(&root), vec![("node-1".to_owned(), 4242)]);
        let _ = std::fs::remove_dir_all(&root);
    }
}
