//! The agent's connection task: the one owner of the XMPP connection, and the thin driver of
//! the state machine.
//!
//! A `select!` loop over the shutdown signal, the core's next deadline
//! ([`Core::poll_timeout`]), stanzas and session resets from the server, reconnect status,
//! job ends and handlers' reports from [`crate::supervisor`], HTTP transfers' ends from
//! [`crate::dataplane`]. Each event becomes one call into [`Core`] with the current time; then
//! the driver performs the core's [`Ready`] in a fixed order: stop handlers and abort
//! transfers, start handlers and transfers, send stanzas (adding the machine's load figures to
//! load reports). The driver decides nothing about jobs; it only knows when to give up on the
//! connection.

use std::collections::BTreeMap;
use std::future::Future;

use jid::Jid;
use rand::Rng as _;
use spine_xmpp::stanzastream::{Event, StreamEvent};
use spine_xmpp::{Connection, Status};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use xmpp_parsers::presence::Presence;

use crate::dataplane::{DataPlane, Transfer};
use crate::error::AgentError;
use crate::machine::{Core, Out, Ready, Stop};
use crate::supervisor::Supervisor;
use crate::Agent;

/// Consecutive reconnects refused for credentials before the agent gives up.
const MAX_AUTH_REFUSALS: u32 = 3;

pub(crate) async fn run(
    agent: Agent,
    shutdown: impl Future<Output = impl Sized> + Send,
) -> Result<(), AgentError> {
    let resolved = agent.config.resolve()?;
    // The scratch directory, held while the agent runs: taking it deletes what agents killed
    // on this machine left (crate::scratch). Without one, a job that needs a directory fails
    // with the reason, as it would have.
    let _scratch = match crate::scratch::root() {
        Ok(r) => Some(r),
        Err(e) => {
            warn!("{e}");
            None
        }
    };
    let opts = resolved.options.clone();
    let server = opts.addr;
    let mut conn = spine_xmpp::connect(opts).await?;
    let mut status_rx = conn
        .take_status()
        .ok_or_else(|| AgentError::Reconnect("connection status already taken".into()))?;
    info!(jid = %conn.jid(), server = %server, capabilities = agent.caps.len(), "agent connected");
    let mut ads = BTreeMap::new();
    let mut handlers = BTreeMap::new();
    let mut file_inputs = Vec::new();
    for (name, c) in agent.caps {
        if c.file_input {
            file_inputs.push(name.clone());
        }
        ads.insert(name.clone(), c.ad);
        handlers.insert(name, c.handler);
    }
    let mut core = Core::new(
        &agent.config,
        resolved.dispatchers,
        ads,
        agent.attrs,
        rand::rng().random(),
        Instant::now(),
    )
    .with_file_inputs(file_inputs);
    let state_file = agent.config.state_file.clone();
    if let Some(path) = &state_file {
        match crate::store::load_drained(path).map_err(AgentError::Config)? {
            Some(d) if d.drained => {
                warn!(
                    state_file = %path.display(),
                    reason = d.reason.as_deref().unwrap_or(""),
                    "drained by an operator before this start: taking no jobs until `spine agent undrain`"
                );
                core = core.with_drained(d.reason);
            }
            _ => {}
        }
    }
    let (mut sup, mut inbox) = Supervisor::new(handlers);
    // Stops the server of kept outputs when the agent ends, however it ends.
    let serving = tokio_util::sync::CancellationToken::new();
    let _stop_serving = serving.clone().drop_guard();
    let held = match agent.config.data_listen {
        Some(addr) => {
            let held = crate::held::start(&agent.config, addr, serving.clone()).await?;
            core.set_serves(held.url_base().to_owned());
            Some(held)
        }
        None => None,
    };
    let (mut plane, mut transfers) = DataPlane::new(crate::dataplane::client(&agent.config), held);
    // Watchers stop with the agent, however it ends.
    let watching = tokio_util::sync::CancellationToken::new();
    let _stop_watching = watching.clone().drop_guard();
    let mut sightings = crate::watch::start(&agent.config.watches, watching.clone());
    let mut acks: std::collections::HashMap<u64, tokio::sync::oneshot::Sender<crate::watch::Ack>> =
        std::collections::HashMap::new();
    let mut next_sighting = 0u64;
    core.session_started(Instant::now());
    perform(
        &conn,
        &mut sup,
        &mut plane,
        core.take_ready(),
        state_file.as_deref(),
        &mut acks,
    )
    .await;

    tokio::pin!(shutdown);
    let mut auth_refusals = 0u32;
    while !core.is_gone() {
        let wake = core.poll_timeout();
        tokio::select! {
            // Every branch is cancellation-safe: `Connection::next`, `recv` and timers keep
            // their state outside the future that lost the race.
            _ = &mut shutdown, if core.is_serving() => core.shutdown(Instant::now()),
            _ = tokio::time::sleep_until(wake) => core.tick(Instant::now()),
            ev = conn.next() => match ev {
                Some(Event::Stanza(st)) => core.stanza(st, Instant::now()),
                Some(Event::Stream(StreamEvent::Reset { bound_jid, .. })) => {
                    info!(jid = %bound_jid, "session re-established: advertising again");
                    auth_refusals = 0;
                    core.session_started(Instant::now());
                }
                Some(Event::Stream(other)) => debug!("stream event {other:?}"),
                None => {
                    error!("connection worker ended");
                    return Err(AgentError::Reconnect("the connection closed for good".into()));
                }
            },
            Some(status) = status_rx.recv() => {
                let Status::ReconnectFailed { error, auth, .. } = status;
                if auth {
                    auth_refusals += 1;
                    error!("server refuses the agent's credentials ({auth_refusals}/{MAX_AUTH_REFUSALS}): {error}");
                    if auth_refusals >= MAX_AUTH_REFUSALS {
                        return Err(AgentError::Reconnect(error));
                    }
                }
            }
            Some(done) = inbox.done.recv() => {
                sup.finished(&done.id);
                core.job_done(done, Instant::now());
            }
            Some((id, attempt, report)) = inbox.reports.recv() => core.report(id, attempt, report),
            // A full outbox leaves the next sighting in its channel: the watcher waits.
            Some(s) = sightings.recv(), if core.can_take_event() && core.is_serving() => {
                next_sighting += 1;
                acks.insert(next_sighting, s.ack);
                core.watched(next_sighting, s.event, Instant::now());
            }
            Some(t) = transfers.recv() => match t {
                Transfer::Fetched { key, result } => {
                    plane.finished(key);
                    core.fetched(key, result, Instant::now());
                }
                Transfer::Put { key, result } => {
                    plane.finished(key);
                    core.put_done(key, result, Instant::now());
                }
                Transfer::Kept { key, result } => core.kept(key, result, Instant::now()),
                Transfer::FilePut { key, result } => {
                    plane.finished(key);
                    core.file_put_done(key, result, Instant::now());
                }
                Transfer::Inlined { key, result } => core.files_inlined(key, result, Instant::now()),
            },
        }
        perform(
            &conn,
            &mut sup,
            &mut plane,
            core.take_ready(),
            state_file.as_deref(),
            &mut acks,
        )
        .await;
    }
    debug!(running = core.running(), "closing the connection");
    conn.close().await;
    Ok(())
}

