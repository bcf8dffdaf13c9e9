//! The conformance kit (`tunnel-conformance`) against our own hub: every rule of
//! PROTOCOL.md a client can observe, both codecs, sessions on.

use std::time::Duration;

use tower::{BoxError, service_fn};
use tunnel_router::{Hub, Inbound, Router};

#[path = "integration/support.rs"]
#[allow(dead_code)]
mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_hub_passes_the_conformance_kit() {
    // A hub that handles every type and answers requests, as `tunnel hub` does.
    let router = Router::new().fallback(service_fn(|msg: Inbound| async move {
        Ok::<_, BoxError>(msg.encode(&serde_json::json!({"ok": true}))?)
    }));
    let handshake_timeout = Duration::from_secs(1);
    let config = tunnel_transport::ServerConfig::new(
        tunnel_transport::SharedToken::new(TOKEN).allow_workspaces(["conformance"]),
    )
    .handshake_timeout(handshake_timeout);
    let hub = Hub::bind("127.0.0.1:0", config, router)
        .await
        .expect("bind");
    let kit = tunnel_conformance::Config::new(hub.url().expect("url"))
        .token(TOKEN)
        .identity("conformance", "kit")
        .forbidden_identity("not-admitted", "kit")
        .handshake_timeout(handshake_timeout)
        .expect_resume(Some(true));
    let report = tunnel_conformance::run(&kit).await;
    println!("{report}");
    eprintln!(
        "conformance kit: {} cases in {:.1} s",
        report.cases.len(),
        report.elapsed.as_secs_f64()
    );
    let failed: Vec<String> = report.failures().map(ToString::to_string).collect();
    assert!(failed.is_empty(), "rules broken:\n{}", failed.join("\n"));
    assert_eq!(
        report.skipped(),
        0,
        "every rule applies to our hub:\n{report}"
    );
    hub.shutdown().await;
}
