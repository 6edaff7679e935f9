//! Our files on top of the package layer: each of the role's components installs its own (`components/`), in the
//! role's order; then every file that must be unique to an instance is removed, whoever left it.

use std::path::Path;

use anyhow::Context as _;

use crate::components;
use crate::context::Context;

pub fn install_overlay(ctx: &Context, root: &Path) -> anyhow::Result<()> {
    for name in &ctx.components {
        let component = components::by_name(name).with_context(|| format!("no component `{name}`"))?;
        tracing::debug!(component = name, "installing");
        (component.install)(ctx, root).with_context(|| format!("component `{name}`"))?;
    }
    for file in &ctx.instance_files {
        let _ = std::fs::remove_file(root.join(file));
    }
    Ok(())
}
