//! Tests of the session machine: one per rule, then a [`Pair`] of sessions over a
//! simulated link with a simulated clock, and a property test of snapshots on it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::messages::{Gvr, Status};
use crate::{Envelope, ErrorBody, MessageType, Payload};

fn config() -> SessionConfig {
    SessionConfig::default()
        .max_replay_messages(8)
        .ack_every(4)
        .ack_delay(Duration::from_millis(20))
        .max_replay_age(Duration::from_secs(60))
        .stall_timeout(Duration::from_secs(10))
}

fn event(id: u64) -> Box<Envelope> {
    Box::new(Envelope::new(id, MessageType::Event, 0))
}

fn ack(n: u64) -> Envelope {
    Envelope::new(0, MessageType::Ack, 0).with_ack(n)
}

/// Sends `env` and writes it if it may go now; returns its sequence number and the
/// frame written, if any.
fn send(s: &mut Session, env: Box<Envelope>, now: Instant) -> (u64, Option<Envelope>) {
    match s.send(env, &mut None, now).expect("room") {
        Pushed::Held {
            seq,
            next: Next::Transmit,
        } => {
            let frame = s.transmit(seq).expect("held").clone();
            s.on_transmitted(seq);
            (seq, Some(frame))
        }
        Pushed::Held { seq, .. } | Pushed::Replaced { seq } => (seq, None),
    }
}

/// Everything the backlog writes.
fn drain(s: &mut Session, link: u64) -> Vec<Envelope> {
    let mut out = Vec::new();
    while let Some((seq, env)) = s.poll_backlog() {
        out.push(env.clone());
        if !s.on_backlog_sent(seq, link) {
            break;
        }
    }
    out
}

fn attached(s: &mut Session, link: u64) {
    assert_eq!(
        s.handle_attach(link, 0, false, None),
        Attach::Attached(None)
    );
}

#[test]
fn numbering_starts_at_one_and_outgoing_messages_carry_the_owed_ack() {
    let t = Instant::now();
    let mut s = Session::new(config());
    attached(&mut s, 1);
    let (one, frame) = send(&mut s, event(10), t);
    assert_eq!((one, frame.and_then(|f| f.seq)), (1, Some(1)));
    assert_eq!(
        s.handle_inbound(&event(20).with_seq(1), || t),
        Verdict::Deliver
    );
    let (_, frame) = send(&mut s, event(11), t);
    assert_eq!(frame.expect("sent").ack, Some(1), "piggybacked");
    let (_, frame) = send(&mut s, event(12), t);
    assert_eq!(frame.expect("sent").ack, None, "nothing new to acknowledge");
}

#[test]
fn an_ack_releases_messages_and_resolves_their_outcomes() {
    let t = Instant::now();
    let mut s = Session::new(config());
    attached(&mut s, 1);
    send(&mut s, event(1), t);
    send(&mut s, event(2), t);
    assert_eq!(s.outcomes().outcome(1), None, "not yet known");
    assert_eq!(s.handle_inbound(&ack(1), || t), Verdict::Drop);
    assert!(s.take_changed());
    assert_eq!(s.outcomes().outcome(1), Some(Ok(())));
    assert_eq!(s.outcomes().outcome(2), None);
    assert_eq!(s.held().messages, 1);
    // An ack of something never sent breaks the rules.
    assert!(matches!(
        s.handle_inbound(&ack(9), || t),
        Verdict::Violation(_)
    ));
}

#[test]
fn duplicates_are_dropped_and_acknowledged_gaps_are_violations() {
    let t = Instant::now();
    let mut s = Session::new(config());
    attached(&mut s, 1);
    assert_eq!(
        s.handle_inbound(&event(1).with_seq(1), || t),
        Verdict::Deliver
    );
    assert_eq!(
        s.handle_inbound(&event(1).with_seq(1), || t),
        Verdict::DropThenAck
    );
    assert_eq!(s.take_standalone_ack(), Some(1));
    assert_eq!(
        s.handle_inbound(&event(3).with_seq(3), || t),
        Verdict::Violation("expected sequence 2, got 3".into())
    );
    // Data without a sequence number bypassed the session: delivered best-effort.
    assert_eq!(s.handle_inbound(&event(4), || t), Verdict::Deliver);
}

