//! A conformance kit for tunnel hubs.
//!
//! [`run`] connects to a hub as a client would and checks it against every rule of
//! PROTOCOL.md that a client can observe: the HTTP upgrade (authentication, identity
//! headers, codec choice), the handshake and its refusals, keepalive, requests and
//! replies, limits, message ids, close codes and the `close` message before every close
//! frame, sessions (acknowledgements, gaps, resume, replay, takeover) and poison
//! messages. It speaks raw WebSocket frames (tokio-tungstenite, and hand-written HTTP
//! where a case needs headers no WebSocket client would send) with envelope codecs of
//! its own: it depends on no crate of this workspace, so it checks the wire rather than
//! our decoder.
//!
//! Each case runs on fresh connections, one case after the other, and yields one
//! [`CaseResult`]: PASS, FAIL or SKIP, with what it saw. Every wait is bounded; nothing
//! the hub sends makes the kit panic.
//!
//! ```no_run
//! use std::time::Duration;
//! use tunnel_conformance::{Codec, Config};
//!
//! # async fn check() {
//! let config = Config::new("ws://127.0.0.1:7070/")
//!     .token("s3cret")
//!     .identity("root:org", "cluster-1")
//!     .forbidden_identity("root:other", "cluster-1")
//!     .codecs([Codec::Json, Codec::MsgPack])
//!     .handshake_timeout(Duration::from_secs(10));
//! let report = tunnel_conformance::run(&config).await;
//! println!("{report}");
//! assert_eq!(report.failed(), 0);
//! # }
//! ```
//!
//! The rule ids are listed by [`rules`]; [`Config::only`] runs a subset.

mod cases;
mod conn;
mod wire;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// A codec of the protocol (PROTOCOL.md section 3), chosen per connection by the
/// WebSocket subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Codec {
    /// `tunnel.v1.json`: JSON objects in text frames.
    Json,
    /// `tunnel.v1.msgpack`: MessagePack maps in binary frames.
    MsgPack,
}

impl Codec {
    /// Every codec the protocol defines.
    pub const ALL: [Codec; 2] = [Codec::Json, Codec::MsgPack];

    /// The WebSocket subprotocol that selects the codec.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Codec::Json => "tunnel.v1.json",
            Codec::MsgPack => "tunnel.v1.msgpack",
        }
    }

    /// The short name used in reports: `json` or `msgpack`.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::MsgPack => "msgpack",
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name is not `json` or `msgpack` (nor a subprotocol name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCodec(pub String);

impl fmt::Display for UnknownCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown codec `{}` (json or msgpack)", self.0)
    }
}

impl std::error::Error for UnknownCodec {}

impl FromStr for Codec {
    type Err = UnknownCodec;

    /// Parses `json` or `msgpack` (or the subprotocol names).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Codec::ALL
            .into_iter()
            .find(|c| s.eq_ignore_ascii_case(c.name()) || s == c.subprotocol())
            .ok_or_else(|| UnknownCodec(s.to_owned()))
    }
}

/// What to check and how to reach the hub.
///
/// Build it with [`Config::new`] and the chainable setters; the fields are public to
/// read.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The hub's URL, `ws://host:port/path`.
    pub url: String,
    /// The bearer token presented in `Authorization`.
    pub token: String,
    /// The workspace the token may claim (`X-Workspace`).
    pub workspace: String,
    /// The sync target the token may claim (`X-SyncTarget`).
    pub sync_target: String,
    /// An identity (workspace, sync target) the token may *not* claim, for the `403`
    /// case; without one that case is skipped.
    pub forbidden: Option<(String, String)>,
    /// The codecs to test. Default: both.
    pub codecs: Vec<Codec>,
    /// The hub's handshake timeout; the `4000` case waits that long plus
    /// [`Config::step_timeout`]. Default 10 s.
    pub handshake_timeout: Duration,
    /// Whether the hub must grant `resume`: `None` (default) detects it from the first
    /// `handshake_ack` and skips the session cases when it is not granted; `Some(true)`
    /// fails them instead; `Some(false)` skips them.
    pub expect_resume: Option<bool>,
    /// The longest the kit waits for any single answer it expects. Default 2 s.
    pub step_timeout: Duration,
    /// How long the kit listens to make sure something does *not* arrive (a second
    /// reply, a replay that must not happen). Default 300 ms.
    pub quiet_period: Duration,
    /// Run only the rules whose id starts with one of these (empty: all).
    pub only: Vec<String>,
}

