//! One device session on the gateway, whatever its transport: `HELLO` and authentication, then the loop that
//! forwards device data frames to the link pool, turns `STORED` into `ACK`, delivers worker frames to the device,
//! enforces keepalive and the message rate, and drains on `GOAWAY`.
//!
//! The protocol rules live in [`thingport_protocol::ServerSession`]; this module is the I/O around it.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use thingport_protocol::{
    ByteString, Credential, DataHeader, ErrorCode, Frame, FrameType, GoawayReason, Hello,
    LinkFrame, SendError, ServerEvent, ServerSession, Transport,
};
use tokio::time::Instant as TokioInstant;

use crate::Shared;
use crate::limits::{HandshakePermit, SessionPermit, TokenBucket};
use crate::metrics;
use crate::registry::{Inbox, SessionEntry};
use crate::upstream::{Busy, Pending};

/// Why a transport failed.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The device sent something the transport refuses (a text message, an oversized message).
    #[error("{message}")]
    Refused { code: ErrorCode, close: u16, message: String },
    #[error("transport: {0}")]
    Broken(String),
}

/// How a session ends, for the transport to close it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// A normal close (drain, device left).
    Normal,
    /// After an `ERROR` with this code.
    Error(ErrorCode),
    /// A WebSocket-level refusal with this close code (1003, 1009).
    WebSocket(u16, ErrorCode),
}

impl CloseCode {
    /// The WebSocket close code (`docs/PROTOCOL.md` §2.2): 4000 + 100 × class + low byte for errors.
    pub fn websocket(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::Error(code) => 4000 + 100 * (code.0 >> 8).min(9) + (code.0 & 0xff).min(99),
            CloseCode::WebSocket(close, _) => close,
        }
    }

    /// The QUIC application close code (`docs/PROTOCOL.md` §2.3).
    pub fn quic(self) -> u32 {
        match self {
            CloseCode::Normal => 0,
            CloseCode::Error(code) | CloseCode::WebSocket(_, code) => code.0.into(),
        }
    }
}

/// A device transport carrying whole frames.
pub trait DeviceIo: Send {
    /// The next frame, or `None` when the device closed. Must be cancel-safe.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Bytes>, IoError>> + Send;
    /// Sends frames in order, flushing once.
    fn send(&mut self, frames: Vec<Bytes>) -> impl Future<Output = Result<(), IoError>> + Send;
    /// Closes the transport.
    fn close(&mut self, code: CloseCode) -> impl Future<Output = ()> + Send;
}

/// What a session needs to know of its connection.
#[derive(Debug)]
pub struct Accepted {
    pub transport: Transport,
    pub peer: std::net::SocketAddr,
    /// When the connection was accepted: the handshake deadline counts from here.
    pub at: Instant,
    /// Names in the device's client certificate, if it presented one.
    pub cert_names: Vec<String>,
    pub permit: SessionPermit,
    pub handshake: HandshakePermit,
}

impl Accepted {
    pub fn transport_label(&self) -> &'static str {
        transport_label(self.transport)
    }
}