#[test]
fn acks_are_due_after_ack_every_messages_or_the_delay() {
    let t = Instant::now();
    let mut s = Session::new(config());
    attached(&mut s, 1);
    for seq in 1..=3 {
        assert_eq!(
            s.handle_inbound(&event(seq).with_seq(seq), || t),
            Verdict::Deliver
        );
    }
    assert_eq!(s.poll_ack(t), None);
    assert_eq!(s.poll_timeout(), Some(t + Duration::from_millis(20)));
    assert_eq!(s.poll_ack(t + Duration::from_millis(20)), Some(3));
    for seq in 4..=7 {
        s.handle_inbound(&event(seq).with_seq(seq), || t);
    }
    assert_eq!(
        s.handle_inbound(&event(8).with_seq(8), || t),
        Verdict::DeliverThenAck,
        "the fourth message since the last ack"
    );
    assert_eq!(s.take_standalone_ack(), Some(8));
}

#[test]
fn an_ack_the_connection_did_not_take_is_owed_again_standalone_or_on_the_next_message() {
    let t = Instant::now();
    let mut s = Session::new(config());
    attached(&mut s, 1);
    for seq in 1..=2 {
        s.handle_inbound(&event(seq).with_seq(seq), || t);
    }
    assert_eq!(s.poll_ack(t + Duration::from_millis(20)), Some(2));
    // Not sent (the queue was full): due again an ack delay later...
    s.on_ack_unsent(t + Duration::from_millis(20));
    assert_eq!(s.ack_due_at(), Some(t + Duration::from_millis(40)));
    assert_eq!(s.poll_ack(t + Duration::from_millis(30)), None);
    assert_eq!(s.poll_ack(t + Duration::from_millis(40)), Some(2));
    // ...or riding on the next message sent before then.
    s.on_ack_unsent(t + Duration::from_millis(40));
    let (_, frame) = send(&mut s, event(10), t + Duration::from_millis(41));
    assert_eq!(frame.expect("sent").ack, Some(2));
    assert_eq!(s.ack_due_at(), None, "the message carried it");
}

#[test]
fn a_held_message_is_acknowledged_only_once_released_and_a_rewound_one_is_received_again() {
    let t = Instant::now();
    let mut s = Session::new(config());
    attached(&mut s, 1);
    assert_eq!(
        s.handle_inbound(&event(1).with_seq(1), || t),
        Verdict::Deliver
    );
    assert_eq!(
        s.handle_inbound(&event(2).with_seq(2), || t),
        Verdict::Deliver
    );
    s.hold(2);
    // While 2 is being handled, nothing acknowledges it: not an outgoing message...
    let (_, frame) = send(&mut s, event(10), t);
    assert_eq!(
        frame.expect("sent").ack,
        Some(1),
        "1 was handled, 2 is held"
    );
    // ...nor a standalone ack, nor a resume.
    assert_eq!(s.take_standalone_ack(), Some(1));
    assert_eq!(s.last_received(), 1);
    // Released: an ack is owed again, an ack delay later, and covers it.
    s.complete_held(2, || t);
    assert_eq!(s.ack_due_at(), Some(t + Duration::from_millis(20)));
    assert_eq!(s.poll_ack(t + Duration::from_millis(20)), Some(2));

    // Held and then not taken (the store was down): 3 counts as never received, so
    // the peer's replay of 3 is delivered, not dropped as a duplicate.
    assert_eq!(
        s.handle_inbound(&event(3).with_seq(3), || t),
        Verdict::Deliver
    );
    s.hold(3);
    s.rewind_held();
    assert_eq!(s.last_received(), 2);
    assert_eq!(
        s.handle_inbound(&event(3).with_seq(3), || t),
        Verdict::Deliver
    );
    // Several held, completed out of order: acks cover only the prefix that is done.
    assert_eq!(
        s.handle_inbound(&event(4).with_seq(4), || t),
        Verdict::Deliver
    );
    s.hold(3);
    s.hold(4);
    s.complete_held(4, || t);
    assert_eq!(s.last_received(), 2, "3 is not done");
    s.complete_held(3, || t);
    assert_eq!(s.last_received(), 4);
    // A snapshot taken while a message is held does not count it as received.
    assert!(matches!(
        s.handle_inbound(&event(5).with_seq(5), || t),
        Verdict::Deliver | Verdict::DeliverThenAck
    ));
    s.hold(5);
    let copy = Session::restore(config(), &s.snapshot(t).expect("snapshot"), t).expect("restore");
    assert_eq!(copy.last_received(), 4);
}

#[test]
fn a_backlog_carries_the_ack_instead_of_a_standalone_one() {
    let t = Instant::now();
    let mut s = Session::new(config());
    s.send(event(1), &mut None, t).expect("room");
    s.handle_attach(1, 0, false, None);
    s.handle_inbound(&event(9).with_seq(1), || t);
    // The held message waits in the backlog: a standalone ack would overtake it.
    assert_eq!(s.take_standalone_ack(), None);
    assert_eq!(s.poll_ack(t + Duration::from_secs(1)), None);
    let frames = drain(&mut s, 1);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].ack, Some(1), "the ack rode on the backlog");
}

