//! Changes to a database's IP allowlist, written through the parser the proxy loads
//! `ip-rules.yaml` with.

use ipnet::IpNet;
use serde_json::json;
use uuid::Uuid;

use super::{now, validate, Control, ControlError, Result, Txn};
use crate::allowlist::{parse_cidr, MAX_RULES, MAX_TRUSTED_IPS};
use crate::state::{
    self, ip_rules_to_yaml, one_line, parse_ip_rules, parse_trusted_ips, trusted_ips_to_yaml,
    validate_description, AuditEntry, DatabaseState, IpRule, PUBLIC_MODE,
};

/// Parses a rule's CIDR like the rules file does, and refuses IPv4-mapped IPv6 blocks: the
/// proxy matches IPv4 clients as IPv4, so such a rule would never admit anyone.
pub fn parse_rule_cidr(text: &str) -> std::result::Result<IpNet, String> {
    let net = parse_cidr(text)?;
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.network().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                return Err(format!(
                    "{text} is an IPv4-mapped IPv6 block; write it as {v4}/{}",
                    v6.prefix_len() - 96
                ));
            }
        }
    }
    Ok(net)
}

/// Which rule a deletion names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector<'a> {
    Id(&'a str),
    /// The CIDR as typed; parsed like a new rule's.
    Cidr(&'a str),
}

/// A rule that was added or removed, with its audit record.
#[derive(Debug, Clone)]
pub struct RuleChange {
    pub rule: IpRule,
    pub audit: AuditEntry,
}

/// The two address lists of a database: the IP rules (a client certificate is required) and
/// the trusted ranges (admitted without one where no rule covers the address). One code path
/// changes both, so they validate, refuse and audit alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum List {
    IpRules,
    TrustedIps,
}

impl List {
    /// What one entry is called in messages.
    pub(crate) fn noun(self) -> &'static str {
        match self {
            List::IpRules => "IP rule",
            List::TrustedIps => "trusted IP range",
        }
    }

    fn max(self) -> usize {
        match self {
            List::IpRules => MAX_RULES,
            List::TrustedIps => MAX_TRUSTED_IPS,
        }
    }

    fn file(self) -> &'static str {
        match self {
            List::IpRules => state::IP_RULES,
            List::TrustedIps => state::TRUSTED_IPS,
        }
    }

    /// The audit action of a change: `ip_rule.create`, `trusted_ip.delete`.
    fn action(self, verb: &str) -> String {
        match self {
            List::IpRules => format!("ip_rule.{verb}"),
            List::TrustedIps => format!("trusted_ip.{verb}"),
        }
    }

    pub(crate) fn entries(self, db: &DatabaseState) -> &[IpRule] {
        match self {
            List::IpRules => &db.rules,
            List::TrustedIps => &db.trusted_ips,
        }
    }

    fn to_yaml(self, entries: &[IpRule]) -> String {
        match self {
            List::IpRules => ip_rules_to_yaml(entries),
            List::TrustedIps => trusted_ips_to_yaml(entries),
        }
    }

    /// Re-reads `yaml` with the proxy's parser into a copy of `db`.
    fn parse_into(
        self,
        db: &DatabaseState,
        yaml: &str,
    ) -> std::result::Result<DatabaseState, String> {
        let file = db.dir.join(self.file());
        let mut candidate = db.clone();
        match self {
            List::IpRules => {
                candidate.rules = parse_ip_rules(&file, yaml).map_err(|e| one_line(&e))?
            }
            List::TrustedIps => {
                candidate.trusted_ips = parse_trusted_ips(&file, yaml).map_err(|e| one_line(&e))?
            }
        }
        Ok(candidate)
    }
}

/// Adds a rule admitting `cidr` to `database`.
pub fn create(
    control: &Control,
    database: &str,
    cidr: &str,
    description: &str,
    actor: &str,
) -> Result<RuleChange> {
    create_in(List::IpRules, control, database, cidr, description, actor)
}

/// Adds an entry for `cidr` to `list` of `database`.
pub(crate) fn create_in(
    list: List,
    control: &Control,
    database: &str,
    cidr: &str,
    description: &str,
    actor: &str,
) -> Result<RuleChange> {
    let cidr = parse_rule_cidr(cidr).map_err(ControlError::Invalid)?;
    validate_description(description).map_err(ControlError::Invalid)?;
    control.retrying(|| create_once(list, control, database, cidr, description, actor))
}