impl Config {
    /// A configuration for the hub at `url` (`ws://host:port/`), with an empty token,
    /// the identity `root:conformance` / `conformance-1` and both codecs.
    pub fn new(url: impl Into<String>) -> Self {
        Config {
            url: url.into(),
            token: String::new(),
            workspace: "root:conformance".into(),
            sync_target: "conformance-1".into(),
            forbidden: None,
            codecs: Codec::ALL.to_vec(),
            handshake_timeout: Duration::from_secs(10),
            expect_resume: None,
            step_timeout: Duration::from_secs(2),
            quiet_period: Duration::from_millis(300),
            only: Vec::new(),
        }
    }

    /// Sets [`Config::token`].
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = token.into();
        self
    }

    /// Sets [`Config::workspace`] and [`Config::sync_target`].
    pub fn identity(
        mut self,
        workspace: impl Into<String>,
        sync_target: impl Into<String>,
    ) -> Self {
        self.workspace = workspace.into();
        self.sync_target = sync_target.into();
        self
    }

    /// Sets [`Config::forbidden`]: an identity the token may not claim.
    pub fn forbidden_identity(
        mut self,
        workspace: impl Into<String>,
        sync_target: impl Into<String>,
    ) -> Self {
        self.forbidden = Some((workspace.into(), sync_target.into()));
        self
    }

    /// Sets [`Config::codecs`] (duplicates are dropped).
    pub fn codecs(mut self, codecs: impl IntoIterator<Item = Codec>) -> Self {
        self.codecs.clear();
        for codec in codecs {
            if !self.codecs.contains(&codec) {
                self.codecs.push(codec);
            }
        }
        self
    }

    /// Sets [`Config::handshake_timeout`].
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets [`Config::expect_resume`].
    pub fn expect_resume(mut self, expect: Option<bool>) -> Self {
        self.expect_resume = expect;
        self
    }

    /// Sets [`Config::step_timeout`].
    pub fn step_timeout(mut self, timeout: Duration) -> Self {
        self.step_timeout = timeout;
        self
    }

    /// Sets [`Config::quiet_period`].
    pub fn quiet_period(mut self, period: Duration) -> Self {
        self.quiet_period = period;
        self
    }

    /// Sets [`Config::only`]: rule id prefixes to run, for example `["session."]`.
    pub fn only<I, S>(mut self, prefixes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.only = prefixes.into_iter().map(Into::into).collect();
        self
    }

    fn selects(&self, rule: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| rule.starts_with(p.as_str()))
    }
}

/// The verdict of one case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The hub followed the rule.
    Pass,
    /// The hub broke the rule (or could not be tested where it should have been).
    Fail,
    /// Not checked: the hub does not offer what the case needs, or the configuration
    /// lacks something (for example a forbidden identity).
    Skip,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
        })
    }
}

/// The result of one case: one rule, checked over one codec (or over none, for the
/// HTTP upgrade).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CaseResult {
    /// The rule's short id, for example `handshake.ack-corr` (see [`rules`]).
    pub rule: &'static str,
    /// The codec the case ran over; `None` for cases about the HTTP upgrade.
    pub codec: Option<Codec>,
    /// The verdict.
    pub outcome: Outcome,
    /// What the kit observed: one line of at most about 200 characters, control
    /// characters escaped.
    pub saw: String,
    /// How long the case took (zero for cases skipped without running).
    pub elapsed: Duration,
}

impl fmt::Display for CaseResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}  {}  {}  {}",
            self.outcome,
            self.codec.map_or("-", Codec::name),
            self.rule,
            self.saw
        )
    }
}

/// Everything one [`run`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// One result per case, in the order they ran.
    pub cases: Vec<CaseResult>,
    /// How long the run took.
    pub elapsed: Duration,
}

impl Report {
    fn count(&self, outcome: Outcome) -> usize {
        self.cases.iter().filter(|c| c.outcome == outcome).count()
    }

    /// How many cases passed.
    pub fn passed(&self) -> usize {
        self.count(Outcome::Pass)
    }

    /// How many cases failed.
    pub fn failed(&self) -> usize {
        self.count(Outcome::Fail)
    }

    /// How many cases were skipped.
    pub fn skipped(&self) -> usize {
        self.count(Outcome::Skip)
    }

    /// The failed cases.
    pub fn failures(&self) -> impl Iterator<Item = &CaseResult> {
        self.cases.iter().filter(|c| c.outcome == Outcome::Fail)
    }