pub fn transport_label(transport: Transport) -> &'static str {
    match transport {
        Transport::Wss => "wss",
        Transport::Quic => "quic",
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Checks a `HELLO`'s credential: a token, or a client certificate naming the thing.
fn authenticate(
    shared: &Shared,
    hello: &Hello,
    cert_names: &[String],
) -> Result<(), (ErrorCode, &'static str)> {
    let token = match &hello.credential {
        Credential::Token(t) => Some(t.as_ref()),
        Credential::None => None,
    };
    if shared.revocations.load().is_revoked(&hello.thing, token) {
        return Err((ErrorCode::REVOKED, "revoked"));
    }
    match token {
        Some(token) => shared
            .tokens
            .verify(&hello.thing, token, unix_now())
            .map_err(|e| (e.code(), e.reason())),
        None if cert_names.iter().any(|n| n == &*hello.thing) => Ok(()),
        None if cert_names.is_empty() => Err((ErrorCode::AUTH_FAILED, "auth_failed")),
        None => Err((ErrorCode::THING_NOT_ALLOWED, "thing_not_allowed")),
    }
}

/// Runs a device session from its first frame to its close. `io` has finished its own handshake (TLS, upgrade).
pub async fn run<Io: DeviceIo>(shared: Arc<Shared>, mut io: Io, accepted: Accepted) {
    let label = accepted.transport_label();
    let deadline = TokioInstant::from_std(accepted.at + shared.config.limits.handshake_timeout);
    let session_id = shared.next_session_id();
    let mut session = ServerSession::new(shared.server_config.clone(), session_id, accepted.at);

    // HELLO, authentication and WELCOME, all before the handshake deadline; boxed, because this state is
    // short-lived and would otherwise stay in the task's allocation for the whole session
    let opened = tokio::time::timeout_at(
        deadline,
        Box::pin(open(&shared, &mut io, &mut session, &accepted)),
    )
    .await;
    let (thing, incarnation, inbox) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(close)) => {
            io.close(close).await;
            return;
        }
        Err(_) => {
            metrics::handshake(label, "handshake_timeout");
            send_error(
                &mut io,
                ServerSession::error_frame(&thingport_protocol::SessionError::HandshakeTimeout),
            )
            .await;
            io.close(CloseCode::Error(ErrorCode::HANDSHAKE_TIMEOUT)).await;
            return;
        }
    };
    drop(accepted.handshake);
    metrics::handshake(label, "ok");
    ::metrics::gauge!(metrics::SESSIONS_ACTIVE, "transport" => label).increment(1.0);
    tracing::debug!(session_id, thing = %thing, peer = %accepted.peer, transport = label, "session open");

    let mut driver = Driver {
        shared: &shared,
        session,
        session_id,
        incarnation,
        partition: thingport_protocol::partition::partition_of(thing.as_bytes()),
        thing: thing.clone(),
        inbox: inbox.clone(),
        rate: TokenBucket::new(
            shared.config.limits.message_rate,
            shared.config.limits.message_rate,
            Instant::now(),
        ),
        out: Vec::new(),
        draining: None,
        awaiting: VecDeque::new(),
    };
    let close = driver.run(&mut io).await;
    // sent, never acknowledged: not delivered
    for (_, link, reference) in driver.awaiting.drain(..) {
        shared.pool.undeliverable(link, session_id, reference, ErrorCode::UNAVAILABLE);
    }
    io.close(close).await;

    shared.registry.remove(session_id);
    for left in inbox.close() {
        shared.pool.undeliverable(left.link, session_id, left.reference, ErrorCode::UNAVAILABLE);
    }
    let code = match close {
        CloseCode::Normal => ErrorCode(0),
        CloseCode::Error(code) | CloseCode::WebSocket(_, code) => code,
    };
    shared.pool.send_binding(LinkFrame::Close { session_id, thing, code });
    ::metrics::gauge!(metrics::SESSIONS_ACTIVE, "transport" => label).decrement(1.0);
    drop(accepted.permit);
}

async fn send_error<Io: DeviceIo>(io: &mut Io, frame: Frame) {
    let _ = tokio::time::timeout(Duration::from_secs(1), io.send(vec![frame.to_bytes()])).await;
}

