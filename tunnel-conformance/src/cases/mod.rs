//! The cases, their registry and the run loop.

mod handshake;
mod messages;
mod poison;
mod session;
mod upgrade;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::conn::{self, Ack, Conn, Hs, HttpReply, Observer, Target, Upgrade};
use crate::wire::{Out, Received, Value};
use crate::{CaseResult, Codec, Config, Outcome, bounded};

/// What the kit offers in its handshakes unless a case says otherwise.
pub(crate) const OFFERED: [&str; 4] = ["replies", "resume", "deflate", "trace-context"];

/// A case's verdict before it gets its rule and codec.
#[derive(Debug)]
pub(crate) struct Verdict {
    outcome: Outcome,
    saw: String,
}

pub(crate) fn pass(saw: impl Into<String>) -> Verdict {
    Verdict {
        outcome: Outcome::Pass,
        saw: saw.into(),
    }
}

pub(crate) fn fail(saw: impl Into<String>) -> Verdict {
    Verdict {
        outcome: Outcome::Fail,
        saw: saw.into(),
    }
}

pub(crate) fn skip(saw: impl Into<String>) -> Verdict {
    Verdict {
        outcome: Outcome::Skip,
        saw: saw.into(),
    }
}

/// `pass` if `ok`, else `fail`, with the same description.
pub(crate) fn verdict(ok: bool, saw: impl Into<String>) -> Verdict {
    if ok { pass(saw) } else { fail(saw) }
}

/// Unwraps a setup step of a case, failing the case with its error.
macro_rules! need {
    ($e:expr, $what:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $crate::cases::fail(format!("{}: {}", $what, e)),
        }
    };
}
pub(crate) use need;

/// State of a whole run.
pub(crate) struct Ctx {
    pub(crate) cfg: Config,
    pub(crate) target: Target,
    pub(crate) obs: Arc<Observer>,
    /// What each codec's first `handshake_ack` granted.
    granted: Mutex<HashMap<Codec, Vec<String>>>,
}

/// What a case gets: the run, its rule and its codec.
#[derive(Clone, Copy)]
pub(crate) struct Cx<'a> {
    pub(crate) ctx: &'a Ctx,
    pub(crate) rule: &'static str,
    pub(crate) codec: Codec,
}

impl Cx<'_> {
    pub(crate) fn cfg(&self) -> &Config {
        &self.ctx.cfg
    }

    pub(crate) fn step(&self) -> Duration {
        self.ctx.cfg.step_timeout
    }

    pub(crate) fn quiet(&self) -> Duration {
        self.ctx.cfg.quiet_period
    }

    /// A valid upgrade request for this codec.
    pub(crate) fn upgrade(&self) -> Upgrade {
        Upgrade {
            authorization: Some(format!("Bearer {}", self.cfg().token)),
            workspace: Some(self.cfg().workspace.clone()),
            sync_target: Some(self.cfg().sync_target.clone()),
            protocols: Some(self.codec.subprotocol().into()),
        }
    }

    /// The headers of a valid upgrade request, for hand-written HTTP.
    pub(crate) fn headers(&self) -> Vec<(&'static str, String)> {
        vec![
            ("Authorization", format!("Bearer {}", self.cfg().token)),
            ("X-Workspace", self.cfg().workspace.clone()),
            ("X-SyncTarget", self.cfg().sync_target.clone()),
            ("Sec-WebSocket-Protocol", self.codec.subprotocol().into()),
        ]
    }

    pub(crate) async fn raw(&self, headers: &[(&str, String)]) -> Result<HttpReply, String> {
        conn::raw_upgrade(&self.ctx.target, headers, self.step()).await
    }

    pub(crate) async fn open_with(&self, up: &Upgrade) -> Result<Conn, String> {
        conn::connect(
            &self.ctx.target,
            up,
            self.codec,
            self.rule,
            &self.ctx.obs,
            self.step(),
        )
        .await
    }

    /// An upgraded connection, before the handshake.
    pub(crate) async fn open(&self) -> Result<Conn, String> {
        self.open_with(&self.upgrade()).await
    }

    /// The kit's usual handshake: version 1, the capabilities of [`OFFERED`].
    pub(crate) fn hs(&self) -> Hs {
        Hs {
            workspace: self.cfg().workspace.clone(),
            sync_target: self.cfg().sync_target.clone(),
            versions: (1, 1),
            capabilities: OFFERED.iter().map(|s| s.to_string()).collect(),
            resume: None,
        }
    }

    pub(crate) async fn session_with(&self, hs: &Hs) -> Result<(Conn, Ack), String> {
        let mut conn = self.open().await?;
        let ack = conn.handshake(hs).await?;
        Ok((conn, ack))
    }

    /// A connection after a successful handshake.
    pub(crate) async fn session(&self) -> Result<(Conn, Ack), String> {
        self.session_with(&self.hs()).await
    }

    fn granted(&self, capability: &str) -> bool {
        self.ctx
            .granted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&self.codec)
            .is_some_and(|caps| caps.iter().any(|c| c == capability))
    }

    pub(crate) fn resume_granted(&self) -> bool {
        self.granted("resume")
    }

    fn record_grant(&self, ack: &Ack) {
        self.ctx
            .granted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.codec, ack.capabilities.clone());
    }
}

