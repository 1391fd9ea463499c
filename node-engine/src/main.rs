//! `shoal-engine` binary: parses the command line and starts a role.
fn main() -> anyhow::Result<()> {
    anyhow::bail!("shoal-engine: roles are not wired yet")
}
