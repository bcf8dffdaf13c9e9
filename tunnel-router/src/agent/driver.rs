//! The agent's reconnect loop: the async driver of `tunnel_reconnect::Redial`.

use super::*;

/// The reconnect loop: a driver of [`Redial`], which decides where and when to dial.
/// This loop dials, attaches each connection to the session, runs it, and reports
/// how it ended.
pub(super) async fn supervise(
    connector: Box<dyn Connector>,
    mut updates: Option<watch::Receiver<Vec<String>>>,
    mut redial: Redial,
    mut router: Router,
    recorder: Arc<dyn Recorder>,
    inner: Arc<Inner>,
) {
    let mut session_id: Option<String> = None;
    loop {
        if let Some(updates) = updates.as_mut()
            && updates.has_changed().unwrap_or(false)
        {
            let fresh = updates.borrow_and_update().clone();
            if redial.set_endpoints(fresh.clone()) {
                tracing::info!(endpoints = ?fresh, "endpoints changed");
            } else {
                tracing::warn!("ignoring an empty endpoint list from discovery");
            }
        }
        let step = match redial.poll(Instant::now().into_std()) {
            Action::Dial(endpoint) => Ok(endpoint.to_owned()),
            Action::Wait { until, cause } => Err(Some((Instant::from_std(until), cause))),
            Action::Connected | Action::GiveUp => Err(None),
        };
        report(&mut redial, &*recorder);
        let endpoint = match step {
            Ok(endpoint) => endpoint,
            Err(Some((until, cause))) => {
                inner.state.send_replace(match cause {
                    WaitCause::Backoff => ConnectionState::Backoff { until },
                    WaitCause::CircuitOpen { endpoint, until } => {
                        tracing::debug!(%endpoint, "circuit open, not dialing");
                        ConnectionState::CircuitOpen {
                            endpoint,
                            until: Instant::from_std(until),
                        }
                    }
                });
                tokio::select! {
                    () = inner.shutdown.cancelled() => break,
                    () = tokio::time::sleep_until(until) => {}
                }
                continue;
            }
            Err(None) => {
                tracing::warn!("giving up: too many failed connects in a row");
                break;
            }
        };
        inner.state.send_replace(ConnectionState::Connecting);
        let resume = match (&inner.reliable, &session_id) {
            (Some(reliable), Some(id)) => Some(Resume {
                session_id: id.clone(),
                last_received: reliable.last_received(),
            }),
            _ => None,
        };
        let attempt = tokio::select! {
            () = inner.shutdown.cancelled() => break,
            r = connector.connect_with(&endpoint, resume) => r,
        };
        let conn = match attempt {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(%endpoint, error = %tunnel_proto::text::Untrusted(&e.to_string()), "connect failed");
                let retry_after = match &e {
                    tunnel_transport::ConnectError::Refused { retry_after, .. } => *retry_after,
                    _ => None,
                };
                redial.on_connect_failed(Instant::now().into_std(), retry_after);
                continue;
            }
        };
        if redial.on_connected(Instant::now().into_std()) {
            inner.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        report(&mut redial, &*recorder);
        let mut hint = None;
        let (sender, mut receiver) = conn.split();
        let info = sender.info().clone();
        tracing::info!(session = %tunnel_proto::text::Untrusted(&info.session_id), resumed = info.resumed, %endpoint, "connected");
        let reliable = inner
            .reliable
            .as_ref()
            .filter(|_| info.has_capability(capability::RESUME));
        let state = match reliable {
            Some(reliable) => {
                let reset = Box::pin(reliable.attach(
                    sender.clone(),
                    info.resumed,
                    info.peer_last_received,
                ))
                .await;
                session_id = Some(info.session_id.clone());
                let restart = reset.is_err();
                if restart {
                    // The hub resumed a session this agent had to reset: start a new
                    // one on the next connection, which continues from the reset.
                    session_id = None;
                }
                match reset.unwrap_or_else(Some) {
                    Some(crate::delivery::Reset {
                        reason,
                        carried,
                        epoch,
                    }) => {
                        recorder.session_reset();
                        tracing::warn!(%reason, epoch, "session reset");
                        inner.pending.reset(None, &carried, "the session was reset");
                        let _ = inner.events.send(SessionEvent::Reset {
                            reason: reason.clone(),
                            epoch,
                        });
                        if restart {
                            inner.state.send_replace(ConnectionState::Reset { reason });
                            // Nobody reads this connection yet: end it at once, with the code.
                            sender.abort_with(
                                CloseCode::NORMAL,
                                "session reset: starting a new session",
                            );
                            redial.on_disconnected(Instant::now().into_std(), Disconnect::closed());
                            continue;
                        }
                        ConnectionState::Reset { reason }
                    }
                    None if info.resumed => ConnectionState::Resumed {
                        session_id: info.session_id.clone(),
                    },
                    None => ConnectionState::Connected {
                        session_id: info.session_id.clone(),
                    },
                }
            }
            None => {
                if let Some(reliable) = &inner.reliable {
                    // Held messages cannot be delivered without resume.
                    reliable.fail_held("the hub does not resume sessions");
                }
                ConnectionState::Connected {
                    session_id: info.session_id.clone(),
                }
            }
        };
        inner.resumable.store(reliable.is_some(), Ordering::Release);
        inner.state.send_replace(state);
        inner.json.store(
            sender.info().format == tunnel_proto::Format::Json,
            Ordering::Relaxed,
        );
        inner
            .max_message_size
            .store(sender.limits().max_message_size, Ordering::Relaxed);
        inner.current.send_replace(Some(sender.clone()));
        let link = connection_loop::Link::new(reliable, &inner.pending, &*recorder, true);
        let (end, stopping) = {
            let session =
                connection_loop::run(&mut receiver, sender.clone(), &mut router, &mut hint, &link);
            tokio::pin!(session);
            tokio::select! {
                end = &mut session => (end, false),
                () = inner.shutdown.cancelled() => {
                    let close = sender.close(CloseCode::NORMAL, "agent shutting down");
                    (tokio::join!(session, close).0, true)
                }
                () = link.drain_notice.notified() => {
                    let deadline = Instant::from_std(redial.on_drain(Instant::now().into_std()));
                    let end = move_off(&inner, &sender, reliable, session.as_mut(), deadline).await;
                    (end, false)
                }
            }
        };
        // Nothing more is read from this connection.
        drop(receiver);
        inner.current.send_replace(None);
        inner.resumable.store(false, Ordering::Release);
        match reliable {
            Some(reliable) => {
                reliable.detach(&sender);
            }
            // Without a session, replies cannot outlive the connection.
            None => inner
                .pending
                .fail_all("the connection ended before the reply"),
        }
        let how = match end {
            SessionEnd::Closed => {
                tracing::info!(reason = %tunnel_proto::text::Untrusted(&sender.close_reason().map(|r| r.to_string()).unwrap_or_default()), "connection closed");
                Disconnect::closed()
            }
            SessionEnd::Failed(e) => {
                tracing::warn!(error = %tunnel_proto::text::Untrusted(&e.to_string()), "connection failed");
                Disconnect::dropped()
            }
        };
        if stopping {
            break;
        }
        let how = match hint {
            Some(hint) => how.with_hint(hint.after_ms.map(Duration::from_millis), hint.endpoints),
            None => how,
        };
        redial.on_disconnected(Instant::now().into_std(), how);
    }
    inner.current.send_replace(None);
    if let Some(reliable) = &inner.reliable {
        reliable.shut_down(crate::Undelivered::ShutDown);
    }
    inner.pending.fail_all("the agent shut down");
    inner.state.send_replace(ConnectionState::Closed);
}

