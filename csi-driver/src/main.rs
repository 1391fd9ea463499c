fn main() -> anyhow::Result<()> {
    anyhow::bail!("shoal-csi: not wired yet")
}
