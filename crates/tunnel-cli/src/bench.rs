//! `tunnel bench`: figures measured on loopback.

use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {}

pub(crate) async fn run(_args: BenchArgs) -> Result<(), String> {
    Err("bench is not built yet".into())
}
