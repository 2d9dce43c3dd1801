//! Where a webhook may point. An `http` or `https` URL with a host; and, unless private
//! targets are allowed (`WALLET_WEBHOOK_ALLOW_PRIVATE`, for development), never an address
//! inside a network: loopback, private, link-local (the cloud metadata service),
//! unique-local, multicast, unspecified and other non-public ranges.
//!
//! Checked twice: when the webhook is created (its host's addresses, as resolved then),
//! and at every connection, by the resolver the delivery client uses. The second check
//! is the one that matters: a name that resolved to a public address at creation may
//! resolve to 10.0.0.5 later (DNS rebinding), and the resolver drops such addresses
//! before anything connects to them.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::dns::Name;
use url::{Host, Url};

/// The longest URL a webhook may have.
pub const MAX_URL_LEN: usize = 2048;

/// Why a URL cannot be a webhook's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not a URL a webhook can have.
    #[error("url {0}")]
    Invalid(String),
    /// A URL of a network the service must not reach into.
    #[error("url {0}")]
    NotAllowed(String),
}

/// Parses a webhook URL: `http` or `https`, a host, no credentials, no fragment.
pub fn parse(text: &str) -> Result<Url, TargetError> {
    if text.len() > MAX_URL_LEN {
        return Err(TargetError::Invalid(format!(
            "must be at most {MAX_URL_LEN} characters"
        )));
    }
    let url = Url::parse(text)
        .map_err(|error| TargetError::Invalid(format!("is not a valid URL: {error}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(TargetError::Invalid(format!(
            "must be http or https, not {}",
            url.scheme()
        )));
    }
    match url.host() {
        None => return Err(TargetError::Invalid("must name a host".to_owned())),
        Some(Host::Domain("")) => return Err(TargetError::Invalid("must name a host".to_owned())),
        Some(_) => {}
    }
    // Credentials would be stored and listed with the URL; the signature authenticates us.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(TargetError::Invalid(
            "must not carry a user name or password".to_owned(),
        ));
    }
    if url.fragment().is_some() {
        return Err(TargetError::Invalid(
            "must not have a fragment (#...)".to_owned(),
        ));
    }
    Ok(url)
}

/// Whether deliveries must not go to `ip`: every range that is not the public internet.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => forbidden_v4(ip),
        IpAddr::V6(ip) => forbidden_v6(ip),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_documentation()
        // "this network" 0.0.0.0/8, reaching the local host on Linux
        || a == 0
        // shared address space (carrier-grade NAT) 100.64.0.0/10
        || (a == 100 && (b & 0xc0) == 64)
        // IETF protocol assignments 192.0.0.0/24
        || (a == 192 && b == 0 && c == 0)
        // benchmarking 198.18.0.0/15
        || (a == 198 && (b & 0xfe) == 18)
        // reserved 240.0.0.0/4
        || a >= 240
}

fn forbidden_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let s = ip.segments();
    let embedded = |high: u16, low: u16| {
        Ipv4Addr::new(
            (high >> 8) as u8,
            (high & 0xff) as u8,
            (low >> 8) as u8,
            (low & 0xff) as u8,
        )
    };
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        // IPv4-compatible ::/96 (deprecated), which some stacks still route to IPv4
        || s[..6].iter().all(|&segment| segment == 0)
        // unique local fc00::/7
        || (s[0] & 0xfe00) == 0xfc00
        // link-local fe80::/10 and the deprecated site-local fec0::/10
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xffc0) == 0xfec0
        // documentation 2001:db8::/32
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        // NAT64 64:ff9b::/96 and 6to4 2002::/16 lead to the IPv4 address inside them
        || (s[0] == 0x0064 && s[1] == 0xff9b && s[2..6].iter().all(|&x| x == 0)
            && forbidden_v4(embedded(s[6], s[7])))
        || (s[0] == 0x2002 && forbidden_v4(embedded(s[1], s[2])))
}

