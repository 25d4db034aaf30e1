//! The IP allowlist of one database: CIDR rules in, an admit/deny decision out. Checked on
//! every accepted socket before a byte is read, so the lookup allocates nothing.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

/// Hard cap on rules per database, as in the hosted feature pgmtls mirrors.
pub const MAX_RULES: usize = 60;

/// One allowlist entry as the data plane sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    pub id: Arc<str>,
    pub cidr: IpNet,
}

/// An immutable rule set. Empty means nobody is admitted (default deny).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    rules: Vec<AllowRule>,
}

impl Allowlist {
    pub fn new(rules: Vec<AllowRule>) -> Self {
        Allowlist { rules }
    }

    /// The first rule that admits `ip`, if any. IPv4-mapped IPv6 peers (`::ffff:a.b.c.d`, what
    /// a dual-stack listener reports for IPv4 clients) are matched as the IPv4 address they are.
    pub fn check(&self, ip: IpAddr) -> Option<&AllowRule> {
        let ip = canonical(ip);
        self.rules.iter().find(|r| r.cidr.contains(&ip))
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// Maps IPv4-mapped IPv6 addresses to IPv4; leaves everything else alone.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Parses a CIDR the way operators write it, refusing host bits so `10.0.0.1/8` is not silently
/// widened or narrowed: the error suggests the network form. A bare address means a single host.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let net: IpNet = match text.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match text.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                return Err(format!(
                    "{text:?} is not a CIDR block (expected e.g. 203.0.113.7/32 or 2001:db8::/48)"
                ))
            }
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "{text} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(cidrs: &[&str]) -> Allowlist {
        Allowlist::new(
            cidrs
                .iter()
                .enumerate()
                .map(|(i, c)| AllowRule {
                    id: format!("r{i}").into(),
                    cidr: parse_cidr(c).unwrap(),
                })
                .collect(),
        )
    }

    #[test]
    fn empty_allowlist_admits_nobody() {
        assert!(list(&[]).check("127.0.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn matches_v4_v6_and_mapped_peers() {
        let l = list(&["127.0.0.2/32", "10.0.0.0/8", "2001:db8::/32"]);
        let id = |ip: &str| l.check(ip.parse().unwrap()).map(|r| r.id.to_string());
        assert_eq!(id("127.0.0.2").as_deref(), Some("r0"));
        assert_eq!(id("127.0.0.3"), None);
        assert_eq!(id("10.200.1.1").as_deref(), Some("r1"));
        assert_eq!(id("::ffff:10.1.2.3").as_deref(), Some("r1"));
        assert_eq!(id("::ffff:127.0.0.3"), None);
        assert_eq!(id("2001:db8:1::5").as_deref(), Some("r2"));
        assert_eq!(id("2001:db9::1"), None);
    }

    #[test]
    fn cidr_parser_refuses_host_bits_and_garbage() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("1.2.3.4").unwrap().to_string(), "1.2.3.4/32");
        let e = parse_cidr("10.0.0.1/8").unwrap_err();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
        for bad in [
            "",
            "10.0.0.0/33",
            "banana",
            "1.2.3.4/-1",
            "::/129",
            "1.2.3/24",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }
}
