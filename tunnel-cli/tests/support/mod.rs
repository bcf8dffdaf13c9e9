//! What the binary's end-to-end tests share: the `tunnel` command, a token directory,
//! and a `tunnel` process whose JSON log lines are read as it runs.

#![allow(dead_code, unreachable_pub)] // each test binary uses part of it

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const TOKEN: &str = "commands-test-token";
pub const SOON: Duration = Duration::from_secs(15);

/// `tunnel hub` (JSON logs at info) in the cluster on `nats`, named `name`, listening
/// on `port` of the loopback address (0: any), agents' token in `dir`.
pub fn cluster_hub(dir: &Dir, nats: &str, name: &str, port: u16, drain_timeout: &str) -> Process {
    let token = dir.token();
    let listen = format!("127.0.0.1:{port}");
    // `TUNNEL_TEST_LOG` (a tracing filter) for more, with `TUNNEL_TEST_LOGS` to keep it.
    let log = std::env::var("TUNNEL_TEST_LOG").unwrap_or_else(|_| "info".into());
    Process::spawn(
        tunnel()
            .args(["--log", log.as_str(), "--log-format", "json"])
            .args([
                "hub",
                "--listen",
                &listen,
                "--token-file",
                token.to_str().expect("utf-8"),
                "--nats",
                nats,
                "--hub-id",
                name,
                "--drain-timeout",
                drain_timeout,
            ]),
    )
}

/// A connector for agent `id` with the tests' token that leaves a hub that hangs
/// within a second, and does not wait long for one when dialing it again (a stopped
/// process's socket still takes the connection).
pub fn quick_connector(id: &tunnel_transport::AgentId) -> tunnel_transport::WsConnector {
    tunnel_transport::WsConnector::new(
        tunnel_transport::ClientConfig::new(id.clone())
            .token(Some(TOKEN.into()))
            .connect_timeout(Duration::from_secs(1))
            .connection(
                tunnel_transport::ConnectionConfig::default()
                    .ping_interval(Duration::from_millis(300))
                    .pong_timeout(Duration::from_millis(600)),
            ),
    )
}

/// The `tunnel` binary under test.
pub fn tunnel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tunnel"))
}

/// A temporary directory with a token file, removed when dropped.
pub struct Dir(PathBuf);

impl Dir {
    /// A fresh directory named after `name`, holding a token file with [`TOKEN`].
    pub fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("tunnel-cmd-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("token"), TOKEN).expect("token");
        Dir(dir)
    }

    /// The token file.
    pub fn token(&self) -> PathBuf {
        self.0.join("token")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `tunnel` process whose stderr (JSON log lines) is read on a thread; killed when
/// dropped. With `TUNNEL_TEST_LOGS=<dir>` each process's lines are also kept in
/// `<dir>/<pid>.log`, to read after a failing run.
pub struct Process {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Process {
    pub fn spawn(command: &mut Command) -> Process {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tunnel");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        let mut kept = std::env::var_os("TUNNEL_TEST_LOGS").and_then(|dir| {
            let path = std::path::Path::new(&dir).join(format!("{}.log", child.id()));
            std::fs::File::create(path).ok()
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(file) = kept.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(file, "{line}");
                }
                if tx.send(line).is_err() && kept.is_none() {
                    break;
                }
            }
        });
        Process { child, lines }
    }

    /// Waits for a JSON log line whose message is `message`; returns its fields.
    pub fn wait_for(&self, message: &str) -> serde_json::Value {
        self.wait_for_all(&[message]).remove(0)
    }

    /// Waits for a log line with each of `messages`, in any order; returns their
    /// fields in the order asked.
    pub fn wait_for_all(&self, messages: &[&str]) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + SOON;
        let mut found: Vec<Option<serde_json::Value>> = vec![None; messages.len()];
        // The last lines read, for the failure's message.
        let mut last = std::collections::VecDeque::new();
        while found.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|e| {
                let why = match e {
                    mpsc::RecvTimeoutError::Timeout => "not logged in time",
                    mpsc::RecvTimeoutError::Disconnected => "the process ended first",
                };
                let last = Vec::from(last.clone()).join("\n");
                panic!("not all of {messages:?} logged: {why}; its last lines:\n{last}")
            });
            if last.len() == 12 {
                last.pop_front();
            }
            last.push_back(line.clone());
            let value: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(i) = messages
                .iter()
                .position(|m| value["fields"]["message"] == *m)
            {
                found[i] = Some(value["fields"].clone());
            }
        }
        found.into_iter().flatten().collect()
    }

    /// Sends `signal` (`TERM`, `KILL`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits (boundedly) for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + SOON;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Process {
    /// SIGTERM, then its exit status.
    pub fn terminate(mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