/// A `command` payload.
pub(crate) fn command(name: &str) -> Value {
    Value::map([
        ("name", Value::str(name)),
        (
            "args",
            Value::map([("kit", Value::str("tunnel-conformance"))]),
        ),
    ])
}

/// An `event` payload.
pub(crate) fn event() -> Value {
    Value::map([
        ("type", Value::str("Normal")),
        ("reason", Value::str("Conformance")),
        ("message", Value::str("sent by tunnel-conformance")),
    ])
}

/// Everything read while [`watch`] ran.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    pub(crate) all: Vec<Received>,
    /// Why reading stopped early (close frame, end of connection, bad frame).
    pub(crate) end: Option<String>,
}

impl Watch {
    pub(crate) fn replies_to(&self, id: u64) -> Vec<&Received> {
        self.all
            .iter()
            .filter(|e| e.kind == "reply" && e.corr == Some(id))
            .collect()
    }

    pub(crate) fn max_ack(&self) -> Option<u64> {
        self.all.iter().filter_map(|e| e.ack).max()
    }

    pub(crate) fn count(&self, kind: &str) -> usize {
        self.all.iter().filter(|e| e.kind == kind).count()
    }

    pub(crate) fn brief(&self) -> String {
        let list: Vec<String> = self.all.iter().take(8).map(Received::brief).collect();
        let mut s = if list.is_empty() {
            "nothing".into()
        } else {
            list.join(" ")
        };
        if self.all.len() > 8 {
            s.push_str(&format!(" (+{})", self.all.len() - 8));
        }
        if let Some(end) = &self.end {
            s.push_str(&format!(", then {end}"));
        }
        s
    }
}

/// Reads envelopes for at most `d`, until `done` is satisfied or the connection closes.
pub(crate) async fn watch(conn: &mut Conn, d: Duration, done: impl Fn(&Watch) -> bool) -> Watch {
    use crate::conn::Ev;
    let deadline = Instant::now() + d;
    let mut w = Watch::default();
    while !done(&w) {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.rx.recv(left).await {
            Ev::Env(env, _) => {
                if w.all.len() < conn::MAX_KEPT {
                    w.all.push(env);
                }
            }
            Ev::Ping | Ev::Pong(_) => {}
            Ev::Timeout => break,
            Ev::Close(code, reason) => {
                w.end = Some(format!(
                    "close frame {} {reason:?}",
                    code.map_or("without code".into(), |c| c.to_string())
                ));
                break;
            }
            Ev::End(e) => {
                w.end = Some(e);
                break;
            }
            Ev::Bad(e) => {
                w.end = Some(e);
                break;
            }
            Ev::WrongKind(k) => {
                w.end = Some(format!("a {k} frame"));
                break;
            }
        }
    }
    w
}

/// The most pings [`pings_past`] sends.
const MAX_EXTRA_PINGS: u64 = 2000;

