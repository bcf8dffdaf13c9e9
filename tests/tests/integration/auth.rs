//! Authentication, codec selection and the protocol handshake.

use std::time::Duration;

use tokio_tungstenite::tungstenite::Error as WsError;
use tunnel_proto::{CloseCode, Format, MessageType, VersionRange};
use tunnel_router::Router;
use tunnel_transport::{AgentId, ConnectError, Connector, SharedToken, WsConnector};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_missing_token_is_401_and_no_session() {
    let hub = hub(server_config(), Router::new()).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "intruder");
    let wrong = WsConnector::new(client_config(&id, Format::Json).token(Some("wrong".into())));
    assert!(matches!(
        wrong.connect(&url).await,
        Err(ConnectError::Refused { status: 401, .. })
    ));
    let missing = WsConnector::new(client_config(&id, Format::Json).token(None));
    let err = missing.connect(&url).await.expect_err("refused");
    assert_eq!(err.kind(), "unauthorized");
    assert!(hub.agents().is_empty());
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_identity_is_403() {
    let config = tunnel_transport::ServerConfig::new(
        SharedToken::new(TOKEN).allow_workspaces(["root:allowed"]),
    );
    let hub = hub(config, Router::new()).await;
    let url = hub.url().expect("url");
    let ok = WsConnector::new(client_config(
        &AgentId::new("root:allowed", "a"),
        Format::MsgPack,
    ));
    assert!(ok.connect(&url).await.is_ok());
    let denied = WsConnector::new(client_config(
        &AgentId::new("root:other", "a"),
        Format::MsgPack,
    ));
    match denied.connect(&url).await {
        Err(ConnectError::Refused { status, body, .. }) => {
            assert_eq!(status, 403);
            assert!(body.contains("root:other"), "{body}");
        }
        other => panic!("expected 403, got {other:?}"),
    }
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_codec_and_missing_identity_are_400() {
    let hub = hub(server_config(), Router::new()).await;
    let url = hub.url().expect("url");
    let auth = format!("Bearer {TOKEN}");
    let unknown_codec = raw_upgrade(
        &url,
        &[
            ("authorization", &auth),
            ("x-workspace", "ws"),
            ("x-synctarget", "a"),
            ("sec-websocket-protocol", "tunnel.v9.cbor"),
        ],
    )
    .await;
    assert_eq!(status_of(unknown_codec), 400);
    let no_identity = raw_upgrade(
        &url,
        &[
            ("authorization", &auth),
            ("sec-websocket-protocol", "tunnel.v1.json"),
        ],
    )
    .await;
    assert_eq!(status_of(no_identity), 400);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_mismatch_closes_with_4002() {
    let config = server_config().versions(VersionRange::new(1, 1).expect("range"));
    let hub = hub(config, Router::new()).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "future");
    let future = WsConnector::new(
        client_config(&id, Format::Json).versions(VersionRange::new(2, 3).expect("range")),
    );
    match future.connect(&url).await {
        Err(ConnectError::Closed { code, reason }) => {
            assert_eq!(code, CloseCode::VERSION_MISMATCH);
            assert!(reason.contains("no common protocol version"), "{reason}");
        }
        other => panic!("expected a 4002 close, got {other:?}"),
    }
    assert!(hub.agents().is_empty());
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_after_upgrade_is_closed_with_4000() {
    let config = server_config().handshake_timeout(Duration::from_millis(300));
    let hub = hub(config, Router::new()).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "silent");
    let mut ws = raw_client(&url, &id, Format::Json).await;
    let started = std::time::Instant::now();
    let (code, seen) = read_until_close(&mut ws, Format::Json).await;
    assert_eq!(code, Some(CloseCode::HANDSHAKE_TIMEOUT));
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed too early"
    );
    assert_eq!(seen.len(), 1, "a close message precedes the close frame");
    assert_eq!(seen[0].kind, MessageType::Close);
    assert!(hub.agents().is_empty());
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_for_another_identity_is_closed_with_4003() {
    let hub = hub(server_config(), Router::new()).await;
    let url = hub.url().expect("url");
    let mut ws = raw_client(&url, &AgentId::new("ws", "me"), Format::MsgPack).await;
    send_raw(
        &mut ws,
        Format::MsgPack,
        &handshake(&AgentId::new("ws", "someone-else"), Format::MsgPack),
    )
    .await;
    let (code, _) = read_until_close(&mut ws, Format::MsgPack).await;
    assert_eq!(code, Some(CloseCode::BAD_HANDSHAKE));
    assert!(hub.agents().is_empty());
    hub.shutdown().await;
}

/// The status and `Retry-After` of a refused upgrade.
fn refusal_of(result: Result<RawWs, WsError>) -> (u16, Option<String>) {
    match result {
        Err(WsError::Http(resp)) => (
            resp.status().as_u16(),
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, got an upgrade"),
    }
}

async fn upgrade_as(url: &str, workspace: &str, sync_target: &str) -> Result<RawWs, WsError> {
    raw_upgrade(
        url,
        &[
            ("authorization", &format!("Bearer {TOKEN}")),
            ("x-workspace", workspace),
            ("x-synctarget", sync_target),
            ("sec-websocket-protocol", Format::MsgPack.subprotocol()),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_global_limit_get_503_with_retry_after() {
    let config = server_config()
        .max_connections(Some(2))
        .retry_after(Duration::from_secs(7));
    let hub = hub(config, Router::new()).await;
    let url = hub.url().expect("url");
    let first = upgrade_as(&url, "ws", "a").await.expect("first fits");
    let second = upgrade_as(&url, "ws", "b").await.expect("second fits");
    assert_eq!(
        refusal_of(upgrade_as(&url, "ws", "c").await),
        (503, Some("7".into()))
    );
    // A place given back is a place again.
    drop(first);
    let mut third = None;
    for _ in 0..100 {
        if let Ok(ws) = upgrade_as(&url, "ws", "c").await {
            third = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(third.is_some(), "admitted once the first connection left");
    drop((second, third));
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_workspace_limit_get_503_and_other_workspaces_still_fit() {
    let config = server_config().max_connections_per_workspace(Some(1));
    let hub = hub(config, Router::new()).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("root:busy", "a");
    let agent = agent(&url, client_config(&id, Format::MsgPack), Router::new());
    agent.wait_connected(SOON).await.expect("connected");
    let (status, retry_after) = refusal_of(upgrade_as(&url, "root:busy", "b").await);
    assert_eq!(status, 503);
    assert_eq!(retry_after.as_deref(), Some("5"), "the default Retry-After");
    let other = upgrade_as(&url, "root:quiet", "b")
        .await
        .expect("another workspace fits");
    drop(other);
    agent.shutdown().await;
    // Its place is free again.
    let mut again = None;
    for _ in 0..100 {
        if let Ok(ws) = upgrade_as(&url, "root:busy", "b").await {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some());
    drop(again);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_grants_identities_and_rotated_tokens_work_after_a_reload() {
    let dir = std::env::temp_dir().join(format!("tunnel-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("tokens");
    std::fs::write(&path, "first-token root:team cluster-1\n").expect("write");
    let tokens = std::sync::Arc::new(tunnel_transport::TokenFile::load(&path).expect("load"));
    let hub = hub(
        tunnel_transport::ServerConfig::new(tokens.clone()),
        Router::new(),
    )
    .await;
    let url = hub.url().expect("url");

    // The token may not claim another sync target: 403.
    let other = WsConnector::new(
        client_config(&AgentId::new("root:team", "cluster-2"), Format::MsgPack)
            .token(Some("first-token".into())),
    );
    assert!(matches!(
        other.connect(&url).await,
        Err(ConnectError::Refused { status: 403, .. })
    ));

    // The agent asks its token source on every connect.
    let current = std::sync::Arc::new(std::sync::RwLock::new("first-token".to_string()));
    let source = current.clone();
    let id = AgentId::new("root:team", "cluster-1");
    let agent = agent(
        &url,
        client_config(&id, Format::MsgPack)
            .token(None)
            .token_source(move || Some(source.read().expect("lock").clone())),
        Router::new(),
    );
    agent
        .wait_connected(SOON)
        .await
        .expect("connected with the first token");

    // Rotation: the hub reloads a file with only the new token, the agent's source
    // hands out the new one, and the next connection uses it.
    std::fs::write(&path, "second-token root:team cluster-1\n").expect("write");
    assert_eq!(tokens.reload().expect("reload"), 1);
    *current.write().expect("lock") = "second-token".into();
    registered(&hub, &id).await.abort();
    eventually("reconnected with the rotated token", || {
        agent.reconnects() >= 1 && agent.is_connected()
    })
    .await;
    let stale =
        WsConnector::new(client_config(&id, Format::MsgPack).token(Some("first-token".into())));
    assert!(matches!(
        stale.connect(&url).await,
        Err(ConnectError::Refused { status: 401, .. })
    ));
    agent.shutdown().await;
    hub.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A hub with `config` (a limit of one connection) and an agent holding that place.
async fn hub_with_its_one_place_taken(
    config: tunnel_transport::ServerConfig,
) -> (tunnel_router::Hub, String, tunnel_router::Agent) {
    let hub = hub(config, Router::new()).await;
    let url = hub.url().expect("url");
    let first = agent(
        &url,
        client_config(&AgentId::new("ws", "first"), Format::MsgPack),
        Router::new(),
    );
    first.wait_connected(SOON).await.expect("connected");
    (hub, url, first)
}

/// How long `agent` waits in its first backoff, from now.
async fn first_backoff(agent: &tunnel_router::Agent) -> Duration {
    let mut state = agent.state();
    let backoff = tokio::time::timeout(
        SOON,
        state.wait_for(|s| matches!(s, tunnel_router::ConnectionState::Backoff { .. })),
    )
    .await
    .expect("refused in time")
    .expect("state")
    .clone();
    let tunnel_router::ConnectionState::Backoff { until } = backoff else {
        unreachable!()
    };
    until - tokio::time::Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refused_for_capacity_waits_the_retry_after() {
    let config = server_config()
        .max_connections(Some(1))
        .retry_after(Duration::from_secs(3));
    let (hub, url, first) = hub_with_its_one_place_taken(config).await;
    let second = agent(
        &url,
        client_config(&AgentId::new("ws", "second"), Format::MsgPack),
        Router::new(),
    );
    let wait = first_backoff(&second).await;
    // The fast test backoff is at most 200 ms: the 3 s is the hub's Retry-After.
    assert!(wait > Duration::from_millis(2500), "waits {wait:?}");
    second.shutdown().await;
    first.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_is_capped_by_the_agents_configuration() {
    let config = server_config()
        .max_connections(Some(1))
        .retry_after(Duration::from_secs(1_000_000));
    let (hub, url, first) = hub_with_its_one_place_taken(config).await;
    let second = tunnel_router::Agent::start(
        WsConnector::new(client_config(
            &AgentId::new("ws", "second"),
            Format::MsgPack,
        )),
        tunnel_router::AgentConfig::new(&url)
            .backoff(fast_backoff())
            .max_hub_wait(Duration::from_millis(400)),
        Router::new(),
    )
    .expect("valid config");
    let wait = first_backoff(&second).await;
    assert!(wait <= Duration::from_millis(400), "waits {wait:?}");
    second.shutdown().await;
    first.shutdown().await;
    hub.shutdown().await;
}

/// Upgrade headers of an agent with the test token, plus `extra`.
async fn upgrade_with(
    url: &str,
    workspace: &str,
    sync_target: &str,
    extra: &[(&str, &str)],
) -> Result<RawWs, WsError> {
    let mut headers = vec![
        ("x-workspace", workspace),
        ("x-synctarget", sync_target),
        ("sec-websocket-protocol", Format::MsgPack.subprotocol()),
    ];
    headers.extend_from_slice(extra);
    raw_upgrade(url, &headers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workspace_allow_list_applies_whatever_the_authenticator() {
    let dir = std::env::temp_dir().join(format!("tunnel-allow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("tokens");
    // The token may claim any workspace; the hub admits only one.
    std::fs::write(&path, format!("{TOKEN} * *\n")).expect("write");
    let tokens = tunnel_transport::TokenFile::load(&path).expect("tokens");
    let config = tunnel_transport::ServerConfig::new(tokens).allow_workspaces(["root:allowed"]);
    let hub = hub(config, Router::new()).await;
    let url = hub.url().expect("url");
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    assert!(upgrade_with(&url, "root:allowed", "a", &auth).await.is_ok());
    assert_eq!(
        status_of(upgrade_with(&url, "root:other", "a", &auth).await),
        403
    );
    hub.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive_and_duplicate_headers_are_refused() {
    let hub = hub(server_config(), Router::new()).await;
    let url = hub.url().expect("url");
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let value = format!("{scheme} {TOKEN}");
        assert!(
            upgrade_with(&url, "ws", "a", &[("authorization", &value)])
                .await
                .is_ok(),
            "{scheme} refused"
        );
    }
    let bearer = format!("Bearer {TOKEN}");
    let twice = [
        ("authorization", bearer.as_str()),
        ("authorization", "Bearer other"),
    ];
    assert_eq!(status_of(upgrade_with(&url, "ws", "a", &twice).await), 400);
    let auth = ("authorization", bearer.as_str());
    for duplicate in [("x-workspace", "ws"), ("x-synctarget", "a")] {
        assert_eq!(
            status_of(upgrade_with(&url, "ws", "a", &[auth, duplicate]).await),
            400,
            "{duplicate:?} twice"
        );
    }
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_that_could_forge_log_fields_or_blow_up_labels_are_400() {
    let hub = hub(server_config(), Router::new()).await;
    let url = hub.url().expect("url");
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let long = "x".repeat(tunnel_transport::MAX_IDENTITY_LEN + 1);
    for (workspace, target) in [
        ("ws", "a b"),
        ("ws level=error", "a"),
        ("ws", long.as_str()),
        ("ws", "tab\there"),
    ] {
        assert_eq!(
            status_of(upgrade_with(&url, workspace, target, &auth).await),
            400,
            "{workspace:?}/{target:?}"
        );
    }
    let longest = "x".repeat(tunnel_transport::MAX_IDENTITY_LEN);
    assert!(upgrade_with(&url, "ws", &longest, &auth).await.is_ok());
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_unauthenticated_sockets_take_no_agent_places() {
    let config = server_config().max_connections(Some(2)).max_handshakes(4);
    let hub = hub(config, Router::new()).await;
    let url = hub.url().expect("url");
    let addr = url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_owned();
    // More silent sockets than both limits: none of them sends a byte.
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect"),
        );
    }
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let first = tokio::time::timeout(SOON, upgrade_with(&url, "ws", "a", &auth))
        .await
        .expect("not kept waiting by silent sockets")
        .expect("admitted");
    let second = tokio::time::timeout(SOON, upgrade_with(&url, "ws", "b", &auth))
        .await
        .expect("not kept waiting by silent sockets")
        .expect("admitted");
    // The places are the agents': a third authenticated one is over the limit.
    assert_eq!(status_of(upgrade_with(&url, "ws", "c", &auth).await), 503);
    drop((first, second, idle));
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_do_not_spend_the_accept_rate() {
    let hub = hub(server_config().accept_rate(Some(1.0)), Router::new()).await;
    let url = hub.url().expect("url");
    let addr = url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_owned();
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect"),
        );
    }
    // At one per second, 50 counted sockets would make an agent wait 50 s.
    let id = AgentId::new("ws", "real");
    let connector = WsConnector::new(client_config(&id, Format::MsgPack));
    tokio::time::timeout(SOON, connector.connect(&url))
        .await
        .expect("the agent was not kept waiting behind unauthenticated sockets")
        .expect("connected");
    drop(idle);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cannot_take_effect_are_refused_at_bind() {
    for config in [
        server_config().accept_rate(Some(0.0)),
        server_config().accept_rate(Some(f64::NAN)),
        server_config().max_connections(Some(0)),
        server_config().allow_workspaces(Vec::<String>::new()),
    ] {
        let err = tunnel_transport::WsListener::bind("127.0.0.1:0", config)
            .await
            .expect_err("refused");
        assert!(
            matches!(err, tunnel_transport::AcceptError::Config(_)),
            "{err}"
        );
    }
}