/// Reads and checks `HELLO`, authenticates, registers the session and sends `WELCOME`.
async fn open<Io: DeviceIo>(
    shared: &Shared,
    io: &mut Io,
    session: &mut ServerSession,
    accepted: &Accepted,
) -> Result<(ByteString, u64, Arc<Inbox>), CloseCode> {
    let label = accepted.transport_label();
    let raw = match io.recv().await {
        Ok(Some(raw)) => raw,
        Ok(None) => {
            metrics::handshake(label, "closed");
            return Err(CloseCode::Normal);
        }
        Err(IoError::Refused { code, close, message }) => {
            metrics::handshake(label, "malformed");
            send_error(io, error_frame(code, &message)).await;
            return Err(CloseCode::WebSocket(close, code));
        }
        Err(IoError::Broken(_)) => {
            metrics::handshake(label, "broken");
            return Err(CloseCode::Normal);
        }
    };
    // §3.2: a HELLO's versions are readable whatever follows them; when none is one this server speaks, the
    // refusal says so (UNSUPPORTED_VERSION: change the device) rather than MALFORMED_FRAME (retry)
    if let Some((min, max)) = thingport_protocol::offered_versions(&raw)
        && thingport_protocol::common_version(min, max).is_none()
    {
        metrics::handshake(label, "unsupported_version");
        let refusal = thingport_protocol::SessionError::UnsupportedVersion { min, max };
        send_error(io, ServerSession::error_frame(&refusal)).await;
        return Err(CloseCode::Error(ErrorCode::UNSUPPORTED_VERSION));
    }
    let frame = match Frame::decode(raw, &shared.limits) {
        Ok(frame) => frame,
        Err(e) => {
            metrics::handshake(label, "malformed");
            send_error(io, ServerSession::decode_error_frame(&e)).await;
            return Err(CloseCode::Error(e.code()));
        }
    };
    let hello = match session.handle_frame(frame, Instant::now()) {
        Ok(Some(ServerEvent::Hello(hello))) => hello,
        Ok(_) => unreachable_event(),
        // §5.11: the receiver of an ERROR does not reply
        Err(e @ thingport_protocol::SessionError::Peer { .. }) => {
            metrics::handshake(label, "device_error");
            return Err(CloseCode::Error(e.code()));
        }
        Err(e) => {
            metrics::handshake(
                label,
                if e.code() == ErrorCode::UNSUPPORTED_VERSION {
                    "unsupported_version"
                } else {
                    "unexpected_frame"
                },
            );
            send_error(io, ServerSession::error_frame(&e)).await;
            return Err(CloseCode::Error(e.code()));
        }
    };
    if let Err((code, reason)) = authenticate(shared, &hello, &accepted.cert_names) {
        metrics::handshake(label, reason);
        session.refuse(code, 0, &format!("{reason} for thing {}", hello.thing));
        flush_control(io, session).await.ok();
        return Err(CloseCode::Error(code));
    }
    if shared.draining() {
        metrics::handshake(label, "draining");
        let retry = shared.config.session.reconnect_hint.as_millis().min(u32::MAX.into()) as u32;
        session.refuse(ErrorCode::OVERLOADED, retry, "gateway is draining");
        flush_control(io, session).await.ok();
        return Err(CloseCode::Error(ErrorCode::OVERLOADED));
    }
    let inbox = Arc::new(Inbox::new(
        shared.config.session.send_queue_frames,
        shared.config.session.send_queue_bytes,
    ));
    let open = LinkFrame::Open {
        session_id: session.session_id(),
        thing: hello.thing.clone(),
        transport: accepted.transport,
        incarnation: hello.incarnation,
        resume_seq: hello.resume_seq,
    };
    shared.registry.insert(
        session.session_id(),
        SessionEntry {
            thing: hello.thing.clone(),
            inbox: inbox.clone(),
            opened: Instant::now(),
            open: open.clone(),
        },
    );
    shared.pool.send_binding(open);
    session.accept();
    if flush_control(io, session).await.is_err() {
        shared.registry.remove(session.session_id());
        return Err(CloseCode::Normal);
    }
    Ok((hello.thing, hello.incarnation, inbox))
}

fn unreachable_event() -> ! {
    // `handle_frame` in AwaitingHello yields Hello or an error
    unreachable!("a session awaiting HELLO produced another event")
}

fn error_frame(code: ErrorCode, message: &str) -> Frame {
    Frame::Error(thingport_protocol::ErrorFrame {
        code,
        retry_after_ms: 0,
        message: message.into(),
    })
}