#[test]
fn resume_replays_what_the_peer_lacks_in_order_before_new_messages() {
    let t = Instant::now();
    let mut s = Session::new(config());
    attached(&mut s, 1);
    for id in 1..=3 {
        send(&mut s, event(id), t);
    }
    s.detach(1);
    let (seq, frame) = send(&mut s, event(4), t);
    assert_eq!((seq, frame), (4, None), "held while disconnected");
    assert_eq!(s.handle_attach(2, 0, true, Some(1)), Attach::Attached(None));
    assert_eq!(s.outcomes().outcome(1), Some(Ok(())), "the peer has 1");
    // A message sent during the replay waits behind it.
    assert!(matches!(
        s.send(event(5), &mut None, t),
        Ok(Pushed::Held {
            seq: 5,
            next: Next::Backlog
        })
    ));
    let replayed: Vec<_> = drain(&mut s, 2).iter().filter_map(|f| f.seq).collect();
    assert_eq!(replayed, [2, 3, 4, 5]);
}

#[test]
fn a_resume_claiming_more_than_was_sent_resets() {
    let t = Instant::now();
    let mut hub = Session::new(config());
    attached(&mut hub, 1);
    send(&mut hub, event(1), t);
    assert!(hub.may_resume(1));
    assert!(!hub.may_resume(2), "the hub side refuses to resume");
    // The agent side, told by a hub that it received more than was ever sent, resets.
    let mut agent = Session::new(config());
    attached(&mut agent, 1);
    let Attach::Restart(reset) = agent.handle_attach(2, 0, true, Some(5)) else {
        panic!("expected a reset");
    };
    assert_eq!(reset.epoch, 1);
    assert!(
        reset.reason.contains("only 0 were sent"),
        "{}",
        reset.reason
    );
}

#[test]
fn a_resume_from_older_state_than_the_peer_acknowledged_resets() {
    let t = Instant::now();
    let mut s = Session::new(config());
    attached(&mut s, 1);
    for id in 1..=3 {
        send(&mut s, event(id), t);
    }
    s.handle_inbound(&ack(3), || t);
    s.detach(1);
    // It acknowledged 3, and now claims to have only 1: a stale copy of the session.
    let Attach::Restart(reset) = s.handle_attach(2, 0, true, Some(1)) else {
        panic!("expected a reset");
    };
    assert!(reset.reason.contains("older state"), "{}", reset.reason);
    // A peer whose direction has not started reports 0, and resumes.
    let mut s = Session::new(config());
    attached(&mut s, 1);
    send(&mut s, event(1), t);
    s.handle_inbound(&ack(1), || t);
    s.detach(1);
    assert_eq!(s.handle_attach(2, 0, true, Some(0)), Attach::Attached(None));
}

#[test]
fn a_reset_fails_what_the_peer_may_have_and_carries_the_rest_over() {
    let t = Instant::now();
    let mut s = Session::new(config());
    attached(&mut s, 1);
    send(&mut s, event(1), t); // sent, never acknowledged
    s.detach(1);
    send(&mut s, event(2), t); // never sent
    // The peer started a new session.
    let Attach::Attached(Some(reset)) = s.handle_attach(2, 0, false, None) else {
        panic!("expected a reset");
    };
    assert_eq!(reset.carried, [2].into_iter().collect());
    assert_eq!(s.epoch(), 1);
    assert!(matches!(
        s.outcomes().outcome(1),
        Some(Err(Undelivered::Reset(_)))
    ));
    assert_eq!(s.outcomes().outcome(2), None, "still on its way");
    let carried: Vec<_> = drain(&mut s, 2).iter().filter_map(|f| f.seq).collect();
    assert_eq!(carried, [2], "under its own sequence number");
    s.handle_inbound(&ack(2), || t);
    assert_eq!(s.outcomes().outcome(2), Some(Ok(())));
}

#[test]
fn two_connections_resuming_at_once_never_both_carry_the_session() {
    let mut s = Session::new(config());
    assert_eq!(s.handle_attach(1, 1, false, None), Attach::Attached(None));
    // The hub grants the session to a second connection: the first is superseded.
    assert_eq!(s.supersede(3), Some(1));
    assert_eq!(s.handle_attach(3, 3, true, Some(0)), Attach::Attached(None));
    // A connection granted earlier that attaches late carries nothing.
    assert_eq!(s.handle_attach(2, 2, true, Some(0)), Attach::Superseded);
    assert!(s.carried_by(3) && !s.carried_by(2));
}

