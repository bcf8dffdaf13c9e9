//! `tunnel status`: a hub's connected agents as a table, from its admin server.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tunnel_router::AgentStatus;

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The hub's admin server (its `--admin-listen` address), for example
    /// `http://127.0.0.1:9090`.
    #[arg(
        long,
        value_name = "URL",
        required_unless_present = "nats",
        conflicts_with = "nats"
    )]
    hub: Option<String>,
    /// Every agent of a cluster instead, from its NATS server's presence bucket
    /// (`nats://host:port`).
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// Refresh every this many seconds until interrupted (rates are then measured
    /// between refreshes; without it, since each agent connected).
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<u64>,
}

/// Largest admin response body read: a list of 16,384 agents is about 7 MiB.
pub(crate) const MAX_BODY: usize = 32 * 1024 * 1024;

/// GETs `url` (plain HTTP) and returns the body, failing on a non-2xx status or a body
/// over [`MAX_BODY`].
pub(crate) async fn http_get(url: &str) -> Result<Bytes, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    if uri.scheme_str().is_some_and(|s| s != "http") {
        return Err(format!("only http:// admin URLs are supported, got {url}"));
    }
    let host = uri.host().ok_or_else(|| format!("no host in {url}"))?;
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri
        .authority()
        .map_or_else(|| host.to_owned(), ToString::to_string);
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect((host, port)))
        .await
        .map_err(|_| format!("{url}: connect timed out"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), async {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await?
            .to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
    })
    .await
    .map_err(|_| format!("{url}: no answer in time"))?
    .map_err(
        |e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
            Some(_) => format!("{url}: the response is larger than {MAX_BODY} bytes"),
            None => format!("{url}: {e}"),
        },
    )?;
    let (status, body) = response;
    if !status.is_success() {
        return Err(format!(
            "{url}: {status}: {}",
            tunnel_proto::text::Untrusted(String::from_utf8_lossy(&body).trim())
        ));
    }
    Ok(body)
}

async fn fetch(base: &str) -> Result<Vec<AgentStatus>, String> {
    let url = format!("{}/agents", base.trim_end_matches('/'));
    let body = http_get(&url).await?;
    serde_json::from_slice(&body).map_err(|e| format!("{url}: not an agent list: {e}"))
}

