//! The one task shape of the ZeroMQ clients ([`Publisher`](super::Publisher)
//! and [`Receiver`](super::Receiver)): a background task that dials, serves
//! the connection until it ends, and dials again after a [`Backoff`] delay,
//! until the client stops it.
//!
//! [`ClientTask`] owns what both clients used to repeat: start (on the
//! current runtime), stop (graceful for a client with queued work, then
//! forced), Drop (forced), the connected state and waits on it. What differs
//! (the socket type, what a connection does, the counters) is a [`Link`].

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::dial::Dialed;
use super::endpoint::Endpoint;
use super::zmtp::{PeerInfo, ZmtpError};
use super::ZmqError;
use crate::transports::client::{Backoff, Disconnect};

/// What one kind of client does with its connections.
pub(crate) trait Link: Send + Sync + 'static {
    /// The client's kind, for logs ("publisher", "receiver").
    const KIND: &'static str;
    /// Whether `stop` lets the task finish its queued work (up to the grace
    /// time) before it is cancelled; if not, `stop` cancels at once and the
    /// grace only bounds how long the task may take to end.
    const DRAINS_ON_STOP: bool;

    /// Where the client connects (for logs).
    fn endpoint(&self) -> &Endpoint;

    /// The reconnect delays, fresh.
    fn backoff(&self) -> Backoff;

    /// Dials and handshakes (and whatever must be sent before the
    /// connection counts as up).
    fn dial(&self) -> impl Future<Output = Result<Dialed, ZmtpError>> + Send;

    /// Called once dialed, before the connection is marked up; `reconnect`
    /// is true for every connection after the first.
    fn on_connect(&self, info: &PeerInfo, reconnect: bool);

    /// Serves one connection until it ends; [`Disconnect::is_final`]
    /// reasons end the task, others make it dial again.
    fn serve(&self, conn: Dialed, ctl: &Control) -> impl Future<Output = Disconnect> + Send;

    /// Called once the connection is marked down.
    fn on_disconnect(&self) {}

    /// Whether a stopping client has nothing left to send (so it need not
    /// dial again to send it).
    fn idle(&self) -> bool {
        true
    }

    /// Called when the task ends, however it ends (except by abort).
    fn on_end(&self) {}
}

/// The connected state, shared by the client and its task.
#[derive(Debug, Default)]
pub(crate) struct Status {
    /// Whether a connection is up (handshake done).
    connected: AtomicBool,
    /// Wakes waiters on any change (connection, or what the link reports).
    changed: Notify,
}

impl Status {
    /// Whether a connection is up.
    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Marks the connection up or down (without waking waiters).
    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }

    /// Wakes everyone waiting in [`ClientTask::wait_until`].
    pub(crate) fn notify(&self) {
        self.changed.notify_waiters();
    }
}

/// What a link's `serve` gets besides its connection.
#[derive(Debug, Clone)]
pub(crate) struct Control {
    /// Cancelled when the client stops: finish queued work, then end.
    pub(crate) stopping: CancellationToken,
    /// Cancelled to end at once.
    pub(crate) kill: CancellationToken,
    /// The connected state (and its waiters).
    pub(crate) status: Arc<Status>,
}

/// A client's background task and its connected state.
pub(crate) struct ClientTask<L: Link> {
    /// What the task does; shared with it.
    link: Arc<L>,
    /// The connected state.
    status: Arc<Status>,
    /// The task while started.
    task: Option<JoinHandle<()>>,
    /// Asks the task to finish (fresh at each start).
    stopping: CancellationToken,
    /// Ends the task at once (fresh at each start).
    kill: CancellationToken,
}

impl<L: Link> std::fmt::Debug for ClientTask<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTask")
            .field("kind", &L::KIND)
            .field("endpoint", &self.link.endpoint().to_string())
            .field("started", &self.task.is_some())
            .field("connected", &self.status.is_connected())
            .finish()
    }
}

