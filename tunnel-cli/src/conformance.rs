//! `tunnel conformance`: checks a hub against PROTOCOL.md with the conformance kit
//! (`tunnel-conformance`), printing one line per rule.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tunnel_conformance::{Codec, Config};

#[derive(Debug, Args)]
pub(crate) struct ConformanceArgs {
    /// The hub's URL (`ws://HOST:PORT/`).
    #[arg(long, value_name = "URL")]
    hub: String,
    /// File holding a bearer token the hub accepts for --workspace/--sync-target.
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// The workspace to claim.
    #[arg(long, default_value = "conformance")]
    workspace: String,
    /// The sync target to claim.
    #[arg(long, default_value = "kit")]
    sync_target: String,
    /// A workspace the token may NOT claim (checks the 403); skipped without it.
    #[arg(long, value_name = "WORKSPACE")]
    forbidden_workspace: Option<String>,
    /// Codecs to check (repeatable); default both.
    #[arg(long = "codec", value_name = "CODEC")]
    codecs: Vec<String>,
    /// The hub's handshake timeout, in seconds (the 4000 case waits that long).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    handshake_timeout: u64,
    /// Run only the rules whose ids start with these prefixes (repeatable), for
    /// example `session.`.
    #[arg(long = "only", value_name = "PREFIX")]
    only: Vec<String>,
    /// List the rule ids and exit.
    #[arg(long)]
    list: bool,
}

pub(crate) async fn run(args: ConformanceArgs) -> Result<(), String> {
    if args.list {
        for rule in tunnel_conformance::rules() {
            println!("{rule}");
        }
        return Ok(());
    }
    let token = crate::read_token(&args.token_file)?;
    let mut config = Config::new(args.hub.clone())
        .token(token)
        .identity(args.workspace.clone(), args.sync_target.clone())
        .handshake_timeout(Duration::from_secs(args.handshake_timeout));
    if let Some(forbidden) = &args.forbidden_workspace {
        config = config.forbidden_identity(forbidden.clone(), args.sync_target.clone());
    }
    if !args.codecs.is_empty() {
        let codecs = args
            .codecs
            .iter()
            .map(|c| c.parse::<Codec>().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        config = config.codecs(codecs);
    }
    if !args.only.is_empty() {
        config = config.only(args.only.clone());
    }
    let report = tunnel_conformance::run_with(&config, |case| println!("{case}")).await;
    println!(
        "{} passed, {} failed, {} skipped",
        report.passed(),
        report.failed(),
        report.skipped()
    );
    eprintln!("conformance: {:.1} s", report.elapsed.as_secs_f64());
    if report.failed() > 0 {
        return Err(format!(
            "{} of {} rules failed",
            report.failed(),
            report.cases.len()
        ));
    }
    Ok(())
}