/// Performs the core's effects: the operator's drain to the state file, stops and aborts, then
/// starts and transfers, then stanzas in order (a drain's answer leaves once it is kept).
async fn perform(
    conn: &Connection,
    sup: &mut Supervisor,
    plane: &mut DataPlane,
    ready: Ready,
    state_file: Option<&std::path::Path>,
    acks: &mut std::collections::HashMap<u64, tokio::sync::oneshot::Sender<crate::watch::Ack>>,
) {
    for (key, ack) in ready.acks {
        if let Some(tx) = acks.remove(&key) {
            // The watcher may have ended (shutdown): nothing waits then.
            let _ = tx.send(ack);
        }
    }
    match (&ready.save, state_file) {
        (Some(d), Some(path)) => {
            // A few bytes, synced: the connection task may wait for them.
            if let Err(e) = crate::store::save_drained(path, d) {
                error!(state_file = %path.display(), "cannot keep the drain state; it holds until this process ends: {e}");
            }
        }
        (Some(d), None) if d.drained => {
            info!("the drain holds until this process ends (no state_file to keep it across a restart)")
        }
        _ => {}
    }
    for s in ready.stops {
        match s {
            Stop::Job(id) => sup.cancel(&id),
            Stop::All => sup.stop_all(),
        }
    }
    for key in ready.aborts {
        plane.abort(key);
    }
    for s in ready.starts {
        sup.start(s);
    }
    for f in ready.fetches {
        plane.fetch(f);
    }
    for p in ready.puts {
        plane.put(p);
    }
    for k in ready.keeps {
        plane.keep(k);
    }
    for p in ready.file_puts {
        plane.put_file(p);
    }
    for i in ready.inlines {
        plane.inline(i);
    }
    if !ready.cleanups.is_empty() {
        // Deleting a large input file takes a while: not on the connection task.
        let cleanups = ready.cleanups;
        drop(tokio::task::spawn_blocking(move || {
            cleanups.into_iter().for_each(crate::files::Cleanup::delete)
        }));
    }
    for out in ready.out {
        match out {
            Out::Stanza(st) => {
                conn.send(st).await;
            }
            Out::Load {
                to,
                advertise,
                mut load,
            } => {
                load.loadavg = crate::sysload::loadavg();
                let mem = crate::sysload::memory();
                load.mem_used = mem.map(|m| m.0);
                load.mem_total = mem.map(|m| m.1);
                conn.send(presence(to, advertise.map(|a| *a), load)).await;
            }
        }
    }
}

fn presence(
    to: Jid,
    advertise: Option<spine_protocol::Advertise>,
    load: spine_protocol::Load,
) -> Presence {
    let p = Presence::available().with_to(to);
    match advertise {
        Some(a) => p.with_payload(a).with_payload(load),
        None => p.with_payload(load),
    }
}
