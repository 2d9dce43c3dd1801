//! Nodes in network namespaces of `scripts/netns.sh` and black-hole cuts around them.
//!
//! Namespace `wallet-n<i>` has address 10.77.0.1<i> on the bridge; the host is 10.77.0.1
//! and forwards the PostgreSQL and Redis ports to its loopback. A cut is a set of
//! iptables DROP rules in the namespace's own WALLET_IN/WALLET_OUT chains: packets
//! vanish (no RST, no ICMP), so the other side only learns from its own timeouts, as
//! with a real partition. Healing flushes those chains.

use std::net::Ipv4Addr;
use std::process::Command;

/// The host's address on the bridge: PostgreSQL and Redis are reached through it.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Namespaces the script can make (addresses 10.77.0.10 to 10.77.0.19).
pub const MAX_NAMESPACES: usize = 10;

/// One namespace and its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    pub name: String,
    pub addr: Ipv4Addr,
}

/// What a cut drops, in both directions, at the namespace's link (loopback is untouched).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// TCP to and from one port of the gateway: PostgreSQL or Redis.
    GatewayPort(u16),
    /// Everything to and from the other namespaces: the internal forward path, both ways.
    Peers,
    /// Everything: PostgreSQL, Redis, the peers and the test's own clients.
    All,
}

impl Netns {
    /// The namespace of node index `index`, as `scripts/netns.sh up` names it.
    pub fn node(index: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            index < MAX_NAMESPACES,
            "scripts/netns.sh makes at most {MAX_NAMESPACES} namespaces"
        );
        Ok(Self {
            name: format!("wallet-n{index}"),
            addr: Ipv4Addr::new(10, 77, 0, 10 + u8::try_from(index)?),
        })
    }

    /// Adds the DROP rules of `cut` (on top of any cut already in place).
    pub fn cut(&self, cut: Cut) -> anyhow::Result<()> {
        let gateway = GATEWAY.to_string();
        let peers = "10.77.0.2-10.77.0.254";
        let rules: Vec<Vec<String>> = match cut {
            Cut::GatewayPort(port) => {
                let port = port.to_string();
                vec![
                    args(&[
                        "WALLET_OUT",
                        "-o",
                        "eth0",
                        "-d",
                        &gateway,
                        "-p",
                        "tcp",
                        "--dport",
                        &port,
                    ]),
                    args(&[
                        "WALLET_IN",
                        "-i",
                        "eth0",
                        "-s",
                        &gateway,
                        "-p",
                        "tcp",
                        "--sport",
                        &port,
                    ]),
                ]
            }
            Cut::Peers => vec![
                args(&[
                    "WALLET_OUT",
                    "-o",
                    "eth0",
                    "-m",
                    "iprange",
                    "--dst-range",
                    peers,
                ]),
                args(&[
                    "WALLET_IN",
                    "-i",
                    "eth0",
                    "-m",
                    "iprange",
                    "--src-range",
                    peers,
                ]),
            ],
            Cut::All => vec![
                args(&["WALLET_OUT", "-o", "eth0"]),
                args(&["WALLET_IN", "-i", "eth0"]),
            ],
        };
        for mut rule in rules {
            rule.insert(0, "-A".to_owned());
            rule.extend(["-j".to_owned(), "DROP".to_owned()]);
            self.iptables(&rule)?;
        }
        Ok(())
    }

    /// Removes every cut of this namespace.
    pub fn heal(&self) -> anyhow::Result<()> {
        for chain in ["WALLET_IN", "WALLET_OUT"] {
            self.iptables(&args(&["-F", chain]))?;
        }
        Ok(())
    }

    fn iptables(&self, rule: &[String]) -> anyhow::Result<()> {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.name, "iptables", "-w"])
            .args(rule)
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "iptables {} in {}: {}",
            rule.join(" "),
            self.name,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }
}

fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

/// `url` with a loopback host replaced by the gateway, for a node inside a namespace.
pub fn via_gateway(url: &str) -> anyhow::Result<String> {
    let mut parsed = reqwest::Url::parse(url)?;
    if matches!(parsed.host_str(), Some("127.0.0.1" | "localhost")) {
        parsed.set_host(Some(&GATEWAY.to_string()))?;
    }
    Ok(parsed.to_string())
}

/// The namespaces of one test, held exclusively until dropped (a cut made for one test
/// would break any other cluster in them, in this process or another); dropping heals
/// them, so a failed test leaves no cut behind.
pub struct Namespaces {
    pub list: Vec<Netns>,
    _lock: std::fs::File,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for namespace in &self.list {
            if let Err(error) = namespace.heal() {
                eprintln!("could not heal {}: {error:#}", namespace.name);
            }
        }
    }
}

/// What `prepare` found.
pub enum Prepared {
    Ready(Namespaces),
    /// This machine cannot have network namespaces with iptables in them, and why.
    Unavailable(String),
}

/// The namespaces for `nodes` nodes, brought up with `scripts/netns.sh up` when missing
/// and healed of any cut a killed run left behind, or why this machine cannot have them
/// (not root, no `ip` or `iptables`, namespaces refused). Blocks while another test holds
/// them. A machine that can have them but where the script fails is an error.
pub fn prepare(nodes: usize) -> anyhow::Result<Prepared> {
    let list = (0..nodes)
        .map(Netns::node)
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Probed once per process: the tests of one binary would race on the probe.
    static UNAVAILABLE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if let Some(reason) = UNAVAILABLE.get_or_init(unavailable) {
        return Ok(Prepared::Unavailable(reason.clone()));
    }
    let lock_path = std::env::temp_dir().join("wallet-netns-tests.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    lock.lock()?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/netns.sh");
    // Idempotent and quick when everything is there already.
    let output = Command::new(script)
        .args(["up", &nodes.to_string()])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "{script} up {nodes} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let namespaces = Namespaces { list, _lock: lock };
    for namespace in &namespaces.list {
        namespace.heal()?;
    }
    Ok(Prepared::Ready(namespaces))
}

/// Why namespaces with iptables inside cannot be made here, found by making one.
fn unavailable() -> Option<String> {
    let run = |program: &str, args: &[&str]| match Command::new(program).args(args).output() {
        Ok(output) if output.status.success() => {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        }
        Ok(output) => Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(error) => Err(format!("`{program}` cannot run: {error}")),
    };
    match run("id", &["-u"]) {
        Ok(uid) if uid == "0" => {}
        Ok(uid) => {
            return Some(format!(
                "not root (uid {uid}): network namespaces and iptables need root"
            ));
        }
        Err(reason) => return Some(reason),
    }
    if let Err(reason) = run("ip", &["-V"]) {
        return Some(format!("{reason} (apt-get install -y iproute2)"));
    }
    if let Err(reason) = run("iptables", &["--version"]) {
        return Some(format!("{reason} (apt-get install -y iptables)"));
    }
    let probe = format!("wallet-probe-{}", std::process::id());
    let made = run("ip", &["netns", "add", &probe])
        .and_then(|_| run("ip", &["netns", "exec", &probe, "iptables", "-S"]));
    // Removed whether or not the probe worked; a failed add leaves nothing to remove.
    let _ = run("ip", &["netns", "del", &probe]);
    made.err()
}
