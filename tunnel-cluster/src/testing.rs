//! A real `nats-server` for tests (feature `testing`): JetStream in a temporary
//! directory, an ephemeral loopback port, killed and restarted at will. Never a mock.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the server may take to start listening.
const SOON: Duration = Duration::from_secs(20);

/// A `nats-server` with JetStream, killed (and its directory removed) when dropped.
#[derive(Debug)]
pub struct Nats {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
}

/// The `nats-server` binary: `NATS_SERVER`, else the first on `PATH`, else
/// `/usr/sbin/nats-server` (where Debian puts it).
pub fn nats_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return path.into();
    }
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/bin"])
    {
        let path = PathBuf::from(dir).join("nats-server");
        if path.is_file() {
            return path;
        }
    }
    panic!("nats-server is not installed: `apt-get install -y nats-server` (or set NATS_SERVER)");
}

impl Nats {
    /// Starts a server with JetStream in a fresh temporary directory named after
    /// `name`, on a random loopback port.
    pub fn start(name: &str) -> Nats {
        let dir = std::env::temp_dir().join(format!("tunnel-nats-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // A harness for tests: what it cannot set up fails the test, with the reason.
        std::fs::create_dir_all(dir.join("ports")).expect("dir");
        let mut nats = Nats {
            child: None,
            dir,
            port: 0,
        };
        nats.spawn(None);
        nats
    }

    /// Starts the server on `port` (or a random one, read from its ports file).
    fn spawn(&mut self, port: Option<u16>) {
        let ports = self.dir.join("ports");
        for f in std::fs::read_dir(&ports).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(f.path());
        }
        let child = Command::new(nats_binary())
            .args(["-js", "-a", "127.0.0.1"])
            .arg("-sd")
            .arg(self.dir.join("js"))
            .args(["-p", &port.map_or("-1".to_string(), |p| p.to_string())])
            .arg("--ports_file_dir")
            .arg(&ports)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            // A harness for tests: no server fails the test, with the reason.
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + SOON;
        loop {
            let found = std::fs::read_dir(&ports)
                .into_iter()
                .flatten()
                .flatten()
                .find_map(|f| std::fs::read_to_string(f.path()).ok())
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .and_then(|v| v["nats"][0].as_str().map(str::to_owned))
                .and_then(|url| url.rsplit(':').next()?.parse::<u16>().ok());
            if let Some(port) = found
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                self.port = port;
                return;
            }
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port;
        self.spawn(Some(port));
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