#[test]
fn a_refused_message_is_rejected_not_delivered_and_not_sent_again() {
    let t = Instant::now();
    let mut s = Session::new(config());
    attached(&mut s, 1);
    send(&mut s, event(77), t);
    let refusal = Envelope::new(5, MessageType::Reply, 0)
        .with_correlation(77)
        .with_error(ErrorBody::new(error_code::BAD_REQUEST, "corrupt payload"))
        .with_ack(1);
    assert_eq!(s.handle_inbound(&refusal, || t), Verdict::Deliver);
    assert_eq!(
        s.outcomes().outcome(1),
        Some(Err(Undelivered::Rejected {
            code: "bad_request".into(),
            message: "corrupt payload".into()
        }))
    );
    // Released: a reconnect does not replay it (no livelock on a poison message).
    s.detach(1);
    s.handle_attach(2, 0, true, Some(0));
    assert!(drain(&mut s, 2).is_empty());
    // A handler error is an answer, not a refusal.
    assert!(!is_rejection(error_code::HANDLER_ERROR));
}

fn status(name: &str, n: u64) -> Box<Envelope> {
    let status = Status {
        gvr: Gvr {
            group: "apps".into(),
            version: "v1".into(),
            resource: "deployments".into(),
        },
        namespace: Some("default".into()),
        name: name.into(),
        status: serde_json::json!({ "n": n }),
        observed_generation: None,
    };
    let payload = Payload::json(&status).expect("encodes");
    Box::new(Envelope::new(n, MessageType::Status, 0).with_payload(payload))
}

#[test]
fn a_full_buffer_refuses_or_keeps_only_the_latest_unsent_status() {
    let t = Instant::now();
    let mut s = Session::new(config().max_replay_messages(2));
    // Disconnected: everything is held, unsent.
    let mut key = conflation_key(&status("a", 1));
    assert!(key.is_some());
    assert!(matches!(
        s.send(status("a", 1), &mut key, t),
        Ok(Pushed::Held { seq: 1, .. })
    ));
    assert_eq!(key, None, "recorded");
    s.send(event(2), &mut None, t).expect("room");
    // Full: a newer status of the same resource replaces the unsent one.
    let mut key = conflation_key(&status("a", 3));
    assert!(matches!(
        s.send(status("a", 3), &mut key, t),
        Ok(Pushed::Replaced { seq: 1 })
    ));
    // Another resource, or a plain event, finds the buffer full.
    let mut key = conflation_key(&status("b", 4));
    assert!(matches!(
        s.send(status("b", 4), &mut key, t),
        Err(Refused::Full {
            bound: Bound::Messages,
            ..
        })
    ));
    // Once sent, a status is never replaced: the peer may have it.
    s.handle_attach(1, 0, false, None);
    drain(&mut s, 1);
    let mut key = conflation_key(&status("a", 5));
    assert!(matches!(
        s.send(status("a", 5), &mut key, t),
        Err(Refused::Full { .. })
    ));
    assert_eq!(
        s.transmit(1).map(|e| e.id),
        Some(3),
        "the replacement went under seq 1"
    );
    // A status taken by the backlog (being written) is not replaced either.
    let mut s = Session::new(config().max_replay_messages(1));
    let mut key = conflation_key(&status("a", 1));
    s.send(status("a", 1), &mut key, t).expect("room");
    s.handle_attach(1, 0, false, None);
    let (seq, _) = s.poll_backlog().expect("the backlog");
    let mut key = conflation_key(&status("a", 2));
    assert!(
        matches!(
            s.send(status("a", 2), &mut key, t),
            Err(Refused::Full { .. })
        ),
        "seq {seq} is on its way"
    );
}

#[test]
fn held_messages_expire_and_a_later_resume_is_a_reset() {
    let t = Instant::now();
    let mut s = Session::new(config());
    attached(&mut s, 1);
    send(&mut s, event(1), t);
    s.detach(1);
    assert_eq!(s.poll_timeout(), Some(t + Duration::from_secs(60)));
    s.handle_timeout(t + Duration::from_secs(61));
    assert_eq!(s.outcomes().outcome(1), Some(Err(Undelivered::Expired)));
    let Attach::Restart(reset) = s.handle_attach(2, 0, true, Some(0)) else {
        panic!("expected a reset");
    };
    assert!(reset.reason.contains("no longer held"), "{}", reset.reason);
    // Nothing goes on that connection; the next one, a new session, carries on
    // without a second reset.
    assert!(s.poll_backlog().is_none());
    assert_eq!(s.handle_attach(3, 0, false, None), Attach::Attached(None));
}

