//! Rendering tera templates (`nginx/`, `image/files/*.tera`) from typed structs: an unknown variable is an error,
//! never an empty string. The variables themselves belong to the component that installs the file.

use anyhow::Context as _;
use serde::Serialize;

/// Renders `template` (named `name`, its path in the repository, in errors) with `vars`.
pub fn render(name: &str, template: &str, vars: &impl Serialize) -> anyhow::Result<String> {
    let mut tera = tera::Tera::default();
    tera.autoescape_on(vec![]);
    tera.add_raw_template(name, template)
        .with_context(|| format!("template {name} does not parse"))?;
    let context = tera::Context::from_serialize(vars).context("template variables")?;
    tera.render(name, &context).map_err(|err| {
        // Tera keeps the useful part (the unknown variable) in the source chain.
        let mut message = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            message = format!("{message}: {s}");
            source = s.source();
        }
        anyhow::anyhow!("cannot render {name}: {message}")
    })
}