fn create_once(
    list: List,
    control: &Control,
    database: &str,
    cidr: IpNet,
    description: &str,
    actor: &str,
) -> Result<RuleChange> {
    let mut txn = control.begin(Some(database), actor)?;
    let db = txn.load(database)?;
    let (noun, max) = (list.noun(), list.max());
    let entries = list.entries(&db);
    if entries.len() >= max {
        return Err(ControlError::Conflict(format!(
            "database {database} already has {} {noun}s, the maximum is {max}; delete one first",
            entries.len()
        )));
    }
    if let Some(dup) = entries.iter().find(|r| r.cidr == cidr) {
        let article = if list == List::IpRules { "an" } else { "a" };
        return Err(ControlError::Conflict(format!(
            "{article} {noun} for {cidr} already exists (id {})",
            dup.id
        )));
    }
    let at = now();
    let rule = IpRule {
        id: Uuid::new_v4().to_string(),
        cidr,
        description: description.to_owned(),
        created_at: at,
        updated_at: at,
    };
    let mut rules = entries.to_vec();
    rules.push(rule.clone());
    save(list, &mut txn, &db, &rules)?;
    let audit = txn.record(
        &list.action("create"),
        Some(database),
        json!({"id": rule.id, "cidr": cidr.to_string(), "description": rule.description}),
    )?;
    Ok(RuleChange { rule, audit })
}

/// Removes the rule `selector` names from `database`.
pub fn delete(
    control: &Control,
    database: &str,
    selector: Selector<'_>,
    actor: &str,
) -> Result<RuleChange> {
    delete_in(List::IpRules, control, database, selector, actor)
}

/// Removes the entry `selector` names from `list` of `database`.
pub(crate) fn delete_in(
    list: List,
    control: &Control,
    database: &str,
    selector: Selector<'_>,
    actor: &str,
) -> Result<RuleChange> {
    let cidr = match selector {
        Selector::Cidr(c) => Some(parse_rule_cidr(c).map_err(ControlError::Invalid)?),
        Selector::Id(_) => None,
    };
    control.retrying(|| delete_once(list, control, database, selector, cidr, actor))
}

fn delete_once(
    list: List,
    control: &Control,
    database: &str,
    selector: Selector<'_>,
    cidr: Option<IpNet>,
    actor: &str,
) -> Result<RuleChange> {
    let mut txn = control.begin(Some(database), actor)?;
    let db = txn.load(database)?;
    let noun = list.noun();
    let entries = list.entries(&db);
    let found = entries.iter().position(|r| match (selector, cidr) {
        (Selector::Id(id), _) => r.id == id,
        (_, Some(c)) => r.cidr == c,
        (_, None) => false,
    });
    let Some(index) = found else {
        return Err(ControlError::NotFound(match (selector, cidr) {
            (Selector::Id(id), _) => format!("no {noun} with id {id:?} for database {database}"),
            (_, c) => format!(
                "no {noun} for {} in database {database}",
                c.map(|c| c.to_string()).unwrap_or_default()
            ),
        }));
    };
    let mut rules = entries.to_vec();
    let rule = rules.remove(index);
    save(list, &mut txn, &db, &rules)?;
    let audit = txn.record(
        &list.action("delete"),
        Some(database),
        json!({"id": rule.id, "cidr": rule.cidr.to_string()}),
    )?;
    Ok(RuleChange { rule, audit })
}

/// Writes a new list after re-reading it with the proxy's parser and building the database
/// with it.
fn save(list: List, txn: &mut Txn<'_>, db: &DatabaseState, rules: &[IpRule]) -> Result<()> {
    let yaml = list.to_yaml(rules);
    let candidate = list.parse_into(db, &yaml).map_err(ControlError::Invalid)?;
    validate(&candidate)?;
    txn.write_database_file(&db.name, list.file(), yaml.as_bytes(), PUBLIC_MODE)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_cidrs_refuse_host_bits_and_mapped_v4() {
        assert_eq!(
            parse_rule_cidr("2001:db8::/48").unwrap().to_string(),
            "2001:db8::/48"
        );
        let e = parse_rule_cidr("10.0.0.1/8").unwrap_err();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
        let e = parse_rule_cidr("::ffff:10.0.0.0/104").unwrap_err();
        assert!(e.contains("write it as 10.0.0.0/8"), "{e}");
        assert!(parse_rule_cidr("::/0").is_ok());
    }
}