#[test]
fn a_drain_with_everything_acknowledged_hands_over_without_a_reset() {
    let t = Instant::now();
    let mut s = Session::new(config());
    attached(&mut s, 1);
    send(&mut s, event(1), t);
    assert!(!s.is_quiet());
    s.handle_inbound(&ack(1), || t);
    assert!(s.is_quiet());
    s.detach(1);
    assert!(s.handle_handover());
    // The next hub starts a new session: the numbering goes on, no reset.
    assert_eq!(s.handle_attach(2, 0, false, None), Attach::Attached(None));
    let (seq, _) = send(&mut s, event(2), t);
    assert_eq!(seq, 2);
    // Without everything acknowledged, the same move is a reset.
    let mut s = Session::new(config());
    attached(&mut s, 1);
    send(&mut s, event(1), t);
    s.detach(1);
    assert!(!s.handle_handover());
    assert!(matches!(
        s.handle_attach(2, 0, false, None),
        Attach::Attached(Some(_))
    ));
}

#[test]
fn a_peer_that_stops_acknowledging_is_stalled_after_the_timeout() {
    let t = Instant::now();
    let mut s = Session::new(config());
    s.send(event(1), &mut None, t).expect("room");
    assert!(
        !s.peer_stalled(t + Duration::from_secs(60)),
        "never sent: nothing to wait for"
    );
    s.handle_attach(1, 0, false, None);
    drain(&mut s, 1);
    assert!(!s.peer_stalled(t + Duration::from_secs(10)));
    assert!(s.peer_stalled(t + Duration::from_secs(11)));
}

#[test]
fn shutting_down_fails_everything_and_refuses_more() {
    let t = Instant::now();
    let mut s = Session::new(config());
    s.send(event(1), &mut None, t).expect("room");
    s.shut_down(Undelivered::ShutDown);
    assert_eq!(s.outcomes().outcome(1), Some(Err(Undelivered::ShutDown)));
    assert!(matches!(
        s.send(event(2), &mut None, t),
        Err(Refused::ShutDown(_))
    ));
    // Failing held messages keeps the session usable.
    let mut s = Session::new(config());
    s.send(event(1), &mut None, t).expect("room");
    s.fail_held("no resume");
    assert!(matches!(
        s.outcomes().outcome(1),
        Some(Err(Undelivered::Reset(_)))
    ));
    assert!(s.send(event(2), &mut None, t).is_ok());
}

#[test]
fn a_snapshot_restores_the_same_state_and_bad_ones_are_refused() {
    let t = Instant::now();
    let mut s = Session::new(config());
    attached(&mut s, 1);
    send(&mut s, event(1), t);
    send(&mut s, status("a", 2), t + Duration::from_secs(1));
    s.handle_inbound(&event(5).with_seq(1), || t);
    s.detach(1);
    let later = t + Duration::from_secs(2);
    let snapshot = s.snapshot(later).expect("encodes");
    let json = serde_json::to_string(&snapshot).expect("serializes");
    let back: SessionSnapshot = serde_json::from_str(&json).expect("deserializes");
    // Restored elsewhere, at another time: the same state, relative to that time.
    let elsewhere = later + Duration::from_secs(100);
    let restored = Session::restore(config(), &back, elsewhere).expect("restores");
    assert_eq!(restored.generation(), 1);
    let again = restored.snapshot(elsewhere).expect("encodes");
    assert_eq!(again.generation, 2, "one more than the copy it came from");
    assert_eq!(
        SessionSnapshot {
            generation: 1,
            ..again
        },
        snapshot
    );
    assert_eq!(restored.held(), s.held());
    assert_eq!(restored.last_received(), 1);
    let mut bad = snapshot.clone();
    bad.version = 9;
    assert_eq!(
        Session::restore(config(), &bad, t).err(),
        Some(SnapshotError::Version(9))
    );
    let mut bad = snapshot.clone();
    bad.held.reverse();
    assert!(matches!(
        Session::restore(config(), &bad, t),
        Err(SnapshotError::Inconsistent(_))
    ));
    let mut bad = snapshot;
    bad.held[0].frame.truncate(3);
    assert!(matches!(
        Session::restore(config(), &bad, t),
        Err(SnapshotError::Message { seq: 1, .. })
    ));
}