/// Sends pings (in batches of up to 100, each waited for) until a pong's id is at least
/// `target`, at most [`MAX_EXTRA_PINGS`]; returns every envelope read meanwhile. Lets a
/// per-connection id counter catch up with ids seen from another source, where two
/// counters would collide.
pub(crate) async fn pings_past(conn: &mut Conn, target: u64, step: Duration) -> Vec<Received> {
    let mut all = Vec::new();
    let mut sent = 0;
    let mut pong_max = 0;
    while pong_max < target && sent < MAX_EXTRA_PINGS {
        let batch = (target - pong_max)
            .clamp(1, 100)
            .min(MAX_EXTRA_PINGS - sent);
        let mut ids = Vec::new();
        for _ in 0..batch {
            let id = conn.id();
            if conn.send(&Out::new(id, "ping")).await.is_err() {
                return all;
            }
            ids.push(id);
        }
        sent += batch;
        let w = watch(conn, step, |w| {
            ids.iter().all(|id| {
                w.all
                    .iter()
                    .any(|e| e.kind == "pong" && e.corr == Some(*id))
            })
        })
        .await;
        let complete = ids.iter().all(|id| {
            w.all
                .iter()
                .any(|e| e.kind == "pong" && e.corr == Some(*id))
        });
        pong_max = w
            .all
            .iter()
            .filter(|e| e.kind == "pong")
            .filter_map(|e| e.id)
            .max()
            .unwrap_or(0)
            .max(pong_max);
        all.extend(w.all);
        if !complete {
            break;
        }
    }
    all
}

/// Envelopes that share an id (or have none, or id 0 after the handshake), described.
pub(crate) fn id_problems<'a>(envs: impl IntoIterator<Item = &'a Received>) -> Vec<String> {
    let mut by_id: HashMap<u64, Vec<String>> = HashMap::new();
    let mut problems = Vec::new();
    for env in envs {
        match env.id {
            Some(0) => problems.push(format!("id 0 on {}", env.brief())),
            Some(id) => by_id.entry(id).or_default().push(env.brief()),
            None => problems.push(format!("no id on {}", env.brief())),
        }
    }
    for (id, envs) in &by_id {
        if envs.len() > 1 {
            problems.push(format!("id {id} on {}", envs.join(" and ")));
        }
    }
    problems.sort();
    problems
}

/// Checks that the hub closed with `code`: the case's own verdict (the `close` envelope
/// before it is the rule `close.envelope-first`, checked across all cases).
pub(crate) fn closed_with(closed: &conn::Closed, code: u16) -> Verdict {
    verdict(closed.code() == Some(code), closed.describe())
}

/// Like [`closed_with`], and the `close` envelope before the frame must carry the code
/// too (for the refusals whose rule names both).
pub(crate) fn closed_with_envelope(closed: &conn::Closed, code: u16) -> Verdict {
    verdict(
        closed.code() == Some(code) && closed.envelope_code() == Some(code),
        closed.describe(),
    )
}

/// Sends `out` on a connection after the handshake and expects the hub to close with
/// `code`.
pub(crate) async fn expect_close_after(cx: Cx<'_>, out: Out, code: u16) -> Verdict {
    let (mut conn, _) = need!(cx.session().await, "handshake");
    need!(conn.send(&out).await, "send");
    let closed = conn.expect_close().await;
    closed_with(&closed, code)
}

// ---------------------------------------------------------------------------------------
// Registry

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
type CaseFn = for<'a> fn(Cx<'a>) -> BoxFuture<'a, Verdict>;

/// Which codecs a case runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Once per run, about the HTTP upgrade (reported without a codec).
    Once,
    /// Once per configured codec.
    Each,
    /// Only over this codec.
    Only(Codec),
    /// Once per codec, all codecs at the same time (the handshake timeout).
    Parallel,
}

/// What a case needs the hub to have granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Nothing,
    Resume,
    Deflate,
}

struct Case {
    rule: &'static str,
    scope: Scope,
    needs: Needs,
    run: CaseFn,
}

macro_rules! case {
    ($rule:literal, $scope:expr, $needs:ident, $f:path) => {
        Case {
            rule: $rule,
            scope: $scope,
            needs: Needs::$needs,
            run: |cx| Box::pin($f(cx)),
        }
    };
}

const HANDSHAKE_OK: &str = "handshake.ok";

/// Rules checked across all cases, reported after them.
const AGGREGATES: [&str; 3] = [
    "close.envelope-first",
    "envelope.well-formed",
    "msgpack.smallest-int",
];

use Scope::{Each, Once, Only, Parallel};