impl<L: Link> ClientTask<L> {
    /// A task for `link`, not started.
    pub(crate) fn new(link: L) -> ClientTask<L> {
        ClientTask {
            link: Arc::new(link),
            status: Arc::default(),
            task: None,
            stopping: CancellationToken::new(),
            kill: CancellationToken::new(),
        }
    }

    /// The link (the client's shared state).
    pub(crate) fn link(&self) -> &L {
        &self.link
    }

    /// Starts the task on the current tokio runtime (no-op if started).
    /// Never waits for the peer: it may come up later.
    pub(crate) fn start(&mut self) -> Result<(), ZmqError> {
        if self.task.is_some() {
            return Ok(());
        }
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| ZmqError::NotRunning("tokio runtime"))?;
        self.stopping = CancellationToken::new();
        self.kill = CancellationToken::new();
        let ctl = Control {
            stopping: self.stopping.clone(),
            kill: self.kill.clone(),
            status: self.status.clone(),
        };
        self.task = Some(rt.spawn(run(self.link.clone(), ctl)));
        Ok(())
    }

    /// Stops the task: lets it finish its queued work for up to `grace`
    /// (if the link drains on stop), then cancels it.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        if let Some(task) = self.task.take() {
            self.stopping.cancel();
            if !L::DRAINS_ON_STOP {
                self.kill.cancel();
            }
            let abort = task.abort_handle();
            if tokio::time::timeout(grace, task).await.is_err() {
                self.kill.cancel();
                abort.abort();
            }
        }
        self.status.set_connected(false);
        self.status.notify();
    }

    /// Whether `start` was called and `stop` was not (the task may have
    /// ended by itself since).
    pub(crate) fn is_started(&self) -> bool {
        self.task.is_some()
    }

    /// Whether the task is running.
    pub(crate) fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Whether a connection is up right now.
    pub(crate) fn is_connected(&self) -> bool {
        self.status.is_connected()
    }

    /// Waits up to `limit` until `f(link, connected)` holds, checking it
    /// at every change the task reports (and every 50 ms, since a
    /// notification can race the check).
    pub(crate) async fn wait_until(
        &self,
        limit: Duration,
        f: impl Fn(&L, bool) -> bool,
    ) -> Result<(), ZmqError> {
        let fut = async {
            loop {
                let changed = self.status.changed.notified();
                if f(&self.link, self.status.is_connected()) {
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), changed).await;
            }
        };
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| ZmqError::Timeout(limit))
    }
}

impl<L: Link> Drop for ClientTask<L> {
    fn drop(&mut self) {
        self.kill.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The task: dial, serve, back off, dial again, until stopped.
async fn run<L: Link>(link: Arc<L>, ctl: Control) {
    let mut backoff = link.backoff();
    let mut first = true;
    loop {
        if ctl.kill.is_cancelled() || (ctl.stopping.is_cancelled() && link.idle()) {
            break;
        }
        let dialed = tokio::select! {
            _ = ctl.kill.cancelled() => break,
            d = link.dial() => d,
        };
        match dialed {
            Ok(conn) => {
                backoff.reset();
                link.on_connect(&conn.info, !first);
                first = false;
                ctl.status.set_connected(true);
                ctl.status.notify();
                let reason = tokio::select! {
                    _ = ctl.kill.cancelled() => Disconnect::Closed,
                    r = link.serve(conn, &ctl) => r,
                };
                ctl.status.set_connected(false);
                link.on_disconnect();
                ctl.status.notify();
                if reason.is_final() {
                    break;
                }
                tracing::debug!(client = L::KIND, endpoint = %link.endpoint(), %reason, "connection lost, reconnecting");
            }
            Err(e) => {
                tracing::debug!(client = L::KIND, endpoint = %link.endpoint(), error = %e, "connect failed");
            }
        }
        if ctl.stopping.is_cancelled() {
            break;
        }
        let delay = backoff.next();
        tokio::select! {
            _ = ctl.kill.cancelled() => break,
            _ = ctl.stopping.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    link.on_end();
}