#[test]
fn a_staged_message_and_everything_after_it_wait_for_its_release() {
    let t = Instant::now();
    let mut s = Session::new(config());
    attached(&mut s, 1);
    let (first, frame) = send(&mut s, event(1), t);
    assert!(frame.is_some(), "nothing staged: it goes at once");
    let Ok(Pushed::Held { seq: staged, next }) = s.send_staged(event(2), t) else {
        panic!("room");
    };
    assert_eq!((staged, next), (first + 1, Next::Backlog));
    let (after, frame) = send(&mut s, event(3), t);
    assert!(frame.is_none(), "behind a staged message");
    assert!(
        drain(&mut s, 1).is_empty(),
        "the backlog stops at the staged one"
    );
    assert!(s.release(staged), "released: the backlog may go");
    let sent: Vec<u64> = drain(&mut s, 1).iter().filter_map(|e| e.seq).collect();
    assert_eq!(sent, vec![staged, after], "in order, once released");
    let (_, frame) = send(&mut s, event(4), t);
    assert!(frame.is_some(), "nothing staged any more");
    // A connection that comes later replays staged messages only once released.
    s.detach(1);
    let Ok(Pushed::Held { seq: held, .. }) = s.send_staged(event(5), t) else {
        panic!("room");
    };
    assert!(matches!(
        s.handle_attach(2, 1, true, Some(after + 1)),
        Attach::Attached(None)
    ));
    assert!(
        drain(&mut s, 2).is_empty(),
        "staged before the connection came"
    );
    assert!(s.release(held));
    let sent: Vec<u64> = drain(&mut s, 2).iter().filter_map(|e| e.seq).collect();
    assert_eq!(sent, vec![held]);
}

#[test]
fn an_open_numbering_goes_on_after_what_the_peer_reports_and_takes_nothing_before() {
    let t = Instant::now();
    let open = SessionSnapshot::open(4);
    let mut s = Session::restore(config(), &open, t).expect("restores");
    assert!(s.may_resume(40), "the peer's word decides");
    assert!(
        matches!(s.send(event(1), &mut None, t), Err(Refused::Full { .. })),
        "nothing is numbered before the peer says where the numbering goes on"
    );
    assert_eq!(
        s.last_received(),
        0,
        "the peer replays all it was not acknowledged"
    );
    assert!(matches!(
        s.handle_attach(1, 1, true, Some(9)),
        Attach::Attached(None)
    ));
    let (seq, frame) = send(&mut s, event(1), t);
    assert_eq!(seq, 10, "after what the peer has");
    assert!(frame.is_some());
    // Its direction takes its base from the first message the peer replays.
    assert_eq!(
        s.handle_inbound(&event(2).with_seq(7), || t),
        Verdict::Deliver
    );
    assert_eq!(s.last_received(), 7);

    // A peer reporting less than it acknowledged resumed from an older state.
    let mut s = Session::restore(config(), &open, t).expect("restores");
    assert!(matches!(
        s.handle_attach(1, 1, true, Some(3)),
        Attach::Restart(_)
    ));
    // One reporting nothing has everything acknowledged.
    let mut s = Session::restore(config(), &open, t).expect("restores");
    assert!(matches!(
        s.handle_attach(1, 1, true, Some(0)),
        Attach::Attached(None)
    ));
    assert_eq!(send(&mut s, event(1), t).0, 5);
    // A peer's word past any sane numbering is refused, not trusted.
    let mut s = Session::restore(config(), &open, t).expect("restores");
    assert!(matches!(
        s.handle_attach(1, 1, true, Some(u64::MAX)),
        Attach::Restart(_)
    ));
    // Held after the resume: nothing goes out until the holder releases the hold.
    let mut s = Session::restore(config(), &open.clone().holding_resumed(), t).expect("restores");
    assert!(matches!(
        s.handle_attach(1, 1, true, Some(9)),
        Attach::Attached(None)
    ));
    assert_eq!(s.resumed_open_at(), Some(9));
    let (seq, frame) = send(&mut s, event(1), t);
    assert_eq!(seq, 10);
    assert!(frame.is_none(), "held until released");
    assert!(s.release_resumed());
    let sent: Vec<u64> = drain(&mut s, 1).iter().filter_map(|e| e.seq).collect();
    assert_eq!(sent, vec![10]);
    // Ending the hold does not release a message staged under the first number after
    // it (R + 1), and ending it again (a later reader on the same copy) neither.
    let mut s = Session::restore(config(), &open.clone().holding_resumed(), t).expect("restores");
    assert!(matches!(
        s.handle_attach(1, 1, true, Some(9)),
        Attach::Attached(None)
    ));
    let staged = s.send_staged(event(2), t).expect("staged");
    assert!(matches!(staged, Pushed::Held { seq: 10, .. }));
    assert!(!s.release_resumed(), "10 is still staged");
    assert!(!s.release_resumed());
    assert!(
        drain(&mut s, 1).is_empty(),
        "nothing goes out before its release"
    );
    assert!(s.release(10));
    let sent: Vec<u64> = drain(&mut s, 1).iter().filter_map(|e| e.seq).collect();
    assert_eq!(sent, vec![10]);
    // An open numbering with held messages does not add up.
    let mut bad = SessionSnapshot::open(4);
    let mut with_held = Session::new(config());
    attached(&mut with_held, 1);
    send(&mut with_held, event(1), t);
    bad.held = with_held.snapshot(t).expect("encodes").held;
    bad.next_seq = 9;
    bad.held[0].seq = 5;
    assert!(matches!(
        Session::restore(config(), &bad, t),
        Err(SnapshotError::Inconsistent(_))
    ));
}

