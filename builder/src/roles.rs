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

/// Every role the builder makes. `all` is the one-server stack: every part on one machine (the default). The
/// others are a cluster's (`cluster` component: the description, and turning on a node's own roles at first boot).
pub const ROLES: &[Role] = &[
    Role {
        name: "all",
        components: &["base", "boot", "access", "firewall", "web", "database", "agent"],
    },
    Role {
        name: "lb",
        components: &["base", "boot", "access", "firewall", "agent", "balancer", "cluster"],
    },
    Role {
        name: "app",
        components: &[
            "base", "boot", "access", "firewall", "web", "agent", "balancer", "cluster",
        ],
    },
    Role {
        name: "db",
        components: &[
            "base", "boot", "access", "firewall", "database", "agent", "galera", "cluster",
        ],
    },
];

/// The components of every role named, once each, in the order of `components::ALL`. An unknown role, or a role
/// that names an unknown component, is an error that lists what exists.
pub fn resolve(names: &[String], roles: &[Role]) -> anyhow::Result<Vec<&'static Component>> {
    let mut wanted = Vec::new();
    for role in names {
        let Some(found) = roles.iter().find(|r| r.name == role) else {
            bail!(
                "key `role`: expected one or more of {}, got `{role}`",
                roles.iter().map(|r| r.name).collect::<Vec<_>>().join(", ")
            );
        };
        for name in found.components {
            match components::by_name(name) {
                Some(c) => wanted.push(c.name),
                None => bail!(
                    "role `{}` names the component `{name}`, which does not exist; the components are {}",
                    found.name,
                    components::ALL.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
                ),
            }
        }
    }
    Ok(components::ALL
        .iter()
        .copied()
        .filter(|c| wanted.contains(&c.name))
        .collect())
}