    /// The result of `rule` over `codec`, if it ran.
    pub fn get(&self, rule: &str, codec: Option<Codec>) -> Option<&CaseResult> {
        self.cases
            .iter()
            .find(|c| c.rule == rule && c.codec == codec)
    }
}

impl fmt::Display for Report {
    /// One line per case (`PASS  json  handshake.ack-corr  <what it saw>`), then
    /// `N passed, M failed, K skipped` alone on the last line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for case in &self.cases {
            writeln!(f, "{case}")?;
        }
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed(),
            self.failed(),
            self.skipped()
        )
    }
}

/// Every rule id the kit checks, in the order it runs them. Ids are `area.rule`, for
/// example `upgrade.no-auth` or `session.gap`; some run once, most once per codec.
pub fn rules() -> Vec<&'static str> {
    cases::rule_ids()
}

/// Checks the hub described by `config` against every rule, one case after the other,
/// and reports each case's verdict. Never panics and never waits unboundedly: a hub that
/// does not answer makes cases fail after [`Config::step_timeout`].
pub async fn run(config: &Config) -> Report {
    run_with(config, |_| {}).await
}

/// [`run`], calling `progress` with each result as soon as its case has finished (to
/// print them as they come).
pub async fn run_with(config: &Config, mut progress: impl FnMut(&CaseResult) + Send) -> Report {
    let started = Instant::now();
    let cases = cases::run_all(config, &mut progress).await;
    Report {
        cases,
        elapsed: started.elapsed(),
    }
}

