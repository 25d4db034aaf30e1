//! Changes to a database's trusted IP ranges (`trusted-ips.yaml`): addresses admitted without
//! a client certificate where no IP rule covers them. The same code path as the IP rules
//! ([`super::ip_rules`]), so both lists validate, refuse and audit alike.

use super::ip_rules::{create_in, delete_in, List, RuleChange, Selector};
use super::{Control, Result};

/// Adds a trusted range for `cidr` to `database`.
pub fn create(
    control: &Control,
    database: &str,
    cidr: &str,
    description: &str,
    actor: &str,
) -> Result<RuleChange> {
    create_in(
        List::TrustedIps,
        control,
        database,
        cidr,
        description,
        actor,
    )
}

/// Removes the trusted range `selector` names from `database`. The proxy closes the sessions
/// it admitted (and no IP rule does) from its next reload.
pub fn delete(
    control: &Control,
    database: &str,
    selector: Selector<'_>,
    actor: &str,
) -> Result<RuleChange> {
    delete_in(List::TrustedIps, control, database, selector, actor)
}