/// Checks a parsed URL's host against the address policy: an IP literal directly, a
/// name by resolving it (within `timeout`). A name that does not resolve is refused too:
/// nothing could be delivered to it.
pub async fn check(url: &Url, allow_private: bool, timeout: Duration) -> Result<(), TargetError> {
    if allow_private {
        return Ok(());
    }
    let refused = |what: String| {
        TargetError::NotAllowed(format!(
            "{what}: loopback, private, link-local, unique-local, multicast and unspecified \
             addresses are refused (WALLET_WEBHOOK_ALLOW_PRIVATE is off)"
        ))
    };
    match url.host() {
        Some(Host::Ipv4(ip)) if forbidden_v4(ip) => Err(refused(format!("{ip} is not public"))),
        Some(Host::Ipv6(ip)) if forbidden_v6(ip) => Err(refused(format!("{ip} is not public"))),
        Some(Host::Domain(name)) => {
            let port = url.port_or_known_default().unwrap_or(80);
            let addrs =
                match tokio::time::timeout(timeout, tokio::net::lookup_host((name, port))).await {
                    Ok(Ok(addrs)) => addrs.collect::<Vec<SocketAddr>>(),
                    Ok(Err(error)) => {
                        return Err(TargetError::Invalid(format!(
                            "host {name} does not resolve: {error}"
                        )));
                    }
                    Err(_) => {
                        return Err(TargetError::Invalid(format!(
                            "host {name} did not resolve within {} s",
                            timeout.as_secs()
                        )));
                    }
                };
            match addrs.iter().find(|addr| is_forbidden(addr.ip())) {
                Some(addr) => Err(refused(format!("host {name} resolves to {}", addr.ip()))),
                None if addrs.is_empty() => Err(TargetError::Invalid(format!(
                    "host {name} resolves to no address"
                ))),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// The delivery client's resolver: the system's (getaddrinfo), minus every address the
/// policy forbids. A name left with no address fails the connection attempt, which is
/// recorded like any other failure.
#[derive(Clone, Debug)]
pub struct GuardedResolver {
    pub allow_private: bool,
}

type Resolving =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, std::io::Error>> + Send>>;

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            // Port 0: the connector puts the URL's port in.
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|addr| allow_private || !is_forbidden(addr.ip()))
                .collect();
            if public.is_empty() && !resolved.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host} resolves only to addresses that are not public"),
                ));
            }
            Ok(public.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_service::Service as _;

    #[test]
    fn only_http_and_https_urls_with_a_host_and_no_credentials_parse() {
        for good in [
            "https://hooks.example.com/wallet?x=1",
            "http://203.0.113.9:8080/",
            "http://[2606:4700::1111]/hook",
        ] {
            assert!(parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "not a url",
            "ftp://example.com/",
            "file:///etc/passwd",
            "http://",
            "http://:8080/path",
            "https://user:pw@example.com/",
            "https://example.com/#frag",
            "mailto:someone@example.com",
        ] {
            assert!(matches!(parse(bad), Err(TargetError::Invalid(_))), "{bad}");
        }
        assert!(parse(&format!("https://example.com/{}", "a".repeat(MAX_URL_LEN))).is_err());
    }

    #[test]
    fn every_non_public_range_is_forbidden() {
        for ip in [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "192.0.0.8",
            "198.18.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "::",
            "::1",
            "::127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
        ] {
            let ip: IpAddr = ip.parse().expect("address literal");
            assert!(is_forbidden(ip), "{ip} must be forbidden");
        }
        for ip in [
            "8.8.8.8",
            "93.184.215.14",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = ip.parse().expect("address literal");
            assert!(!is_forbidden(ip), "{ip} is public");
        }
    }

    #[tokio::test]
    async fn private_literals_and_names_are_refused_unless_allowed() {
        let timeout = Duration::from_secs(5);
        for url in [
            "http://127.0.0.1:9000/",
            "http://[::1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://0x7f000001/",
            "http://localhost:8080/",
        ] {
            let url = parse(url).expect("valid URL");
            assert!(
                matches!(
                    check(&url, false, timeout).await,
                    Err(TargetError::NotAllowed(_))
                ),
                "{url}"
            );
            assert_eq!(check(&url, true, timeout).await, Ok(()), "{url}");
        }
        let public = parse("http://93.184.215.14/hook").expect("valid URL");
        assert_eq!(check(&public, false, timeout).await, Ok(()));
    }

    #[tokio::test]
    async fn the_resolver_drops_private_addresses_at_connection_time() {
        let name: Name = "localhost".parse().expect("a name");
        let mut guarded = GuardedResolver {
            allow_private: false,
        };
        let error = guarded.call(name).await.expect_err("loopback only");
        assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied);
        let name: Name = "localhost".parse().expect("a name");
        let mut open = GuardedResolver {
            allow_private: true,
        };
        let addrs: Vec<SocketAddr> = open.call(name).await.expect("resolves").collect();
        assert!(
            addrs.iter().all(|addr| addr.ip().is_loopback()),
            "{addrs:?}"
        );
    }
}