pub(crate) async fn run(args: StatusArgs) -> Result<(), String> {
    let hub = match (&args.hub, &args.nats) {
        (Some(hub), _) => hub.clone(),
        (None, Some(nats)) => return cluster(nats).await,
        (None, None) => return Err("give --hub or --nats".into()),
    };
    let Some(every) = args.watch else {
        print!("{}", render(&fetch(&hub).await?, None));
        return Ok(());
    };
    let every = Duration::from_secs(every.max(1));
    let mut previous: Option<(Instant, Vec<AgentStatus>)> = None;
    loop {
        let statuses = fetch(&hub).await?;
        let now = Instant::now();
        let rates = previous
            .as_ref()
            .map(|(at, before)| Rates::between(before, &statuses, now - *at));
        // Clear the screen and go home, then draw.
        print!("\x1b[2J\x1b[H{}", render(&statuses, rates.as_ref()));
        previous = Some((now, statuses));
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Messages per second each way per connection, between two samples.
pub(crate) struct Rates(HashMap<u64, (f64, f64)>);

impl Rates {
    pub(crate) fn between(
        before: &[AgentStatus],
        after: &[AgentStatus],
        elapsed: Duration,
    ) -> Rates {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let old: HashMap<u64, &AgentStatus> = before.iter().map(|s| (s.connection_id, s)).collect();
        Rates(
            after
                .iter()
                .filter_map(|s| {
                    let b = old.get(&s.connection_id)?;
                    Some((
                        s.connection_id,
                        (
                            s.messages_in.saturating_sub(b.messages_in) as f64 / secs,
                            s.messages_out.saturating_sub(b.messages_out) as f64 / secs,
                        ),
                    ))
                })
                .collect(),
        )
    }
}

fn human_duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{secs:.1}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn human_bytes(n: usize) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

/// `s` without control characters (a hub's answer must not drive the terminal), cut
/// after `max` characters.
fn printable(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The agents table: one line per agent, sorted by identity, with rates either
/// between samples or, without them, averaged since each connected.
pub(crate) fn render(statuses: &[AgentStatus], rates: Option<&Rates>) -> String {
    let mut out = format!(
        "{:<36} {:<7} {:>9} {:>10} {:>10} {:>9} {:>16}\n",
        "AGENT", "CODEC", "UP", "IN/s", "OUT/s", "RTT", "REPLAY"
    );
    for s in statuses {
        let (rate_in, rate_out) = match rates {
            Some(r) => r.0.get(&s.connection_id).copied().unwrap_or((0.0, 0.0)),
            None => {
                let secs = s.connected_for_s.max(1e-3);
                (s.messages_in as f64 / secs, s.messages_out as f64 / secs)
            }
        };
        let rtt = s.rtt_us.map_or_else(
            || "-".to_owned(),
            |us| format!("{:.1} ms", us as f64 / 1000.0),
        );
        let replay = format!("{} / {}", s.replay_messages, human_bytes(s.replay_bytes));
        out.push_str(&format!(
            "{:<36} {:<7} {:>9} {:>10.1} {:>10.1} {:>9} {:>16}\n",
            printable(&format!("{}/{}", s.workspace, s.sync_target), 253 * 2 + 1),
            printable(&s.codec, 16),
            human_duration(s.connected_for_s),
            rate_in,
            rate_out,
            rtt,
            replay
        ));
    }
    out.push_str(&format!("{} agents connected\n", statuses.len()));
    out
}

/// Every agent of the cluster on `nats`, with the hub that holds it.
async fn cluster(nats: &str) -> Result<(), String> {
    let backend = tunnel_cluster::Backend::connect(nats)
        .await
        .map_err(|e| e.to_string())?;
    let presence = backend.presence().await.map_err(|e| e.to_string())?;
    print!(
        "{}",
        render_cluster(&presence, tunnel_transport::unix_millis())
    );
    Ok(())
}

/// The cluster's agents as a table, connected-for measured at `now_ms`.
fn render_cluster(
    presence: &[(tunnel_transport::AgentId, tunnel_cluster::Presence)],
    now_ms: u64,
) -> String {
    let mut out = format!("{:<36} {:<28} {:>10}  SESSION\n", "AGENT", "HUB", "UP");
    for (agent, p) in presence {
        // Entries in the bucket are anyone's writes: no control characters, bounded.
        let up = Duration::from_millis(now_ms.saturating_sub(p.since_ms));
        out.push_str(&format!(
            "{:<36} {:<28} {:>10}  {}\n",
            printable(&agent.to_string(), 253 * 2 + 1),
            printable(&p.hub, 128),
            human_duration(up.as_secs_f64()),
            printable(&p.session, 128),
        ));
    }
    let hubs: std::collections::BTreeSet<&str> =
        presence.iter().map(|(_, p)| p.hub.as_str()).collect();
    out.push_str(&format!(
        "{} agents connected to {} hubs\n",
        presence.len(),
        hubs.len()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_table_names_each_agents_hub_and_counts_hubs() {
        let p = |hub: &str, since_ms| tunnel_cluster::Presence {
            hub: hub.into(),
            session: "s-1".into(),
            since_ms,
            run: "1".into(),
        };
        let presence = vec![
            (
                tunnel_transport::AgentId::new("root:org", "a"),
                p("hub-a", 1_000),
            ),
            (
                tunnel_transport::AgentId::new("root:org", "b"),
                p("hub-b", 4_000),
            ),
            (
                tunnel_transport::AgentId::new("root:org", "c"),
                p("hub-b", 5_000),
            ),
        ];
        let table = render_cluster(&presence, 5_500);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("AGENT"), "{table}");
        assert!(
            lines[1].contains("root:org/a")
                && lines[1].contains("hub-a")
                && lines[1].contains("4.5s"),
            "{table}"
        );
        assert_eq!(lines[4], "3 agents connected to 2 hubs");
    }
    use std::time::Duration;
    use tunnel_router::admin::Admin;
    use tunnel_router::{Agent, AgentConfig, Hub, Router};
    use tunnel_transport::{AgentId, AllowAll, ClientConfig, ServerConfig, WsConnector};

    #[tokio::test]
    async fn a_body_over_the_bound_is_refused_not_read_whole() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let mut request = [0u8; 1024];
            let _ = tcp.read(&mut request).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                MAX_BODY + 1
            );
            let _ = tcp.write_all(head.as_bytes()).await;
            let chunk = vec![b'['; 1 << 20];
            for _ in 0..=(MAX_BODY >> 20) {
                if tcp.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let err = http_get(&format!("http://{addr}/agents"))
            .await
            .expect_err("too large");
        assert!(err.contains("larger than"), "{err}");
        server.abort();
    }

    #[test]
    fn hub_supplied_cells_cannot_drive_the_terminal() {
        assert_eq!(printable("ws/\u{1b}[2Jx", 64), "ws/?[2Jx");
        assert_eq!(printable(&"y".repeat(600), 507).len(), 507);
    }

    #[tokio::test]
    async fn status_reads_a_hubs_agents_over_http_and_renders_a_table() {
        let hub = Hub::bind("127.0.0.1:0", ServerConfig::new(AllowAll), Router::new())
            .await
            .expect("hub");
        let admin = Admin::new()
            .hub(hub.clone())
            .bind("127.0.0.1:0")
            .await
            .expect("admin");
        let url = hub.url().expect("url");
        let mut agents = Vec::new();
        for name in ["zeta", "alpha"] {
            let connector = WsConnector::new(ClientConfig::new(AgentId::new("root:org", name)));
            let agent =
                Agent::start(connector, AgentConfig::new(&url), Router::new()).expect("agent");
            agent
                .wait_connected(Duration::from_secs(5))
                .await
                .expect("connected");
            agents.push(agent);
        }
        let base = format!("http://{}", admin.local_addr());
        let mut statuses = Vec::new();
        for _ in 0..100 {
            statuses = fetch(&base).await.expect("fetch");
            if statuses.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let table = render(&statuses, None);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("AGENT"), "{table}");
        assert!(
            lines[1].starts_with("root:org/alpha"),
            "sorted by identity: {table}"
        );
        assert!(lines[2].starts_with("root:org/zeta"), "{table}");
        assert_eq!(lines[3], "2 agents connected");
        // Rates between two samples of the same connection.
        let mut later = statuses.clone();
        later[0].messages_in += 50;
        let rates = Rates::between(&statuses, &later, Duration::from_secs(1));
        assert_eq!(rates.0[&later[0].connection_id], (50.0, 0.0));
        // A wrong path is a clear error, not a panic.
        let err = http_get(&format!("{base}/nope")).await.unwrap_err();
        assert!(err.contains("404"), "{err}");
        for agent in agents {
            agent.shutdown().await;
        }
        admin.shutdown().await;
        hub.shutdown().await;
    }
}