#[rustfmt::skip]
const CASES: &[Case] = &[
    // HTTP upgrade (section 1).
    case!("upgrade.no-auth", Once, Nothing, upgrade::no_auth),
    case!("upgrade.wrong-token", Once, Nothing, upgrade::wrong_token),
    case!("upgrade.scheme-case", Once, Nothing, upgrade::scheme_case),
    case!("upgrade.dup-authorization", Once, Nothing, upgrade::dup_authorization),
    case!("upgrade.dup-workspace", Once, Nothing, upgrade::dup_workspace),
    case!("upgrade.dup-sync-target", Once, Nothing, upgrade::dup_sync_target),
    case!("upgrade.no-identity", Once, Nothing, upgrade::no_identity),
    case!("upgrade.identity-charset", Once, Nothing, upgrade::identity_charset),
    case!("upgrade.identity-length", Once, Nothing, upgrade::identity_length),
    case!("upgrade.forbidden", Once, Nothing, upgrade::forbidden),
    case!("upgrade.no-codec", Once, Nothing, upgrade::no_codec),
    case!("upgrade.unknown-codec", Once, Nothing, upgrade::unknown_codec),
    case!("upgrade.codec-choice", Once, Nothing, upgrade::codec_choice),
    // Handshake (section 5).
    case!("handshake.ok", Each, Nothing, handshake::ok),
    case!("handshake.ack-id", Each, Nothing, handshake::ack_id),
    case!("handshake.ack-corr", Each, Nothing, handshake::ack_corr),
    case!("handshake.ack-version", Each, Nothing, handshake::ack_version),
    case!("handshake.ack-session-id", Each, Nothing, handshake::ack_session_id),
    case!("handshake.ack-capabilities", Each, Nothing, handshake::ack_capabilities),
    case!("handshake.null-fields", Each, Nothing, handshake::null_fields),
    case!("handshake.unknown-fields", Each, Nothing, handshake::unknown_fields),
    case!("handshake.fragmented", Each, Nothing, handshake::fragmented),
    case!("handshake.first-not-handshake", Each, Nothing, handshake::first_not_handshake),
    case!("handshake.version-mismatch", Each, Nothing, handshake::version_mismatch),
    case!("handshake.identity-mismatch", Each, Nothing, handshake::identity_mismatch),
    case!("handshake.bad-payload", Each, Nothing, handshake::bad_payload),
    case!("handshake.wrong-frame-kind", Each, Nothing, handshake::wrong_frame_kind),
    case!("handshake.undecodable", Each, Nothing, handshake::undecodable),
    case!("handshake.size-under-limit", Each, Nothing, handshake::size_under_limit),
    case!("handshake.size-limit", Each, Nothing, handshake::size_limit),
    // Keepalive, requests, ids (sections 1, 2, 4).
    case!("keepalive.ping", Each, Nothing, messages::ping),
    case!("keepalive.ping-frame", Each, Nothing, messages::ping_frame),
    case!("request.reply", Each, Nothing, messages::reply),
    case!("request.unknown-type", Each, Nothing, messages::unknown_type),
    case!("request.one-way-silent", Each, Nothing, messages::one_way_silent),
    case!("ids.unique", Each, Nothing, messages::ids_unique),
    // Envelope form and limits (sections 2, 3, 7).
    case!("envelope.unknown-field", Each, Nothing, messages::unknown_field),
    case!("envelope.missing-field", Each, Nothing, messages::missing_field),
    case!("envelope.wrong-type", Each, Nothing, messages::wrong_type),
    case!("envelope.duplicate-field", Each, Nothing, messages::duplicate_field),
    case!("envelope.undecodable", Each, Nothing, messages::undecodable),
    case!("frame.wrong-kind", Each, Nothing, messages::wrong_kind),
    case!("frame.invalid-utf8", Only(Codec::Json), Nothing, messages::invalid_utf8),
    case!("limit.headers-64", Each, Nothing, messages::headers_64),
    case!("limit.headers-65", Each, Nothing, messages::headers_65),
    case!("limit.message-size", Each, Nothing, messages::message_size),
    case!("limit.message-size-fragmented", Each, Nothing, messages::message_size_fragmented),
    case!("limit.payload-depth", Each, Nothing, messages::payload_depth),
    case!("msgpack.trailing-bytes", Only(Codec::MsgPack), Nothing, messages::trailing_bytes),
    case!("msgpack.depth", Only(Codec::MsgPack), Nothing, messages::depth),
    case!("msgpack.depth-ok", Only(Codec::MsgPack), Nothing, messages::depth_ok),
    // Closing (sections 1, 8).
    case!("close.normal", Each, Nothing, messages::close_normal),
    case!("connection.takeover", Each, Nothing, messages::takeover),
    // Sessions (section 6).
    case!("session.not-offered", Each, Nothing, session::not_offered),
    case!("session.ack", Each, Resume, session::ack),
    case!("session.ack-duplicate", Each, Resume, session::ack_duplicate),
    case!("session.duplicate-dropped", Each, Resume, session::duplicate_dropped),
    case!("session.reply-seq", Each, Resume, session::reply_seq),
    case!("session.gap", Each, Resume, session::gap),
    case!("session.ack-ahead", Each, Resume, session::ack_ahead),
    case!("session.resume", Each, Resume, session::resume),
    case!("session.replay", Each, Resume, session::replay),
    case!("session.replay-skips-received", Each, Resume, session::replay_skips_received),
    case!("session.resume-unknown", Each, Resume, session::resume_unknown),
    case!("session.resume-ahead", Each, Resume, session::resume_ahead),
    case!("session.concurrent-resume", Each, Resume, session::concurrent_resume),
    // Messages a receiver cannot accept, and compression (sections 2, 4.2).
    case!("poison.bad-deflate", Each, Deflate, poison::bad_deflate),
    case!("poison.deflate-bomb", Each, Deflate, poison::deflate_bomb),
    case!("poison.deflate-not-negotiated", Each, Nothing, poison::not_negotiated),
    case!("poison.unknown-encoding", Each, Nothing, poison::unknown_encoding),
    case!("poison.not-a-value", Each, Deflate, poison::not_a_value),
    case!("poison.reply-not-answered", Each, Nothing, poison::reply_not_answered),
    case!("deflate.valid", Each, Deflate, poison::valid),
    // Slow: waits for the hub's handshake timeout (all codecs at once).
    case!("handshake.timeout", Parallel, Nothing, handshake::timeout),
];