/// Hands what the redial machine reports to the recorder and the log.
fn report(redial: &mut Redial, recorder: &dyn Recorder) {
    while let Some(event) = redial.poll_event() {
        match event {
            RedialEvent::Circuit { endpoint, state } => {
                report_circuit(recorder, &endpoint, state);
            }
            RedialEvent::Redialing { reason } => recorder.reconnect_attempt(reason),
            RedialEvent::Redirected { endpoints } => {
                tracing::info!(endpoints = ?endpoints, "hub pointed to other endpoints");
            }
            RedialEvent::RedirectRefused { refused } => {
                let shown: Vec<_> = refused
                    .iter()
                    .take(4)
                    .map(|u| tunnel_proto::text::Untrusted(u).to_string())
                    .collect();
                tracing::warn!(refused = ?shown, count = refused.len(), "not following the hub to endpoints this agent's configuration does not allow");
            }
            _ => {}
        }
    }
}

/// Moves off a connection whose hub announced a drain: hands no new message to it
/// (they are held for the next connection), lets it finish what it carries (the hub
/// acknowledges what was sent, answers requests already sent) until `deadline`,
/// then closes it. When nothing it carried is left unacknowledged, the next
/// connection continues the session's numbering instead of resetting it.
async fn move_off(
    inner: &Inner,
    sender: &ConnectionSender,
    reliable: Option<&Arc<Reliable>>,
    mut session: std::pin::Pin<&mut impl std::future::Future<Output = SessionEnd>>,
    deadline: Instant,
) -> SessionEnd {
    tracing::info!(connection = sender.info().id, "hub is draining: moving");
    inner.current.send_replace(None);
    if let Some(reliable) = reliable {
        reliable.detach(sender);
    }
    let asked = inner.pending.ids();
    let finished = async {
        // A short poll: drains are rare, and this keeps the common paths free of
        // extra notifications.
        let done = || reliable.is_none_or(|r| r.quiet()) && !inner.pending.any_of(&asked);
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        end = session.as_mut() => return end,
        done = tokio::time::timeout_at(deadline, finished) => {
            if done.is_err() {
                tracing::warn!("the draining hub did not finish within the drain wait");
            }
        }
    }
    if let Some(reliable) = reliable
        && reliable.end_for_handover()
    {
        tracing::debug!("everything acknowledged: the session continues on the next hub");
    }
    let close = sender.close(CloseCode::NORMAL, "moving off a draining hub");
    tokio::join!(session, close).0
}

fn report_circuit(recorder: &dyn Recorder, endpoint: &str, state: BreakerState) {
    recorder.circuit_state(
        endpoint,
        match state {
            BreakerState::Closed { .. } => CircuitState::Closed,
            BreakerState::HalfOpen { .. } => CircuitState::HalfOpen,
            BreakerState::Open { .. } => CircuitState::Open,
        },
    );
}
