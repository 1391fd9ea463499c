fn main() -> anyhow::Result<()> {
    anyhow::bail!("shoal-operator: not wired yet")
}
