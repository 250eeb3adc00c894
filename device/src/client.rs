//! [`Client`]: a device that stays connected. It reconnects with [`Backoff`] (honouring a server's `GOAWAY` or
//! `ERROR` hint), keeps every unacknowledged data frame and sends it again after a reconnect — across reboots too
//! when it has an [`Outbox`] — and hands property writes and service calls to a [`Handler`]. The application
//! talks to it through a [`Handle`].
//!
//! Queues: [`Handle::send`] waits while the session's window (`Options::window` unacknowledged frames) is full and
//! the command queue (`Options::queue`) holds more; nothing queued is dropped. A [`Handler`]'s service answers go
//! ahead of new data when the window has room; at most `Options::window` of them wait (beyond, one is dropped and
//! its caller times out).
//!
//! [`Handle::call`] calls a service the server implements (`thingport.time`, `thingport.properties`: the server's
//! clock and this thing's properties as the server holds them, what a device reads after a reboot) and waits for
//! the answer; a call not answered within its timeout ends with [`ClientError::Timeout`].

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thingport_protocol::{
    ByteString, Credential, DeviceConfig, DeviceEvent, Event, Frame, Properties, PropertyUpdate,
    ServiceErrorCode, ServiceRequest, ServiceResponse, ServiceResult, SessionError, Value, Welcome,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::backoff::Backoff;
use crate::conn::Endpoint;
use crate::device::{Device, DeviceError};
use crate::outbox::Outbox;

/// How a [`Client`] connects and what it keeps.
#[derive(Debug, Clone)]
pub struct Options {
    pub endpoint: Endpoint,
    pub thing: String,
    pub credential: Credential,
    /// Keepalive asked for in `HELLO` (the server decides), seconds.
    pub keepalive_secs: u16,
    pub handshake_timeout: Duration,
    /// Most unacknowledged data frames kept, connected or not.
    pub window: usize,
    /// Most commands waiting for room in the window.
    pub queue: usize,
    pub backoff: Backoff,
    /// Keep unacknowledged frames in this file (store-and-forward); `None` keeps them in memory only.
    pub outbox: Option<PathBuf>,
    /// Compact the outbox file when it grows past this many bytes.
    pub outbox_compact_at: u64,
}

impl Options {
    /// Defaults: keepalive 30 s, handshake 10 s, window 1,000, queue 64, backoff 1 s doubling to 60 s, no outbox.
    pub fn new(endpoint: Endpoint, thing: impl Into<String>, credential: Credential) -> Options {
        Options {
            endpoint,
            thing: thing.into(),
            credential,
            keepalive_secs: 30,
            handshake_timeout: Duration::from_secs(10),
            window: 1_000,
            queue: 64,
            backoff: Backoff::default(),
            outbox: None,
            outbox_compact_at: 1 << 20,
        }
    }
}

/// What the application does when the server asks. Every method has a default.
pub trait Handler: Send {
    /// The session is open (again); unacknowledged frames are being sent.
    fn connected(&mut self, _welcome: &Welcome) {}

    /// The connection ended; the client reconnects after `retry_in`.
    fn disconnected(&mut self, _reason: &str, _retry_in: Duration) {}

    /// An application wrote properties of this thing.
    fn property_write(&mut self, _updates: &[PropertyUpdate]) {}

    /// An application called a service. `Some(result)` is sent back at once; `None` means the application
    /// answers later with [`Handle::respond`]. The default answers `NOT_FOUND`.
    fn service_call(&mut self, call: &ServiceRequest) -> Option<ServiceResult> {
        Some(ServiceResult::Err {
            code: ServiceErrorCode::NOT_FOUND,
            message: format!("no service {}", call.service).into(),
        })
    }

    /// A data frame from the server of another kind (an event, a service response).
    fn other(&mut self, _frame: &Frame) {}
}

/// A handler that does nothing but the defaults.
#[derive(Debug, Default)]
pub struct NoHandler;

impl Handler for NoHandler {}

/// Why a [`Handle`] call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The client stopped ([`Client::run`] returned); nothing more is sent.
    #[error("the client has stopped")]
    Stopped,
    /// The outbox could not keep the frame; it was not queued.
    #[error("outbox: {0}")]
    Outbox(#[from] std::io::Error),
    /// Only data frames (properties, events, service calls and responses) can be sent.
    #[error("not a data frame")]
    NotData,
    /// A service call got no answer within its timeout.
    #[error("no answer within the timeout")]
    Timeout,
}

type Reply = oneshot::Sender<Result<u64, ClientError>>;

/// Service calls of the application waiting for the server's answer, by call id.
#[derive(Debug, Default)]
struct Calls {
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<ServiceResult>>>,
}

impl Calls {
    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<ServiceResult>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The application's side of a [`Client`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct Handle {
    commands: mpsc::Sender<(Frame, Reply)>,
    acked: watch::Receiver<u64>,
    connected: watch::Receiver<bool>,
    calls: Arc<Calls>,
}

impl Handle {
    /// Queues a data frame; its sequence number once it is kept (in the outbox when there is one). Waits while
    /// the window is full.
    pub async fn send(&self, frame: Frame) -> Result<u64, ClientError> {
        if !frame.frame_type().is_data() {
            return Err(ClientError::NotData);
        }
        let (reply, answer) = oneshot::channel();
        self.commands.send((frame, reply)).await.map_err(|_| ClientError::Stopped)?;
        answer.await.map_err(|_| ClientError::Stopped)?
    }

    /// Reports property values.
    pub async fn properties(&self, updates: Vec<PropertyUpdate>) -> Result<u64, ClientError> {
        self.send(Frame::Properties(Properties { seq: 0, updates })).await
    }

    /// Reports an event.
    pub async fn event(
        &self,
        name: impl Into<ByteString>,
        timestamp_ms: u64,
        payload: Value,
    ) -> Result<u64, ClientError> {
        self.send(Frame::Event(Event { seq: 0, timestamp_ms, name: name.into(), payload })).await
    }

    /// Answers a service call the [`Handler`] left open.
    pub async fn respond(&self, call_id: u64, result: ServiceResult) -> Result<u64, ClientError> {
        self.send(Frame::ServiceResponse(ServiceResponse { seq: 0, call_id, result })).await
    }

    /// Calls a service the server implements (docs/PROTOCOL.md §5.5.1) and waits for its answer, at most
    /// `timeout`, which is also sent as the call's timeout.
    pub async fn call(
        &self,
        service: impl Into<ByteString>,
        params: Value,
        timeout: Duration,
    ) -> Result<ServiceResult, ClientError> {
        let call_id = self.calls.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        self.calls.waiting().insert(call_id, answer);
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let request =
            ServiceRequest { seq: 0, call_id, timeout_ms, service: service.into(), params };
        let result = tokio::time::timeout(timeout, async {
            self.send(Frame::ServiceRequest(request)).await?;
            answered.await.map_err(|_| ClientError::Stopped)
        })
        .await;
        self.calls.waiting().remove(&call_id);
        result.unwrap_or(Err(ClientError::Timeout))
    }

    /// The highest sequence number the server acknowledged (every frame up to it is stored).
    pub fn acked(&self) -> u64 {
        *self.acked.borrow()
    }

    /// Waits until every frame up to `seq` is acknowledged.
    pub async fn wait_acked(&self, seq: u64) -> Result<(), ClientError> {
        let mut acked = self.acked.clone();
        acked.wait_for(|a| *a >= seq).await.map(|_| ()).map_err(|_| ClientError::Stopped)
    }

    /// Whether the session is established now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Waits until the session is established.
    pub async fn wait_connected(&self) -> Result<(), ClientError> {
        let mut connected = self.connected.clone();
        connected.wait_for(|c| *c).await.map(|_| ()).map_err(|_| ClientError::Stopped)
    }
}

/// A device that stays connected; see the module docs.
#[derive(Debug)]
pub struct Client {
    options: Options,
    device: Device,
    outbox: Option<Outbox>,
    commands: mpsc::Receiver<(Frame, Reply)>,
    /// The handler's service answers waiting for room in the window, at most `Options::window` (beyond, an answer
    /// is dropped and its caller times out).
    answers: VecDeque<Frame>,
    acked: watch::Sender<u64>,
    connected: watch::Sender<bool>,
    calls: Arc<Calls>,
}

impl Client {
    /// A client and its handle. With `options.outbox`, the file is opened and what it kept is queued again, with
    /// its sequence numbers and incarnation; without, the device starts a new incarnation at sequence 1.
    pub fn new(options: Options) -> Result<(Client, Handle), ClientError> {
        let outbox = match &options.outbox {
            Some(path) => Some(Outbox::open(path, options.outbox_compact_at)?),
            None => None,
        };
        let incarnation = outbox.as_ref().map_or_else(|| fastrand::u64(1..), Outbox::incarnation);
        let first_seq = outbox.as_ref().map_or(1, Outbox::first_seq);
        let config = DeviceConfig {
            thing: ByteString::from(options.thing.clone()),
            credential: options.credential.clone(),
            keepalive_secs: options.keepalive_secs,
            handshake_timeout: options.handshake_timeout,
            window: options.window.max(outbox.as_ref().map_or(0, Outbox::len)),
            incarnation,
        };
        let mut device = Device::new(config, first_seq);
        if let Some(outbox) = &outbox {
            for frame in outbox.pending() {
                // numbered again from first_seq: the same numbers, in the same order
                let _ = device.session.send(frame);
            }
        }
        let (commands_tx, commands) = mpsc::channel(options.queue.max(1));
        let (acked, acked_rx) = watch::channel(first_seq - 1);
        let (connected, connected_rx) = watch::channel(false);
        // a random start: frames kept in the outbox from before a reboot carry the call ids of that run, and a late
        // answer to one of them must not complete a new call
        let first_call = fastrand::u64(1..1 << 62);
        let calls = Arc::new(Calls { next_id: AtomicU64::new(first_call), ..Calls::default() });
        let handle = Handle {
            commands: commands_tx,
            acked: acked_rx,
            connected: connected_rx,
            calls: calls.clone(),
        };
        let answers = VecDeque::new();
        Ok((Client { options, device, outbox, commands, answers, acked, connected, calls }, handle))
    }

    /// Frames kept and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.device.session.unacked()
    }

    /// Connects, reconnects, sends and answers until `shutdown` completes (then closes the connection; what is
    /// unacknowledged stays in the outbox) or every [`Handle`] is dropped and everything sent is acknowledged.
    pub async fn run(mut self, mut handler: impl Handler, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = self.options.backoff.clone();
        let mut handles_gone = false;
        loop {
            if handles_gone && self.device.session.unacked() == 0 {
                return;
            }
            let connected = tokio::select! {
                _ = &mut shutdown => return,
                connected = self.device.connect(&self.options.endpoint) => connected,
            };
            let reason = match connected {
                Ok(welcome) => {
                    backoff.reset();
                    let _ = self.connected.send(true);
                    handler.connected(&welcome);
                    let ended = tokio::select! {
                        _ = &mut shutdown => None,
                        ended = self.serve(&mut handler, &mut handles_gone) => Some(ended),
                    };
                    let _ = self.connected.send(false);
                    match ended {
                        None | Some(Ended::Done) => {
                            self.device.disconnect().await;
                            return;
                        }
                        Some(Ended::Lost(reason, hint)) => (reason, hint),
                    }
                }
                Err(e) => {
                    let hint = hint_of(&e);
                    (e.to_string(), hint)
                }
            };
            self.device.abort();
            let retry_in = backoff.next_delay().max(reason.1);
            handler.disconnected(&reason.0, retry_in);
            tracing::debug!(reason = %reason.0, ?retry_in, "disconnected");
            let wait = tokio::time::sleep(retry_in);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = &mut wait => break,
                    command = self.commands.recv(), if self.device.session.can_send() && !handles_gone => {
                        match command {
                            Some((frame, reply)) => {
                                let _ = reply.send(self.queue(frame));
                            }
                            None => handles_gone = true,
                        }
                    }
                }
            }
        }
    }

    /// Runs one established session until it ends.
    async fn serve(&mut self, handler: &mut impl Handler, handles_gone: &mut bool) -> Ended {
        let mut hint = Duration::ZERO;
        loop {
            self.queue_answers();
            if *handles_gone && self.device.session.unacked() == 0 {
                return Ended::Done;
            }
            if let Err(e) = self.device.flush().await {
                return Ended::Lost(e.to_string(), hint.max(hint_of(&e)));
            }
            tokio::select! {
                command = self.commands.recv(), if self.device.session.can_send() && !*handles_gone => {
                    match command {
                        Some((frame, reply)) => {
                            let _ = reply.send(self.queue(frame));
                        }
                        None => *handles_gone = true,
                    }
                }
                event = self.device.recv_event() => match event {
                    Ok(None) => {}
                    Ok(Some(DeviceEvent::Connected(_))) => {}
                    Ok(Some(DeviceEvent::Acked { seq })) => {
                        if let Some(outbox) = &mut self.outbox
                            && let Err(e) = outbox.acked(seq)
                        {
                            tracing::warn!(error = %e, "outbox: recording an acknowledgement");
                        }
                        let _ = self.acked.send(seq);
                    }
                    Ok(Some(DeviceEvent::Data(Frame::Properties(write)))) => {
                        handler.property_write(&write.updates);
                    }
                    Ok(Some(DeviceEvent::Data(Frame::ServiceRequest(call)))) => {
                        if let Some(result) = handler.service_call(&call) {
                            // answered before new application data, when the window has room
                            let answer = ServiceResponse { seq: 0, call_id: call.call_id, result };
                            if self.answers.len() >= self.options.window {
                                tracing::warn!("too many service answers wait for the window; one is dropped");
                            } else {
                                self.answers.push_back(Frame::ServiceResponse(answer));
                            }
                        }
                    }
                    Ok(Some(DeviceEvent::Data(Frame::ServiceResponse(response)))) => {
                        match self.calls.waiting().remove(&response.call_id) {
                            Some(caller) => {
                                let _ = caller.send(response.result);
                            }
                            None => handler.other(&Frame::ServiceResponse(response)),
                        }
                    }
                    Ok(Some(DeviceEvent::Data(frame))) => handler.other(&frame),
                    Ok(Some(DeviceEvent::Goaway(goaway))) => {
                        // no new data goes out; the server closes when it has acknowledged what it got
                        hint = Duration::from_millis(u64::from(goaway.reconnect_after_ms));
                    }
                    Err(e) => return Ended::Lost(e.to_string(), hint.max(hint_of(&e))),
                },
            }
        }
    }

    /// Keeps `frame` (in the outbox first, when there is one) and hands it to the session, which has room.
    fn queue(&mut self, mut frame: Frame) -> Result<u64, ClientError> {
        let seq = self.device.session.next_seq();
        frame.set_seq(seq);
        if let Some(outbox) = &mut self.outbox {
            outbox.append(&frame)?;
        }
        self.device.session.send(frame).map_err(|_| ClientError::NotData)
    }

    /// Queues the handler's answers that wait for room in the window.
    fn queue_answers(&mut self) {
        while self.device.session.can_send()
            && let Some(answer) = self.answers.pop_front()
        {
            if let Err(e) = self.queue(answer) {
                tracing::warn!(error = %e, "a service answer could not be kept; the caller times out");
            }
        }
    }
}

/// How one established session ended.
#[derive(Debug)]
enum Ended {
    /// Every handle is gone and everything is acknowledged.
    Done,
    /// The connection was lost; the server's hint of how long to wait.
    Lost(String, Duration),
}

/// The server's "retry after" in an `ERROR` it sent.
fn hint_of(error: &DeviceError) -> Duration {
    match error {
        DeviceError::Session(SessionError::Peer { retry_after_ms, .. }) => {
            Duration::from_millis(u64::from(*retry_after_ms))
        }
        _ => Duration::ZERO,
    }
}
