//! Talking to the local cluster of scripts/cluster.sh: who owns a wallet, the
//! node pids, kill -9, restart, and resident memory from /proc.

use crate::client::{Conn, Target, extract_uuid};
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