/// Two sessions (an agent's and the hub's) over a simulated link with a simulated
/// clock: the model of quinn-proto's test `Pair`. The hub decides resumes as a hub
/// does; everything written is logged, so two runs can be compared frame by frame.
struct Pair {
    now: Instant,
    sides: [Session; 2],
    wires: [VecDeque<Envelope>; 2],
    connected: bool,
    link: u64,
    /// Every frame written, per direction.
    written: [Vec<Frame>; 2],
    /// The ids delivered on each side, in order.
    delivered: [Vec<u64>; 2],
    /// Ids accepted by `send` on each side, in order.
    accepted: [Vec<u64>; 2],
    resets: u64,
}

/// What a peer sees of a frame: its `seq`, `ack` and `id`.
type Frame = (Option<u64>, Option<u64>, u64);

const AGENT: usize = 0;
const HUB: usize = 1;

impl Pair {
    fn new(config: SessionConfig) -> Pair {
        let mut pair = Pair {
            now: Instant::now(),
            sides: [Session::new(config.clone()), Session::new(config)],
            wires: [VecDeque::new(), VecDeque::new()],
            connected: false,
            link: 0,
            written: [Vec::new(), Vec::new()],
            delivered: [Vec::new(), Vec::new()],
            accepted: [Vec::new(), Vec::new()],
            resets: 0,
        };
        pair.connect();
        pair
    }

    fn write(&mut self, side: usize, env: Envelope) {
        self.written[side].push((env.seq, env.ack, env.id));
        self.wires[side].push_back(env);
    }

    fn send(&mut self, side: usize, id: u64) {
        let now = self.now;
        match self.sides[side].send(event(id), &mut None, now) {
            Ok(Pushed::Held { seq, next }) => {
                self.accepted[side].push(id);
                if next == Next::Transmit {
                    let frame = self.sides[side].transmit(seq).expect("held").clone();
                    self.sides[side].on_transmitted(seq);
                    self.write(side, frame);
                }
            }
            Ok(Pushed::Replaced { .. }) => unreachable!("no conflation here"),
            Err(_) => {}
        }
        self.flush(side);
    }

    fn flush(&mut self, side: usize) {
        if !self.connected {
            return;
        }
        let link = self.link;
        while let Some((seq, env)) = self.sides[side].poll_backlog() {
            let env = env.clone();
            let more = self.sides[side].on_backlog_sent(seq, link);
            self.write(side, env);
            if !more {
                break;
            }
        }
    }

    /// Delivers up to `n` frames written by `from` to the other side.
    fn deliver(&mut self, from: usize, n: usize) {
        let to = 1 - from;
        for _ in 0..n {
            let Some(env) = self.wires[from].pop_front() else {
                return;
            };
            let now = self.now;
            match self.sides[to].handle_inbound(&env, || now) {
                Verdict::Deliver => {
                    if !env.kind.is_control() {
                        self.delivered[to].push(env.id);
                    }
                }
                Verdict::DeliverThenAck => {
                    self.delivered[to].push(env.id);
                    self.standalone_ack(to);
                }
                Verdict::DropThenAck => self.standalone_ack(to),
                Verdict::Drop => {}
                Verdict::Violation(why) => panic!("violation: {why}"),
            }
        }
    }

    fn standalone_ack(&mut self, side: usize) {
        if let Some(ack) = self.sides[side].take_standalone_ack() {
            self.write(side, Envelope::new(0, MessageType::Ack, 0).with_ack(ack));
        }
    }

    fn tick(&mut self, by: Duration) {
        self.now += by;
        for side in [AGENT, HUB] {
            self.sides[side].handle_timeout(self.now);
            if self.connected
                && let Some(ack) = self.sides[side].poll_ack(self.now)
            {
                self.write(side, Envelope::new(0, MessageType::Ack, 0).with_ack(ack));
            }
        }
    }

    fn disconnect(&mut self) {
        if !self.connected {
            return;
        }
        self.connected = false;
        self.wires = [VecDeque::new(), VecDeque::new()];
        for side in &mut self.sides {
            side.detach(self.link);
        }
    }

