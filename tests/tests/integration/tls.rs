//! `wss://` with certificates made at test time: server TLS, trust, and mutual TLS
//! checked against the claimed sync target.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::json;
use tunnel_proto::{Format, MessageType};
use tunnel_router::{Agent, AgentConfig, Hub, Router};
use tunnel_transport::{AgentId, ConnectError, Connector, WsConnector, tls};

use crate::support::*;

/// A directory of PEM files, removed when dropped.
struct Pki {
    dir: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn write(dir: &Path, name: &str, pem: &str) {
    std::fs::write(dir.join(name), pem).expect("write pem");
}

/// A CA, a hub certificate for `localhost`, and agent certificates for `cluster-1` from
/// the same CA and for `cluster-1` from a stranger CA.
fn pki(tag: &str) -> Pki {
    let dir = std::env::temp_dir().join(format!("tunnel-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = |name: &str| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("ca");
        write(&dir, &format!("{name}.pem"), &cert.pem());
        Issuer::new(params, key)
    };
    let leaf = |issuer: &Issuer<'_, KeyPair>, name: &str, sans: &[&str]| {
        let key = KeyPair::generate().expect("key");
        let params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .expect("params");
        let cert = params.signed_by(&key, issuer).expect("leaf");
        write(&dir, &format!("{name}.pem"), &cert.pem());
        write(&dir, &format!("{name}.key"), &key.serialize_pem());
    };
    let trusted = ca("ca");
    leaf(&trusted, "hub", &["localhost", "127.0.0.1"]);
    leaf(&trusted, "cluster-1", &["cluster-1"]);
    let stranger = ca("stranger-ca");
    leaf(&stranger, "impostor", &["cluster-1"]);
    Pki { dir }
}

async fn tls_hub(pki: &Pki, mutual: bool) -> Hub {
    let client_ca = pki.path("ca.pem");
    let tls = tls::server_config(
        pki.path("hub.pem"),
        pki.path("hub.key"),
        mutual.then_some(client_ca.as_path()),
    )
    .expect("server tls");
    hub(server_config().tls(Some(tls)), Router::new()).await
}

fn wss_url(hub: &Hub) -> String {
    format!(
        "wss://localhost:{}/",
        hub.local_addr().expect("addr").port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_talk_to_a_hub_over_wss_when_they_trust_its_ca() {
    let pki = pki("plain");
    let (router, mut at_hub) = collecting_router();
    let tls = tls::server_config(pki.path("hub.pem"), pki.path("hub.key"), None).expect("tls");
    let hub = hub(server_config().tls(Some(tls)), router).await;
    let url = wss_url(&hub);
    let id = AgentId::new("root:org", "secure");
    let trust = tls::client_config(Some(&pki.path("ca.pem")), None).expect("client tls");
    let agent = Agent::start(
        WsConnector::new(client_config(&id, Format::MsgPack).tls(Some(trust))),
        AgentConfig::new(&url).backoff(fast_backoff()),
        Router::new(),
    )
    .expect("agent");
    agent
        .wait_connected(SOON)
        .await
        .expect("connected over TLS");
    agent
        .send(MessageType::Event, &json!({"over": "tls"}))
        .await
        .expect("send");
    let got = recv_soon(&mut at_hub).await;
    assert_eq!(
        got.envelope
            .decode_payload::<serde_json::Value>()
            .expect("payload"),
        json!({"over": "tls"})
    );

    // Without trusting the CA (only the stranger's), the TLS handshake fails.
    let untrusting =
        tls::client_config(Some(&pki.path("stranger-ca.pem")), None).expect("client tls");
    let err = WsConnector::new(
        client_config(&AgentId::new("root:org", "doubtful"), Format::MsgPack).tls(Some(untrusting)),
    )
    .connect(&url)
    .await
    .expect_err("untrusted certificate");
    assert!(
        matches!(&err, ConnectError::Unreachable { reason, .. } if reason.contains("TLS")),
        "{err}"
    );
    // And plain ws:// to a TLS listener does not get in either.
    let plain = WsConnector::new(client_config(
        &AgentId::new("root:org", "plain"),
        Format::MsgPack,
    ))
    .connect(&hub.url().expect("url"))
    .await;
    assert!(plain.is_err());
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_checks_the_certificate_against_the_claimed_sync_target() {
    let pki = pki("mutual");
    let hub = tls_hub(&pki, true).await;
    let url = wss_url(&hub);
    let ca = pki.path("ca.pem");
    let with_cert = |name: &str| {
        tls::client_config(
            Some(&ca),
            Some((
                &pki.path(&format!("{name}.pem")),
                &pki.path(&format!("{name}.key")),
            )),
        )
        .expect("client tls")
    };

    // The certificate names cluster-1, and the agent claims cluster-1: in.
    let conn = WsConnector::new(
        client_config(&AgentId::new("root:org", "cluster-1"), Format::MsgPack)
            .tls(Some(with_cert("cluster-1"))),
    )
    .connect(&url)
    .await
    .expect("matching certificate");
    drop(conn);

    // The same certificate claiming another sync target: 403.
    let err = WsConnector::new(
        client_config(&AgentId::new("root:org", "cluster-2"), Format::MsgPack)
            .tls(Some(with_cert("cluster-1"))),
    )
    .connect(&url)
    .await
    .expect_err("wrong identity");
    assert!(
        matches!(err, ConnectError::Refused { status: 403, .. }),
        "{err}"
    );

    // No certificate, or one from a stranger CA: the TLS handshake fails.
    for client in [
        tls::client_config(Some(&ca), None).expect("client tls"),
        with_cert("impostor"),
    ] {
        let err = WsConnector::new(
            client_config(&AgentId::new("root:org", "cluster-1"), Format::MsgPack)
                .tls(Some(client)),
        )
        .connect(&url)
        .await
        .expect_err("refused at the TLS layer");
        assert!(
            matches!(
                err,
                ConnectError::Unreachable { .. } | ConnectError::Handshake(_)
            ),
            "{err}"
        );
    }
    hub.shutdown().await;
}