/// Every rule id, in run order.
pub(crate) fn rule_ids() -> Vec<&'static str> {
    CASES.iter().map(|c| c.rule).chain(AGGREGATES).collect()
}

fn result(rule: &'static str, codec: Option<Codec>, v: Verdict) -> CaseResult {
    timed(rule, codec, v, Duration::ZERO)
}

fn timed(rule: &'static str, codec: Option<Codec>, v: Verdict, elapsed: Duration) -> CaseResult {
    CaseResult {
        rule,
        codec,
        outcome: v.outcome,
        saw: bounded(&v.saw),
        elapsed,
    }
}

/// Runs every selected case and the rules checked across them.
pub(crate) async fn run_all(
    cfg: &Config,
    progress: &mut (dyn FnMut(&CaseResult) + Send),
) -> Vec<CaseResult> {
    let mut out = Vec::new();
    let mut emit = |r: CaseResult, out: &mut Vec<CaseResult>| {
        progress(&r);
        out.push(r);
    };
    let target = match Target::parse(&cfg.url) {
        Ok(t) => t,
        Err(e) => {
            emit(result("setup.url", None, fail(e)), &mut out);
            return out;
        }
    };
    if cfg.codecs.is_empty() {
        emit(
            result("setup.codecs", None, fail("no codec to test")),
            &mut out,
        );
        return out;
    }
    let ctx = Ctx {
        cfg: cfg.clone(),
        target,
        obs: Arc::new(Observer::default()),
        granted: Mutex::new(HashMap::new()),
    };
    // Codecs whose plain handshake failed: their other cases are skipped.
    let mut broken: HashMap<Codec, String> = HashMap::new();
    if !cfg.selects(HANDSHAKE_OK) {
        // The capabilities are detected all the same.
        for &codec in &cfg.codecs {
            let cx = Cx {
                ctx: &ctx,
                rule: HANDSHAKE_OK,
                codec,
            };
            let v = handshake::ok(cx).await;
            if v.outcome == Outcome::Fail {
                broken.insert(codec, v.saw);
            }
        }
    }
    for case in CASES.iter().filter(|c| cfg.selects(c.rule)) {
        let codecs: Vec<Codec> = match case.scope {
            Once => vec![cfg.codecs[0]],
            Each | Parallel => cfg.codecs.clone(),
            Only(codec) => cfg.codecs.iter().copied().filter(|c| *c == codec).collect(),
        };
        let mut runnable = Vec::new();
        for codec in codecs {
            let cx = Cx {
                ctx: &ctx,
                rule: case.rule,
                codec,
            };
            let reported = (case.scope != Once).then_some(codec);
            if case.scope != Once
                && case.rule != HANDSHAKE_OK
                && let Some(why) = broken.get(&codec)
            {
                let v = skip(format!("no working handshake over {codec}: {why}"));
                emit(result(case.rule, reported, v), &mut out);
                continue;
            }
            if let Some(v) = gate(cx, case.needs) {
                emit(result(case.rule, reported, v), &mut out);
                continue;
            }
            runnable.push((cx, reported));
        }
        if case.scope == Parallel {
            let started = Instant::now();
            let runs = runnable.iter().map(|(cx, _)| (case.run)(*cx));
            let verdicts = futures_util::future::join_all(runs).await;
            let elapsed = started.elapsed();
            for ((_, reported), v) in runnable.iter().zip(verdicts) {
                emit(timed(case.rule, *reported, v, elapsed), &mut out);
            }
            continue;
        }
        for (cx, reported) in runnable {
            let started = Instant::now();
            let v = (case.run)(cx).await;
            if case.rule == HANDSHAKE_OK && v.outcome == Outcome::Fail {
                broken.insert(cx.codec, v.saw.clone());
            }
            emit(timed(case.rule, reported, v, started.elapsed()), &mut out);
        }
    }
    let obs = ctx.obs.take();
    for rule in AGGREGATES.into_iter().filter(|r| cfg.selects(r)) {
        for &codec in &cfg.codecs {
            if rule.starts_with("msgpack.") && codec != Codec::MsgPack {
                continue;
            }
            let v = aggregate(rule, codec, &obs);
            emit(result(rule, Some(codec), v), &mut out);
        }
    }
    out
}

