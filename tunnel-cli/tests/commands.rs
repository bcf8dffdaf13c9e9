//! The `tunnel` binary as an operator runs it: a hub and an agent as processes on
//! loopback, `tunnel status` between them, SIGTERM, exit codes, the demo, and the
//! messages bad usage gets.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod support;

use support::{Dir, Process, SOON, tunnel};

fn start_hub(dir: &Dir) -> (Process, String, String) {
    start_hub_on(dir, "127.0.0.1:0")
}

fn start_hub_on(dir: &Dir, listen: &str) -> (Process, String, String) {
    let hub = Process::spawn(
        tunnel()
            .args(["--log", "info", "--log-format", "json", "hub"])
            .args(["--listen", listen, "--admin-listen", "127.0.0.1:0"])
            .args(["--drain-timeout", "1", "--stats-interval", "3600"])
            .arg("--token-file")
            .arg(dir.token()),
    );
    let fields = hub.wait_for_all(&["hub listening", "admin endpoints"]);
    let url = fields[0]["url"].as_str().expect("hub url").to_owned();
    let admin = fields[1]["url"].as_str().expect("admin url").to_owned();
    (hub, url, admin)
}

fn start_agent(dir: &Dir, url: &str, name: &str) -> Process {
    Process::spawn(
        tunnel()
            .args(["--log", "info", "--log-format", "json", "agent"])
            .args([
                "--url",
                url,
                "--workspace",
                "root:e2e",
                "--sync-target",
                name,
            ])
            .args(["--status-interval", "1"])
            .arg("--token-file")
            .arg(dir.token()),
    )
}

fn run(command: &mut Command) -> Output {
    command.output().expect("run tunnel")
}

/// `tunnel status` until its table satisfies `done` (bounded); the last output.
fn status_until(admin: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + SOON;
    loop {
        let out = run(tunnel().args(["status", "--hub", admin]));
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && done(&table) {
            return table;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed it: {table}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The IN column's message count for `agent` in a `tunnel status` table: the agent's
/// row must exist and show traffic.
fn row<'a>(table: &'a str, agent: &str) -> Option<&'a str> {
    table.lines().find(|l| l.trim_start().starts_with(agent))
}

#[test]
fn a_hub_and_an_agent_run_as_processes_show_in_status_and_stop_cleanly_on_sigterm() {
    let dir = Dir::new("pair");
    let (mut hub, url, admin) = start_hub(&dir);
    let mut agent = start_agent(&dir, &url, "c1");
    agent.wait_for("connected");

    let table = status_until(&admin, |t| row(t, "root:e2e/c1").is_some());
    assert!(table.contains("1 agents connected"), "{table}");

    // SIGTERM on the agent: it closes its connection and exits 0; the hub sees it go.
    agent.signal("TERM");
    assert!(agent.wait_exit().success());
    let table = status_until(&admin, |t| row(t, "root:e2e/c1").is_none());
    assert!(!table.contains("root:e2e/c1"), "{table}");

    // SIGTERM on the hub: it drains and exits 0.
    hub.signal("TERM");
    hub.wait_for("draining: agents move, then the hub stops");
    assert!(hub.wait_exit().success());
}

#[test]
fn an_agent_outlives_its_hub_and_reconnects_when_one_comes_back_on_the_port() {
    let dir = Dir::new("restart");
    // Below Linux's ephemeral range (32768 and up), so that no redial can take the port
    // as its own source port while the hub is down.
    let listen = (20_000..31_000)
        .map(|p| format!("127.0.0.1:{}", p + std::process::id() % 1000))
        .find(|a| std::net::TcpListener::bind(a).is_ok())
        .expect("a free port");
    let (mut hub, url, admin) = start_hub_on(&dir, &listen);
    let mut agent = start_agent(&dir, &url, "c2");
    agent.wait_for("connected");
    status_until(&admin, |t| row(t, "root:e2e/c2").is_some());

    // A crash: the agent keeps redialling, with backoff, and does not exit.
    hub.signal("KILL");
    assert!(!hub.wait_exit().success());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        agent.child.try_wait().expect("try_wait").is_none(),
        "the agent exited"
    );

    // A new hub on the same port: the agent is back (a new session: the killed hub's
    // sessions were in its memory).
    let (_hub, _, admin) = start_hub_on(&dir, &listen);
    status_until(&admin, |t| row(t, "root:e2e/c2").is_some());
    agent.signal("TERM");
    assert!(agent.wait_exit().success());
}

#[test]
fn the_demo_reports_nothing_lost_duplicated_or_out_of_order_and_exits_zero() {
    let out = run(tunnel().args(["demo", "--seconds", "2"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "duplicated    : 0",
        "lost          : 0",
        "out of order  : 0",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
    assert!(
        text.contains("cutting"),
        "the demo cuts a connection:\n{text}"
    );
    // No ANSI colour codes in output that is not a terminal.
    assert!(!text.contains('\u{1b}'), "{text}");
}

fn fails_with(out: &Output, code: i32, says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert!(stderr.contains(says), "{says:?} missing from: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_usage_gets_a_clear_message_and_a_non_zero_exit() {
    // No token: clap's usage error (exit 2) names the missing option.
    fails_with(&run(tunnel().arg("hub")), 2, "--token-file");
    // A token file that does not exist: the command's own error (exit 1).
    let missing = Path::new("/nonexistent/tunnel-token");
    fails_with(
        &run(tunnel()
            .args(["agent", "--workspace", "root:e2e", "--sync-target", "x"])
            .arg("--token-file")
            .arg(missing)),
        1,
        "cannot read token file /nonexistent/tunnel-token",
    );
    // An empty token file.
    let dir = Dir::new("usage");
    std::fs::write(dir.token(), "  \n").expect("token");
    fails_with(
        &run(tunnel()
            .args(["hub", "--listen", "127.0.0.1:0"])
            .arg("--token-file")
            .arg(dir.token())),
        1,
        "is empty",
    );
    // A hub's admin server that is not there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    fails_with(
        &run(tunnel().args(["status", "--hub", &format!("http://127.0.0.1:{port}/")])),
        1,
        "tunnel:",
    );
    // The demo's bounds.
    fails_with(
        &run(tunnel().args(["demo", "--seconds", "1"])),
        1,
        "--seconds 2..=600",
    );
}