/// Bounds `s` to about 200 characters on one line, escaping control characters.
pub(crate) fn bounded(s: &str) -> String {
    const MAX: usize = 200;
    let mut out = String::new();
    let mut chars = 0;
    for c in s.chars() {
        let piece: String = if c.is_control() {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        chars += piece.chars().count();
        if chars > MAX {
            out.push('…');
            return out;
        }
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
// The test hub's upgrade callback returns tungstenite's HTTP response as its error.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn saw_is_bounded_and_escaped() {
        assert_eq!(bounded("a\nb\u{0}"), "a\\nb\\u{0}");
        let long = bounded(&"x".repeat(500));
        assert_eq!(long.chars().count(), 201);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn the_report_prints_one_line_per_case_and_a_summary() {
        let report = Report {
            cases: vec![
                CaseResult {
                    rule: "handshake.ack-corr",
                    codec: Some(Codec::Json),
                    outcome: Outcome::Pass,
                    saw: "corr=0".into(),
                    elapsed: Duration::ZERO,
                },
                CaseResult {
                    rule: "upgrade.no-auth",
                    codec: None,
                    outcome: Outcome::Fail,
                    saw: "HTTP 200".into(),
                    elapsed: Duration::ZERO,
                },
            ],
            elapsed: Duration::ZERO,
        };
        assert_eq!(
            report.to_string(),
            "PASS  json  handshake.ack-corr  corr=0\nFAIL  -  upgrade.no-auth  HTTP 200\n1 passed, 1 failed, 0 skipped"
        );
        assert_eq!(report.failed(), 1);
        assert!(report.get("upgrade.no-auth", None).is_some());
    }

    #[test]
    fn codecs_parse_by_name() {
        assert_eq!("json".parse::<Codec>(), Ok(Codec::Json));
        assert_eq!("tunnel.v1.msgpack".parse::<Codec>(), Ok(Codec::MsgPack));
        assert!("cbor".parse::<Codec>().is_err());
    }

    #[test]
    fn rule_ids_are_unique_and_filtered_by_prefix() {
        let ids = rules();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
        let config = Config::new("ws://127.0.0.1:1/").only(["session."]);
        assert!(config.selects("session.gap"));
        assert!(!config.selects("upgrade.no-auth"));
    }
}

#[cfg(test)]
mod hostile {
    //! The kit against hubs that do not work: it must end, bounded, without panicking.

    use std::time::{Duration, Instant};

    use futures_util::{SinkExt, StreamExt};
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::http::HeaderValue;

    use super::*;
    use crate::wire::{Out, Value};

    fn quick(url: String) -> Config {
        Config::new(url)
            .token("t")
            .step_timeout(Duration::from_millis(150))
            .quiet_period(Duration::from_millis(20))
            .handshake_timeout(Duration::from_millis(200))
    }

    #[tokio::test]
    async fn an_unreachable_hub_fails_fast() {
        // A port nobody listens on: bind one, then let it go.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let started = Instant::now();
        let report = run(&quick(format!("ws://{addr}/"))).await;
        assert!(started.elapsed() < Duration::from_secs(20));
        assert!(report.failed() > 0);
        assert_eq!(report.passed(), 0, "{report}");
        assert!(
            report
                .to_string()
                .lines()
                .last()
                .is_some_and(|l| l.ends_with("skipped"))
        );
    }

    #[tokio::test]
    async fn a_bad_url_is_one_failure() {
        let report = run(&Config::new("http://127.0.0.1:1/")).await;
        assert_eq!(report.cases.len(), 1);
        assert_eq!(report.failed(), 1);
    }

    /// Frames no envelope decoder should choke on.
    fn garbage(codec: Codec, i: usize) -> Message {
        match (codec, i % 6) {
            (Codec::Json, 0) => Message::text("{\"id\":1,\"type\":\"pong\",\"ts\":1,\"ts\":2}"),
            (Codec::Json, 1) => Message::text("[".repeat(10_000)),
            (Codec::Json, 2) => Message::text("{\"id\":\"x\",\"type\":7,\"headers\":[1]}"),
            (Codec::Json, 3) => Message::binary(vec![0xff; 10]),
            (Codec::Json, 4) => Message::text("{\"id\":18446744073709551616}"),
            (Codec::MsgPack, 0) => Message::binary(vec![0xdf, 0xff, 0xff, 0xff, 0xff]),
            (Codec::MsgPack, 1) => Message::binary(vec![0x91; 10_000]),
            (Codec::MsgPack, 2) => Message::binary(vec![0xc6, 0xff, 0xff, 0xff, 0xff]),
            (Codec::MsgPack, 3) => Message::text("not binary"),
            (Codec::MsgPack, 4) => Message::binary(vec![0x81, 0xa2, b'i', b'd', 0xd3]),
            (_, _) => Message::Close(None),
        }
    }

    /// A "hub" that upgrades, acks every handshake, then answers everything with
    /// garbage and odd closes.
    // The upgrade callback's error type is tungstenite's HTTP response.
    #[allow(clippy::result_large_err)]
    async fn hostile_hub(listener: TcpListener) {
        let mut n = 0usize;
        while let Ok((tcp, _)) = listener.accept().await {
            n += 1;
            tokio::spawn(async move {
                let mut codec = Codec::Json;
                let callback = |req: &Request, mut resp: Response| {
                    let offered = req
                        .headers()
                        .get("sec-websocket-protocol")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    if offered.contains("msgpack") && !offered.starts_with("tunnel.v1.json") {
                        codec = Codec::MsgPack;
                    }
                    resp.headers_mut().insert(
                        "sec-websocket-protocol",
                        HeaderValue::from_static(codec.subprotocol()),
                    );
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                    return;
                };
                let mut i = n;
                while let Some(Ok(msg)) = ws.next().await {
                    if !matches!(msg, Message::Text(_) | Message::Binary(_)) {
                        continue;
                    }
                    let ack = Out::new(0, "handshake_ack")
                        .with("corr", Value::UInt(0))
                        .payload(Value::map([
                            ("version", Value::UInt(1)),
                            ("session_id", Value::str("s")),
                            ("capabilities", Value::strings(&["resume", "deflate"])),
                        ]));
                    let bytes = ack.encode(codec);
                    let frame = match codec {
                        Codec::Json => Message::text(String::from_utf8_lossy(&bytes).into_owned()),
                        Codec::MsgPack => Message::binary(bytes),
                    };
                    if ws.send(frame).await.is_err() {
                        return;
                    }
                    for _ in 0..3 {
                        i += 1;
                        if ws.send(garbage(codec, i)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    }

    #[tokio::test]
    async fn a_hostile_hub_makes_cases_fail_not_panic() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(hostile_hub(listener));
        let config = quick(format!("ws://{addr}/")).only([
            "upgrade.codec",
            "handshake.",
            "keepalive.",
            "request.",
            "ids.",
            "envelope.",
            "session.",
            "poison.",
            "close.",
            "connection.",
        ]);
        let started = Instant::now();
        let report = run(&config).await;
        assert!(started.elapsed() < Duration::from_secs(60), "{report}");
        assert!(report.failed() > 10, "{report}");
        for case in &report.cases {
            assert!(case.saw.chars().count() <= 201, "{case}");
            assert!(!case.saw.contains('\n'), "{case}");
        }
    }
}