/// Whether a case can run given what the hub granted; `Some` verdict if not.
fn gate(cx: Cx<'_>, needs: Needs) -> Option<Verdict> {
    match needs {
        Needs::Nothing => None,
        Needs::Resume => match (cx.resume_granted(), cx.cfg().expect_resume) {
            (_, Some(false)) => Some(skip("session cases disabled by the configuration")),
            (true, _) => None,
            (false, Some(true)) => Some(fail("the hub did not grant `resume`")),
            (false, None) => Some(skip("the hub did not grant `resume`")),
        },
        Needs::Deflate => (!cx.granted("deflate")).then(|| skip("the hub did not grant `deflate`")),
    }
}

fn aggregate(rule: &str, codec: Codec, obs: &conn::Observations) -> Verdict {
    match rule {
        "close.envelope-first" => {
            let closes: Vec<_> = obs.closes.iter().filter(|c| c.codec == codec).collect();
            if closes.is_empty() {
                return skip("the hub closed no connection on its own");
            }
            let bad: Vec<String> = closes
                .iter()
                .filter(|c| c.frame.is_none() || c.envelope != c.frame || !c.reason)
                .map(|c| {
                    format!(
                        "{} (frame {}, last {}{})",
                        c.case,
                        c.frame.map_or("without code".into(), |f| f.to_string()),
                        c.last,
                        if c.envelope.is_some() && !c.reason {
                            ", no reason string"
                        } else {
                            ""
                        }
                    )
                })
                .collect();
            if bad.is_empty() {
                pass(format!(
                    "{} close frames, each right after a close envelope with its code and a reason",
                    closes.len()
                ))
            } else {
                fail(format!(
                    "{} of {} close frames without a close envelope (that code, a reason) first: {}",
                    bad.len(),
                    closes.len(),
                    bad.join("; ")
                ))
            }
        }
        "envelope.well-formed" => {
            let n = obs.envelopes.get(&codec).copied().unwrap_or(0);
            let bad: Vec<String> = obs
                .problems
                .iter()
                .filter(|(c, _, _)| *c == codec)
                .map(|(_, case, what)| format!("{case}: {what}"))
                .collect();
            if n == 0 && bad.is_empty() {
                return skip("no envelope received");
            }
            if bad.is_empty() {
                pass(format!("{n} envelopes, all well-formed"))
            } else {
                fail(format!(
                    "{} problems in {n} envelopes: {}",
                    bad.len(),
                    bad.join("; ")
                ))
            }
        }
        "msgpack.smallest-int" => {
            let n = obs.envelopes.get(&codec).copied().unwrap_or(0);
            if n == 0 {
                return skip("no MessagePack envelope received");
            }
            if obs.non_minimal.is_empty() {
                pass(format!(
                    "{n} envelopes, every integer in its smallest encoding"
                ))
            } else {
                let list: Vec<String> = obs
                    .non_minimal
                    .iter()
                    .map(|(case, what)| format!("{case}: {what}"))
                    .collect();
                fail(format!(
                    "{} integers not in their smallest encoding: {}",
                    list.len(),
                    list.join("; ")
                ))
            }
        }
        _ => fail("unknown aggregate rule"),
    }
}
