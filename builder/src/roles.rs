//! Roles: what a machine is for, as a named list of components. The config's `role` picks one; `plan.rs` resolves
//! it once into the components the build installs, in this order.
//!
//! To add a role: one line in `ROLES` naming existing components (and README's `role` row).

use anyhow::bail;

use crate::components::{self, Component};

pub struct Role {
    pub name: &'static str,
    pub components: &'static [&'static str],
}

/// Every role the builder makes. `all` is the one-server stack: every part on one machine (the default).
pub const ROLES: &[Role] = &[Role {
    name: "all",
    components: &["base", "boot", "access", "firewall", "web", "database", "agent"],
}];

/// The role's components, in its order. An unknown role, or a role that names an unknown component, is an error
/// that lists what exists.
pub fn resolve(role: &str, roles: &[Role]) -> anyhow::Result<Vec<&'static Component>> {
    let Some(found) = roles.iter().find(|r| r.name == role) else {
        bail!(
            "key `role`: expected one of {}, got `{role}`",
            roles.iter().map(|r| r.name).collect::<Vec<_>>().join(", ")
        );
    };
    found
        .components
        .iter()
        .map(|name| match components::by_name(name) {
            Some(c) => Ok(c),
            None => bail!(
                "role `{}` names the component `{name}`, which does not exist; the components are {}",
                found.name,
                components::ALL.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
            ),
        })
        .collect()
}