    /// The handshake: the agent asks to resume with what it received; the hub
    /// resumes if it may, and tells what it received.
    fn connect(&mut self) {
        self.disconnect();
        self.link += 1;
        let asked = self.sides[AGENT].last_received();
        let first = self.link == 1;
        let resumed = !first && self.sides[HUB].may_resume(asked);
        if !resumed && !first {
            self.sides[HUB] = Session::new(self.sides[HUB].config().clone());
        }
        let hub_received = self.sides[HUB].last_received();
        self.sides[HUB].supersede(self.link);
        let hub = self.sides[HUB].handle_attach(self.link, self.link, resumed, Some(asked));
        let agent =
            self.sides[AGENT].handle_attach(self.link, 0, resumed, resumed.then_some(hub_received));
        let mut restart = false;
        let hub_restarted = matches!(hub, Attach::Restart(_));
        for attach in [hub, agent] {
            match attach {
                Attach::Attached(Some(_)) => self.resets += 1,
                Attach::Attached(None) => {}
                Attach::Restart(_) => {
                    self.resets += 1;
                    restart = true;
                }
                Attach::Superseded => panic!("superseded"),
            }
        }
        if restart {
            // One side could not continue what the other resumed: both start a new
            // session on the next connection, which continues from the reset.
            for side in &mut self.sides {
                side.detach(self.link);
            }
            if !hub_restarted {
                // As a hub's registry does: a connection without a resume gets a new
                // session (a session it reset itself goes on as the new one).
                self.sides[HUB] = Session::new(self.sides[HUB].config().clone());
            }
            self.link += 1;
            self.sides[HUB].supersede(self.link);
            for (side, lease) in [(HUB, self.link), (AGENT, 0)] {
                match self.sides[side].handle_attach(self.link, lease, false, None) {
                    Attach::Attached(None) => {}
                    other => panic!("a second reset after a restart: {other:?}"),
                }
            }
        }
        self.connected = true;
        self.flush(AGENT);
        self.flush(HUB);
    }

    /// The side's process restarts from a snapshot (the connection is lost with it).
    fn restart(&mut self, side: usize) {
        self.disconnect();
        let snapshot = self.sides[side].snapshot(self.now).expect("encodes");
        let bytes = rmp_serde::to_vec(&snapshot).expect("serializes");
        let back: SessionSnapshot = rmp_serde::from_slice(&bytes).expect("deserializes");
        let config = self.sides[side].config().clone();
        self.sides[side] = Session::restore(config, &back, self.now).expect("restores");
    }

    /// What a peer observes: every frame on the wire and every delivery.
    fn observed(&self) -> impl PartialEq + std::fmt::Debug + use<> {
        (self.written.clone(), self.delivered.clone(), self.resets)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Send(usize),
    Deliver(usize, usize),
    Tick(u64),
    Disconnect,
    Connect,
    Restart(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize).prop_map(Op::Send),
        4 => (0..2usize, 1..6usize).prop_map(|(s, n)| Op::Deliver(s, n)),
        2 => (1..40u64).prop_map(Op::Tick),
        1 => Just(Op::Disconnect),
        1 => Just(Op::Connect),
        1 => (0..2usize).prop_map(Op::Restart),
    ]
}

/// Runs `ops`; a restart is carried out only with `restarts`, else it is a
/// disconnect (what the peer sees of a restart).
fn run(ops: &[Op], restarts: bool) -> Pair {
    let mut pair = Pair::new(config().max_replay_messages(64));
    let mut next_id = [1u64, 1_000_000];
    for op in ops {
        match *op {
            Op::Send(side) => {
                pair.send(side, next_id[side]);
                next_id[side] += 1;
            }
            Op::Deliver(from, n) => pair.deliver(from, n),
            Op::Tick(ms) => pair.tick(Duration::from_millis(ms)),
            Op::Disconnect => pair.disconnect(),
            Op::Connect => pair.connect(),
            Op::Restart(side) if restarts => pair.restart(side),
            Op::Restart(_) => pair.disconnect(),
        }
    }
    // Heal and let everything settle.
    pair.connect();
    for _ in 0..64 {
        pair.deliver(AGENT, usize::MAX);
        pair.deliver(HUB, usize::MAX);
        pair.tick(Duration::from_millis(25));
    }
    pair
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Exactly once and in order in both directions, whatever the cuts, and a
    /// snapshot taken and restored at any point changes nothing a peer can observe.
    #[test]
    fn snapshot_and_restore_change_nothing_a_peer_observes(ops in prop::collection::vec(op(), 1..120)) {
        let plain = run(&ops, false);
        let restored = run(&ops, true);
        for side in [AGENT, HUB] {
            prop_assert_eq!(&plain.delivered[1 - side], &plain.accepted[side]);
        }
        prop_assert_eq!(plain.resets, 0);
        prop_assert_eq!(plain.observed(), restored.observed());
    }
}
