//! Changes to a database's IP allowlist, written through the parser the proxy loads
//! `ip-rules.yaml` with.

use ipnet::IpNet;
use serde_json::json;
use uuid::Uuid;

use super::{now, validate, Control, ControlError, Result, Txn};
use crate::allowlist::{parse_cidr, MAX_RULES};
use crate::state::{
    self, ip_rules_to_yaml, one_line, parse_ip_rules, validate_description, AuditEntry,
    DatabaseState, IpRule, PUBLIC_MODE,
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

/// Adds a rule admitting `cidr` to `database`.
pub fn create(
    control: &Control,
    database: &str,
    cidr: &str,
    description: &str,
    actor: &str,
) -> Result<RuleChange> {
    let cidr = parse_rule_cidr(cidr).map_err(ControlError::Invalid)?;
    validate_description(description).map_err(ControlError::Invalid)?;
    control.retrying(|| create_once(control, database, cidr, description, actor))
}

fn create_once(
    control: &Control,
    database: &str,
    cidr: IpNet,
    description: &str,
    actor: &str,
) -> Result<RuleChange> {
    let mut txn = control.begin(Some(database), actor)?;
    let db = txn.load(database)?;
    if db.rules.len() >= MAX_RULES {
        return Err(ControlError::Conflict(format!(
            "database {database} already has {} IP rules, the maximum is {MAX_RULES}; delete one \
             first",
            db.rules.len()
        )));
    }
    if let Some(dup) = db.rules.iter().find(|r| r.cidr == cidr) {
        return Err(ControlError::Conflict(format!(
            "an IP rule for {cidr} already exists (id {})",
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
    let mut rules = db.rules.clone();
    rules.push(rule.clone());
    save(&mut txn, &db, &rules)?;
    let audit = txn.record(
        "ip_rule.create",
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
    let cidr = match selector {
        Selector::Cidr(c) => Some(parse_rule_cidr(c).map_err(ControlError::Invalid)?),
        Selector::Id(_) => None,
    };
    control.retrying(|| delete_once(control, database, selector, cidr, actor))
}

fn delete_once(
    control: &Control,
    database: &str,
    selector: Selector<'_>,
    cidr: Option<IpNet>,
    actor: &str,
) -> Result<RuleChange> {
    let mut txn = control.begin(Some(database), actor)?;
    let db = txn.load(database)?;
    let found = db.rules.iter().position(|r| match (selector, cidr) {
        (Selector::Id(id), _) => r.id == id,
        (_, Some(c)) => r.cidr == c,
        (_, None) => false,
    });
    let Some(index) = found else {
        return Err(ControlError::NotFound(match (selector, cidr) {
            (Selector::Id(id), _) => format!("no IP rule with id {id:?} for database {database}"),
            (_, c) => format!(
                "no IP rule for {} in database {database}",
                c.map(|c| c.to_string()).unwrap_or_default()
            ),
        }));
    };
    let mut rules = db.rules.clone();
    let rule = rules.remove(index);
    save(&mut txn, &db, &rules)?;
    let audit = txn.record(
        "ip_rule.delete",
        Some(database),
        json!({"id": rule.id, "cidr": rule.cidr.to_string()}),
    )?;
    Ok(RuleChange { rule, audit })
}

/// Writes a new rule list after re-reading it with the proxy's parser and building the
/// database with it.
fn save(txn: &mut Txn<'_>, db: &DatabaseState, rules: &[IpRule]) -> Result<()> {
    let file = db.dir.join(state::IP_RULES);
    let yaml = ip_rules_to_yaml(rules);
    let parsed = parse_ip_rules(&file, &yaml).map_err(|e| ControlError::Invalid(one_line(&e)))?;
    let mut candidate = db.clone();
    candidate.rules = parsed;
    validate(&candidate)?;
    txn.write_database_file(&db.name, state::IP_RULES, yaml.as_bytes(), PUBLIC_MODE)?;
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
