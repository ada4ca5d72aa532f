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

    /// Dials `ep` and handshakes (and sends whatever must be sent before
    /// the connection counts as up).
    fn dial(&self, ep: &Endpoint) -> impl Future<Output = Result<Dialed, ZmtpError>> + Send;

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

/// Where a client connects and how it backs off between attempts.
#[derive(Debug)]
struct Target {
    /// Where to connect.
    endpoint: Endpoint,
    /// The reconnect delays (copied fresh for each start).
    backoff: Backoff,
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
    /// Where it connects and how it retries; shared with the task.
    target: Arc<Target>,
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
            .field("endpoint", &self.target.endpoint.to_string())
            .field("started", &self.task.is_some())
            .field("connected", &self.status.is_connected())
            .finish()
    }
}

impl<L: Link> ClientTask<L> {
    /// A task for `link` connecting to `endpoint`, retrying after the
    /// delays of `backoff`; not started.
    pub(crate) fn new(endpoint: Endpoint, backoff: Backoff, link: L) -> ClientTask<L> {
        ClientTask {
            target: Arc::new(Target { endpoint, backoff }),
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
        let run = run(self.target.clone(), self.link.clone(), ctl);
        self.task = Some(rt.spawn(run));
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
async fn run<L: Link>(target: Arc<Target>, link: Arc<L>, ctl: Control) {
    let endpoint = &target.endpoint;
    let mut backoff = target.backoff.clone();
    let mut first = true;
    loop {
        if ctl.kill.is_cancelled() || (ctl.stopping.is_cancelled() && link.idle()) {
            break;
        }
        let dialed = tokio::select! {
            _ = ctl.kill.cancelled() => break,
            d = link.dial(endpoint) => d,
        };
        match dialed {
            Ok(conn) => {
                backoff.reset();
                tracing::debug!(client = L::KIND, %endpoint, reconnect = !first, "connected");
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
                tracing::debug!(client = L::KIND, %endpoint, %reason, "connection lost, reconnecting");
            }
            Err(e) => {
                tracing::debug!(client = L::KIND, %endpoint, error = %e, "connect failed");
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;
    use crate::transports::zmq::zmtp::FrameReader;

    /// A link over in-memory pipes: the first `fail` dials fail, then each
    /// dial hands out a pipe whose far end the test holds.
    #[derive(Default)]
    struct Fake {
        fail: usize,
        drains: bool,
        dials: AtomicUsize,
        reconnects: AtomicUsize,
        ends: AtomicUsize,
        peers: Mutex<Vec<DuplexStream>>,
    }

    impl Link for Fake {
        const KIND: &'static str = "fake";
        const DRAINS_ON_STOP: bool = false;

        async fn dial(&self, _: &Endpoint) -> Result<Dialed, ZmtpError> {
            if self.dials.fetch_add(1, Ordering::SeqCst) < self.fail {
                return Err(ZmtpError::Timeout);
            }
            let (ours, theirs) = tokio::io::duplex(64);
            self.peers.lock().unwrap().push(theirs);
            let (r, w) = tokio::io::split(ours);
            Ok(Dialed {
                r: Box::new(r),
                w: Box::new(w),
                reader: FrameReader::new(1024),
                info: PeerInfo::default(),
            })
        }

        fn on_connect(&self, _: &PeerInfo, reconnect: bool) {
            if reconnect {
                self.reconnects.fetch_add(1, Ordering::SeqCst);
            }
        }

        /// Ends when the peer closes its end (not final), or with Closed
        /// once stopping if the link drains.
        async fn serve(&self, mut conn: Dialed, ctl: &Control) -> Disconnect {
            let mut b = [0u8; 16];
            tokio::select! {
                _ = ctl.stopping.cancelled(), if self.drains => Disconnect::Closed,
                _ = conn.r.read(&mut b) => Disconnect::PeerClosed,
            }
        }

        fn on_end(&self) {
            self.ends.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task(fake: Fake) -> ClientTask<Fake> {
        let ep: Endpoint = "tcp://127.0.0.1:1".parse().unwrap();
        let backoff = Backoff::new(Duration::from_millis(1), 2.0, Duration::from_millis(20));
        ClientTask::new(ep, backoff, fake)
    }

    #[tokio::test]
    async fn retries_reconnects_and_stops() {
        let mut t = task(Fake {
            fail: 3,
            ..Fake::default()
        });
        assert!(!t.is_started() && !t.is_connected());
        t.start().unwrap();
        t.wait_until(Duration::from_secs(60), |_, up| up)
            .await
            .unwrap();
        assert_eq!(t.link().dials.load(Ordering::SeqCst), 4);
        assert_eq!(t.link().reconnects.load(Ordering::SeqCst), 0);
        // The peer goes away: the task marks the link down and dials again.
        let peer = t.link().peers.lock().unwrap().pop().unwrap();
        drop(peer);
        t.wait_until(Duration::from_secs(60), |l, up| {
            up && l.reconnects.load(Ordering::SeqCst) == 1
        })
        .await
        .unwrap();
        t.stop(Duration::from_secs(1)).await;
        assert!(!t.is_started() && !t.is_running() && !t.is_connected());
        assert_eq!(t.link().ends.load(Ordering::SeqCst), 1);
        // Restartable.
        t.start().unwrap();
        t.wait_until(Duration::from_secs(60), |_, up| up)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_wait_times_out_and_failed_dials_are_retried() {
        let mut t = task(Fake {
            fail: usize::MAX,
            ..Fake::default()
        });
        t.start().unwrap();
        let limit = Duration::from_millis(200);
        assert!(matches!(
            t.wait_until(limit, |_, up| up).await,
            Err(ZmqError::Timeout(l)) if l == limit
        ));
        // It kept dialling, backing off in between.
        t.wait_until(Duration::from_secs(10), |l, _| {
            l.dials.load(Ordering::SeqCst) >= 3
        })
        .await
        .unwrap();
        t.stop(Duration::from_secs(1)).await;
        assert_eq!(t.link().ends.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn start_needs_a_runtime_only_once_and_drop_ends_the_task() {
        let mut t = task(Fake::default());
        t.start().unwrap();
        t.start().unwrap();
        t.wait_until(Duration::from_secs(10), |_, up| up)
            .await
            .unwrap();
        let link = t.link.clone();
        drop(t);
        // The task was aborted: its connection's far end sees EOF.
        let mut peer = link.peers.lock().unwrap().pop().unwrap();
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), peer.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn start_outside_a_runtime_is_an_error() {
        let mut t = task(Fake::default());
        assert!(matches!(t.start(), Err(ZmqError::NotRunning(_))));
    }
}
