//! A `tunnel hub` process at 256 open files: idle sockets on either listener never
//! take the other listener, or the agents, down.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnel_transport::{AgentId, ClientConfig, Connector, WsConnector};

const TOKEN: &str = "descriptor-test-token";
const SOON: Duration = Duration::from_secs(10);

/// The hub process, killed when dropped.
struct HubProcess {
    child: Child,
    dir: std::path::PathBuf,
    agents: String,
    admin: String,
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `tunnel hub` under `ulimit -n 256` on ephemeral loopback ports and waits
/// until both listeners are up (their addresses come from its log).
fn start_hub() -> HubProcess {
    let dir = std::env::temp_dir().join(format!("tunnel-fd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).expect("token");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 256 && exec "$@""#)
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_tunnel"))
        .args(["--log", "info", "--log-format", "json", "hub"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--token-file")
        .arg(&token)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the hub");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut agents, mut admin) = (None, None);
    while agents.is_none() || admin.is_none() {
        let line = rx.recv_timeout(SOON).expect("the hub logs its listeners");
        let value: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let url = value["fields"]["url"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match value["fields"]["message"].as_str() {
            Some("hub listening") => agents = Some(url),
            Some("admin endpoints") => admin = Some(url),
            _ => {}
        }
    }
    HubProcess {
        child,
        dir,
        agents: agents.expect("agents url"),
        admin: admin.expect("admin url"),
    }
}

fn addr(url: &str) -> String {
    url.split("://")
        .nth(1)
        .expect("scheme")
        .trim_end_matches('/')
        .to_owned()
}

/// Opens `n` TCP connections to `addr` that never send a byte (those refused at once
/// are not kept).
async fn idle(addr: &str, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        if let Ok(Ok(tcp)) =
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
        {
            held.push(tcp);
        }
    }
    held
}

async fn healthz(admin: &str) -> Result<String, String> {
    let io = async {
        let mut tcp = TcpStream::connect(addr(admin)).await?;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(SOON, io).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in time".into()),
    }
}

async fn agent_connects(url: &str, name: &str) -> Result<(), String> {
    let config = ClientConfig::new(AgentId::new("ws", name)).token(Some(TOKEN.into()));
    match tokio::time::timeout(SOON, WsConnector::new(config).connect(url)).await {
        Ok(Ok(conn)) => {
            conn.close(tunnel_proto::CloseCode::NORMAL, "done").await;
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("not connected in time".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_on_one_listener_never_take_the_other_down() {
    let hub = start_hub();
    // More idle sockets on the agent port than the process has descriptors.
    let on_agents = idle(&addr(&hub.agents), 300).await;
    let answer = healthz(&hub.admin).await.expect("the admin server answers");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    agent_connects(&hub.agents, "first")
        .await
        .expect("an agent gets in past the idle sockets");
    drop(on_agents);

    // The same on the admin port.
    let on_admin = idle(&addr(&hub.admin), 300).await;
    agent_connects(&hub.agents, "second")
        .await
        .expect("agents connect while the admin port is flooded");
    drop(on_admin);
    let answer = healthz(&hub.admin)
        .await
        .expect("the admin server recovers");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