async fn flush_control<Io: DeviceIo>(
    io: &mut Io,
    session: &mut ServerSession,
) -> Result<(), IoError> {
    let frames: Vec<Bytes> =
        std::iter::from_fn(|| session.poll_transmit()).map(|f| f.to_bytes()).collect();
    if frames.is_empty() {
        return Ok(());
    }
    io.send(frames).await
}

struct Driver<'a> {
    shared: &'a Shared,
    session: ServerSession,
    session_id: u64,
    /// The device's incarnation from its `HELLO`, carried in every `UPSTREAM`.
    incarnation: u64,
    /// The thing's partition, which the pool routes its frames by.
    partition: u16,
    thing: ByteString,
    inbox: Arc<Inbox>,
    rate: TokenBucket,
    /// Frames to send to the device at the next flush.
    out: Vec<Bytes>,
    /// Set by `GOAWAY`: the session closes once nothing is in flight and this instant has passed, so frames the
    /// device sent before the `GOAWAY` reached it are still received and acknowledged.
    draining: Option<TokioInstant>,
    /// Property writes sent to the device and not yet acknowledged, whose worker waits to hear (`DELIVERED`):
    /// (server sequence number, link, reference), in sequence order; at most the send window.
    awaiting: VecDeque<(u64, usize, u64)>,
}

/// How long a draining session keeps reading after `GOAWAY` before it may close.
const DRAIN_GRACE: Duration = Duration::from_millis(250);

/// What a step of the loop decided.
enum Step {
    Continue,
    Close(CloseCode),
}

