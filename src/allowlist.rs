//! The IP allowlist of one database: CIDR rules in, an admit/deny decision out. Checked on
//! every accepted socket before a byte is read, so the lookup allocates nothing.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

/// Hard cap on rules per database, as in the hosted feature pgmtls mirrors.
pub const MAX_RULES: usize = 60;

/// Hard cap on trusted ranges per database.
pub const MAX_TRUSTED_IPS: usize = 20;

/// Which list let an address in: the `admitted_by` log field and metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdmittedBy {
    /// An IP rule: the client must present a valid certificate.
    MtlsRule,
    /// Only a trusted range: TLS is still required, a certificate is optional (one that is
    /// presented must still be valid), and Postgres' own authentication decides.
    TrustedIp,
}

impl AdmittedBy {
    pub const ALL: &'static [AdmittedBy] = &[AdmittedBy::MtlsRule, AdmittedBy::TrustedIp];

    pub fn as_str(self) -> &'static str {
        match self {
            AdmittedBy::MtlsRule => "mtls_rule",
            AdmittedBy::TrustedIp => "trusted_ip",
        }
    }

    /// Whether a connection admitted this way must present a client certificate.
    pub fn requires_certificate(self) -> bool {
        self == AdmittedBy::MtlsRule
    }
}

impl std::fmt::Display for AdmittedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The entry that admits an address, and which list it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted<'a> {
    pub by: AdmittedBy,
    pub entry: &'a AllowRule,
}

/// The one decision on which list admits `ip`: an IP rule wins over a trusted range, so an
/// address on both lists must present a certificate (the mTLS rules take precedence over any
/// overlapping trusted range). `None` when neither admits it. The data plane, live
/// enforcement and diagnostics all ask this, so they cannot disagree.
pub fn admit<'a>(rules: &'a Allowlist, trusted: &'a Allowlist, ip: IpAddr) -> Option<Admitted<'a>> {
    if let Some(entry) = rules.check(ip) {
        return Some(Admitted {
            by: AdmittedBy::MtlsRule,
            entry,
        });
    }
    trusted.check(ip).map(|entry| Admitted {
        by: AdmittedBy::TrustedIp,
        entry,
    })
}

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
    fn an_ip_rule_takes_precedence_over_a_trusted_range() {
        let rules = list(&["127.0.0.2/32"]);
        let trusted = list(&["127.0.0.0/29", "10.0.0.0/8"]);
        let by = |ip: &str| {
            admit(&rules, &trusted, ip.parse().unwrap()).map(|a| (a.by, a.entry.id.to_string()))
        };
        assert_eq!(by("127.0.0.2"), Some((AdmittedBy::MtlsRule, "r0".into())));
        assert_eq!(by("127.0.0.3"), Some((AdmittedBy::TrustedIp, "r0".into())));
        assert_eq!(
            by("::ffff:10.1.1.1"),
            Some((AdmittedBy::TrustedIp, "r1".into()))
        );
        assert_eq!(by("127.0.0.9"), None);
        assert!(AdmittedBy::MtlsRule.requires_certificate());
        assert!(!AdmittedBy::TrustedIp.requires_certificate());
        assert_eq!(
            admit(&list(&[]), &list(&[]), "127.0.0.2".parse().unwrap()),
            None
        );
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