impl Driver<'_> {
    async fn run<Io: DeviceIo>(&mut self, io: &mut Io) -> CloseCode {
        let mut drain = self.shared.drain.subscribe();
        let mut paused_until: Option<TokioInstant> = None;
        // One timer and one inbox wait for the session's life, not one per turn of the loop: registering a timer
        // or a waiter costs more than forwarding a frame. The timer is moved only when the session's deadline
        // comes earlier than the one it is set to; when it fires early (the session heard from its device since)
        // `handle_timeout` finds nothing due and the next turn sets it to the later deadline.
        let mut timer = std::pin::pin!(tokio::time::sleep_until(TokioInstant::now()));
        let mut armed: Option<TokioInstant> = None;
        let inbox = self.inbox.clone();
        let mut pushed = std::pin::pin!(inbox.notified());
        loop {
            if let Step::Close(code) = self.deliver() {
                self.flush(io).await.ok();
                return code;
            }
            if let Err(close) = self.flush(io).await {
                return close;
            }
            let drained = self.draining.filter(|_| self.session.in_flight() == 0);
            if drained.is_some_and(|grace| TokioInstant::now() >= grace) {
                return CloseCode::Normal;
            }
            if let Some(at) = self.session.poll_timeout().map(TokioInstant::from_std)
                && armed.is_none_or(|armed| at < armed)
            {
                timer.as_mut().reset(at);
                armed = Some(at);
            }
            let step = tokio::select! {
                biased;
                _ = sleep_until_opt(drained) => Step::Continue,
                _ = drain.changed(), if self.draining.is_none() => {
                    self.start_drain(GoawayReason::DRAINING);
                    Step::Continue
                }
                _ = pushed.as_mut() => {
                    pushed.set(inbox.notified());
                    Step::Continue
                }
                _ = timer.as_mut(), if armed.is_some() => {
                    armed = None;
                    match self.session.handle_timeout(Instant::now()) {
                    Ok(()) => Step::Continue,
                    Err(e) => {
                        metrics::closed(if e.code() == ErrorCode::KEEPALIVE_TIMEOUT { "keepalive_timeout" } else { "timeout" });
                        self.out.push(ServerSession::error_frame(&e).to_bytes());
                        Step::Close(CloseCode::Error(e.code()))
                    }
                    }
                }
                _ = sleep_until_opt(paused_until), if paused_until.is_some() => {
                    paused_until = None;
                    Step::Continue
                }
                received = io.recv(), if paused_until.is_none() => self.received(received, &mut paused_until).await,
            };
            if let Step::Close(code) = step {
                self.flush(io).await.ok();
                return code;
            }
        }
    }

    fn start_drain(&mut self, reason: GoawayReason) {
        if self.draining.is_some() {
            return;
        }
        self.draining = Some(TokioInstant::now() + DRAIN_GRACE);
        let hint =
            self.shared.config.session.reconnect_hint.as_millis().min(u32::MAX.into()) as u32;
        let message = if reason == GoawayReason::REPLACED {
            "replaced by a newer session"
        } else {
            "gateway draining"
        };
        self.session.goaway(reason, hint, message);
    }

    /// Applies what links delivered: acknowledgements, frames for the device, verdicts.
    fn deliver(&mut self) -> Step {
        let room = self
            .shared
            .server_config
            .send_window
            .saturating_sub(self.session.unacked_sent() as usize);
        let delivered = self.inbox.take(room);
        for (first, last) in delivered.stored {
            self.session.stored_run(first, last);
        }
        for item in delivered.downstream {
            let write =
                item.reference != 0 && item.frame.first() == Some(&(FrameType::Properties as u8));
            match self.session.stamp(&item.frame) {
                Ok(stamped) => {
                    if write && let Ok(Some(header)) = DataHeader::peek(&stamped) {
                        self.awaiting.push_back((header.seq, item.link, item.reference));
                    }
                    metrics::per_frame().frames_downstream.increment(1);
                    metrics::per_frame().bytes_downstream.increment(stamped.len() as u64);
                    self.out.push(stamped);
                }
                Err(SendError::NotData) => {
                    metrics::dropped("not_data");
                    self.shared.pool.undeliverable(
                        item.link,
                        self.session_id,
                        item.reference,
                        ErrorCode::MALFORMED_FRAME,
                    );
                }
                Err(_) => {
                    self.shared.pool.undeliverable(
                        item.link,
                        self.session_id,
                        item.reference,
                        ErrorCode::UNAVAILABLE,
                    );
                }
            }
        }
        if let Some((seq, code)) = delivered.rejected {
            metrics::closed("rejected");
            let message = format!("data frame {seq} rejected by the application server");
            self.out.push(error_frame(code, &message).to_bytes());
            return Step::Close(CloseCode::Error(code));
        }
        if delivered.overflowed {
            metrics::closed("slow_consumer");
            self.out.push(
                error_frame(ErrorCode::SLOW_CONSUMER, "send queue full of service traffic")
                    .to_bytes(),
            );
            return Step::Close(CloseCode::Error(ErrorCode::SLOW_CONSUMER));
        }
        if delivered.replaced {
            metrics::closed("replaced");
            self.start_drain(GoawayReason::REPLACED);
        }
        Step::Continue
    }

    async fn flush<Io: DeviceIo>(&mut self, io: &mut Io) -> Result<(), CloseCode> {
        while let Some(frame) = self.session.poll_transmit() {
            self.out.push(frame.to_bytes());
        }
        if self.out.is_empty() {
            return Ok(());
        }
        let frames = std::mem::take(&mut self.out);
        // a device that does not read is cut off after one keepalive period
        let limit = self.session.keepalive().max(Duration::from_secs(5));
        match tokio::time::timeout(limit, io.send(frames)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => {
                metrics::closed("transport");
                Err(CloseCode::Normal)
            }
            Err(_) => {
                metrics::closed("slow_consumer");
                Err(CloseCode::Error(ErrorCode::SLOW_CONSUMER))
            }
        }
    }

    async fn received(
        &mut self,
        received: Result<Option<Bytes>, IoError>,
        paused: &mut Option<TokioInstant>,
    ) -> Step {
        let raw = match received {
            Ok(Some(raw)) => raw,
            Ok(None) => {
                metrics::closed("device_closed");
                return Step::Close(CloseCode::Normal);
            }
            Err(IoError::Refused { code, close, message }) => {
                metrics::closed("malformed");
                self.out.push(error_frame(code, &message).to_bytes());
                return Step::Close(CloseCode::WebSocket(close, code));
            }
            Err(IoError::Broken(_)) => {
                metrics::closed("transport");
                return Step::Close(CloseCode::Normal);
            }
        };
        let now = Instant::now();
        let frame = match Frame::decode(raw.clone(), &self.shared.limits) {
            Ok(frame) => frame,
            Err(e) => {
                metrics::closed("malformed");
                self.out.push(ServerSession::decode_error_frame(&e).to_bytes());
                return Step::Close(CloseCode::Error(e.code()));
            }
        };
        let is_data = frame.frame_type().is_data();
        match self.session.handle_frame(frame, now) {
            Ok(Some(ServerEvent::Data { seq })) => {
                metrics::per_frame().frames_upstream.increment(1);
                metrics::per_frame().bytes_upstream.increment(raw.len() as u64);
                if is_data {
                    let wait = self.rate.take(now);
                    if !wait.is_zero() {
                        *paused = Some(TokioInstant::from_std(now + wait));
                    }
                }
                self.forward(seq, raw).await
            }
            Ok(Some(ServerEvent::Acked { seq })) => {
                while let Some(&(sent, link, reference)) = self.awaiting.front()
                    && sent <= seq
                {
                    self.awaiting.pop_front();
                    self.shared.pool.delivered(link, self.session_id, reference);
                }
                Step::Continue
            }
            Ok(_) => Step::Continue,
            // §5.11: the receiver of an ERROR does not reply
            Err(e @ thingport_protocol::SessionError::Peer { .. }) => {
                metrics::closed("device_error");
                Step::Close(CloseCode::Error(e.code()))
            }
            Err(e) => {
                metrics::closed("protocol_error");
                self.out.push(ServerSession::error_frame(&e).to_bytes());
                Step::Close(CloseCode::Error(e.code()))
            }
        }
    }

    /// Hands a data frame to the pool, waiting (and not reading) while no link can take it.
    async fn forward(&mut self, seq: u64, frame: Bytes) -> Step {
        let pending = Pending {
            session_id: self.session_id,
            incarnation: self.incarnation,
            partition: self.partition,
            seq,
            thing: self.thing.clone(),
            frame,
            sent: Instant::now(),
        };
        let give_up = Instant::now() + self.session.keepalive().max(Duration::from_secs(5));
        loop {
            match self.shared.pool.send(pending.clone()) {
                Ok(()) => return Step::Continue,
                Err(Busy) if Instant::now() < give_up => {
                    self.shared.pool.wait_ready(Duration::from_millis(50)).await;
                }
                Err(Busy) => {
                    metrics::closed("unavailable");
                    let frame = thingport_protocol::ErrorFrame {
                        code: ErrorCode::UNAVAILABLE,
                        retry_after_ms: 1_000,
                        message: "no application server can take data now".into(),
                    };
                    self.out.push(Frame::Error(frame).to_bytes());
                    return Step::Close(CloseCode::Error(ErrorCode::UNAVAILABLE));
                }
            }
        }
    }
}

async fn sleep_until_opt(at: Option<TokioInstant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_follow_the_specification() {
        assert_eq!(CloseCode::Error(ErrorCode::FRAME_TOO_LARGE).websocket(), 4303);
        assert_eq!(CloseCode::Error(ErrorCode::OVERLOADED).websocket(), 4101);
        assert_eq!(CloseCode::Error(ErrorCode::AUTH_FAILED).websocket(), 4201);
        assert_eq!(CloseCode::Normal.websocket(), 1000);
        assert_eq!(CloseCode::Error(ErrorCode::AUTH_FAILED).quic(), 0x0201);
    }
}
