//! The device session state machine, used by both ends: [`DeviceSession`] in device clients and
//! [`ServerSession`] in the gateway (`docs/PROTOCOL.md` §3).
//!
//! Sans-IO: frames come in through `handle_frame`, frames to send come out of `poll_transmit`, and time comes in as
//! an argument (`handle_timeout(now)` at the instant `poll_timeout` returned). No sockets, clock or randomness.
//!
//! Delivery (§3.3): each side numbers its data frames 1, 2, 3, … and the other acknowledges them cumulatively with
//! `ACK`. A device keeps every unacknowledged data frame and sends them again, with their original numbers, after
//! it reconnects; the server applies data idempotently by (thing, incarnation, sequence number), so a retransmission is never
//! applied twice. Server → device data is numbered per session and is not retransmitted across sessions.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;

use crate::codes::{ErrorCode, GoawayReason};
use crate::error::{DecodeError, SendError, SessionError};
use crate::frame::{Credential, DataHeader, ErrorFrame, Frame, Goaway, Hello, Welcome};
use crate::{MAX_VERSION, MIN_VERSION};

/// A peer is declared dead after this many keepalive periods without receiving anything (§3.4).
fn dead_after(keepalive: Duration) -> Duration {
    keepalive * 3 / 2
}

fn keepalive_from_secs(secs: u16) -> Duration {
    Duration::from_secs(secs.into())
}

// ---------------------------------------------------------------------------------------------------------------
// Device side
// ---------------------------------------------------------------------------------------------------------------

/// What a device session is configured with.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub thing: ByteString,
    pub credential: Credential,
    /// Keepalive asked for in `HELLO`; the server's `WELCOME` decides.
    pub keepalive_secs: u16,
    /// Longest wait for `WELCOME` after the transport is up.
    pub handshake_timeout: Duration,
    /// Most unacknowledged data frames kept for retransmission, connected or not. The server's `WELCOME` may
    /// lower how many of them are in flight at once.
    pub window: usize,
    /// Random number chosen when this device's sequence numbering last started at 1; kept with the counter.
    pub incarnation: u64,
}

/// Where a device session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// No transport. Data frames sent now are kept and go out after the next `WELCOME`.
    Disconnected,
    /// `HELLO` sent, waiting for `WELCOME`.
    Handshaking,
    /// `WELCOME` received: data flows.
    Established,
    /// `GOAWAY` received: no new data is sent; acknowledgements still arrive until the server closes.
    Draining,
}

/// Something the device application must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceEvent {
    /// The session is open; unacknowledged data is being retransmitted.
    Connected(Welcome),
    /// Every data frame up to `seq` is acknowledged and was dropped from the retransmission buffer.
    Acked { seq: u64 },
    /// A data frame from the server (a property write, an event, a service request or response).
    Data(Frame),
    /// The server is draining or replaced this session; reconnect after the hint.
    Goaway(Goaway),
}

/// A device's end of a session, surviving reconnects: unacknowledged data is kept across them.
#[derive(Debug)]
pub struct DeviceSession {
    config: DeviceConfig,
    state: DeviceState,
    /// Sequence number of the next new data frame.
    next_seq: u64,
    /// Data frames sent or waiting, not yet acknowledged, oldest first.
    unacked: VecDeque<Frame>,
    /// Index in `unacked` of the first frame not yet transmitted on the current connection.
    unsent: usize,
    /// Control frames waiting to be transmitted.
    outbox: VecDeque<Frame>,
    /// Highest server data frame received and not yet acknowledged to the server.
    ack_pending: Option<u64>,
    /// Next server data sequence number expected.
    rx_expected: u64,
    window: usize,
    keepalive: Duration,
    deadline: Option<Instant>,
    last_rx: Instant,
    last_tx: Instant,
    ping_nonce: u64,
    ping_outstanding: bool,
}

impl DeviceSession {
    /// A disconnected session whose first new data frame is numbered `next_seq` (1 for a new device; a device
    /// that persists its unacknowledged data persists this counter too).
    pub fn new(config: DeviceConfig, next_seq: u64, now: Instant) -> Self {
        let window = config.window.max(1);
        let keepalive = keepalive_from_secs(config.keepalive_secs);
        DeviceSession {
            config,
            state: DeviceState::Disconnected,
            next_seq: next_seq.max(1),
            unacked: VecDeque::new(),
            unsent: 0,
            outbox: VecDeque::new(),
            ack_pending: None,
            rx_expected: 1,
            window,
            keepalive,
            deadline: None,
            last_rx: now,
            last_tx: now,
            ping_nonce: 0,
            ping_outstanding: false,
        }
    }

    pub fn state(&self) -> DeviceState {
        self.state
    }

    /// Data frames not yet acknowledged (sent or waiting).
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// Sequence number the next new data frame will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether another data frame fits the retransmission buffer (`DeviceConfig::window`).
    pub fn can_send(&self) -> bool {
        self.unacked.len() < self.config.window.max(1)
    }

    /// The transport is up: queues `HELLO` and starts the handshake deadline.
    pub fn connect(&mut self, now: Instant) {
        self.reset_connection();
        self.state = DeviceState::Handshaking;
        self.deadline = Some(now + self.config.handshake_timeout);
        self.last_rx = now;
        self.last_tx = now;
        let resume_seq = self.unacked.front().and_then(Frame::seq).unwrap_or(self.next_seq);
        self.outbox.push_back(Frame::Hello(Hello {
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            thing: self.config.thing.clone(),
            credential: self.config.credential.clone(),
            keepalive_secs: self.config.keepalive_secs,
            incarnation: self.config.incarnation,
            resume_seq,
        }));
    }

    /// The transport was lost. Unacknowledged data is kept for the next connection.
    pub fn disconnected(&mut self) {
        self.reset_connection();
        self.state = DeviceState::Disconnected;
    }

    fn reset_connection(&mut self) {
        self.outbox.clear();
        self.unsent = 0;
        self.ack_pending = None;
        self.rx_expected = 1;
        self.deadline = None;
        self.ping_outstanding = false;
    }

    /// Queues a data frame (its sequence number is assigned here and returned). In any state but a full window
    /// the frame is kept until acknowledged; it is transmitted once the session is established.
    pub fn send(&mut self, mut frame: Frame) -> Result<u64, SendError> {
        if !frame.frame_type().is_data() {
            return Err(SendError::NotData);
        }
        if !self.can_send() {
            return Err(SendError::WindowFull);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        frame.set_seq(seq);
        self.unacked.push_back(frame);
        Ok(seq)
    }

    /// Handles one frame from the server.
    pub fn handle_frame(
        &mut self,
        frame: Frame,
        now: Instant,
    ) -> Result<Option<DeviceEvent>, SessionError> {
        self.last_rx = now;
        let state = self.state;
        let unexpected = |frame: &Frame| SessionError::UnexpectedFrame {
            frame: frame.frame_type().name(),
            state: device_state_name(state),
        };
        match (state, frame) {
            (DeviceState::Disconnected, frame) => Err(unexpected(&frame)),
            (_, Frame::Error(e)) => {
                self.disconnected();
                Err(SessionError::Peer {
                    code: e.code,
                    retry_after_ms: e.retry_after_ms,
                    message: e.message.to_string(),
                })
            }
            (DeviceState::Handshaking, Frame::Welcome(welcome)) => {
                if !(MIN_VERSION..=MAX_VERSION).contains(&welcome.version) {
                    return Err(SessionError::UnsupportedVersion {
                        min: welcome.version,
                        max: welcome.version,
                    });
                }
                self.state = DeviceState::Established;
                self.deadline = None;
                self.keepalive = keepalive_from_secs(welcome.keepalive_secs);
                self.window = match welcome.window {
                    0 => self.config.window.max(1),
                    w => self.config.window.min(w as usize).max(1),
                };
                Ok(Some(DeviceEvent::Connected(welcome)))
            }
            (DeviceState::Handshaking, frame) => Err(unexpected(&frame)),
            (_, Frame::Ack { seq }) => {
                let sent = self.next_seq - 1;
                if seq > sent {
                    return Err(SessionError::AckBeyondSent { acked: seq, sent });
                }
                let mut advanced = false;
                while self.unacked.front().and_then(Frame::seq).is_some_and(|s| s <= seq) {
                    self.unacked.pop_front();
                    self.unsent = self.unsent.saturating_sub(1);
                    advanced = true;
                }
                Ok(advanced.then_some(DeviceEvent::Acked { seq }))
            }
            (_, Frame::Ping { nonce }) => {
                self.outbox.push_back(Frame::Pong { nonce });
                Ok(None)
            }
            (_, Frame::Pong { nonce }) => {
                if nonce == self.ping_nonce {
                    self.ping_outstanding = false;
                }
                Ok(None)
            }
            (_, Frame::Goaway(goaway)) => {
                self.state = DeviceState::Draining;
                Ok(Some(DeviceEvent::Goaway(goaway)))
            }
            (_, frame) if frame.frame_type().is_data() => {
                let seq = frame.seq().unwrap_or_default();
                if seq != self.rx_expected {
                    return Err(SessionError::Sequence { expected: self.rx_expected, got: seq });
                }
                self.rx_expected += 1;
                self.ack_pending = Some(seq);
                Ok(Some(DeviceEvent::Data(frame)))
            }
            (_, frame) => Err(unexpected(&frame)),
        }
    }

    /// The next frame to send, if any: control frames, then a pending `ACK`, then data not yet transmitted on this
    /// connection (oldest first; none while draining).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Frame> {
        let frame = self.outbox.pop_front().or_else(|| {
            if let Some(seq) = self.ack_pending.take() {
                return Some(Frame::Ack { seq });
            }
            // §3.3: never more than the window in flight, even when retransmitting a backlog
            if self.state != DeviceState::Established || self.unsent >= self.window {
                return None;
            }
            let frame = self.unacked.get(self.unsent).cloned()?;
            self.unsent += 1;
            Some(frame)
        })?;
        self.last_tx = now;
        Some(frame)
    }

    /// When [`DeviceSession::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            DeviceState::Disconnected => None,
            DeviceState::Handshaking => self.deadline,
            DeviceState::Established | DeviceState::Draining if self.keepalive.is_zero() => None,
            DeviceState::Established | DeviceState::Draining => {
                let dead = self.last_rx + dead_after(self.keepalive);
                if self.ping_outstanding { Some(dead) } else { Some(dead.min(self.ping_due())) }
            }
        }
    }

    /// Fires timers: the handshake deadline, sending `PING` after a keepalive of silence, and declaring the
    /// server dead. An error means the connection must be closed (then call [`DeviceSession::disconnected`]).
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        match self.state {
            DeviceState::Disconnected => Ok(()),
            DeviceState::Handshaking => match self.deadline {
                Some(deadline) if now >= deadline => Err(SessionError::HandshakeTimeout),
                _ => Ok(()),
            },
            DeviceState::Established | DeviceState::Draining => {
                if self.keepalive.is_zero() {
                    return Ok(());
                }
                if now >= self.last_rx + dead_after(self.keepalive) {
                    return Err(SessionError::KeepaliveTimeout);
                }
                if !self.ping_outstanding && now >= self.ping_due() {
                    self.ping_nonce += 1;
                    self.ping_outstanding = true;
                    self.outbox.push_back(Frame::Ping { nonce: self.ping_nonce });
                }
                Ok(())
            }
        }
    }
}

impl DeviceSession {
    /// §3.4: a `PING` goes out after one keepalive period with nothing sent or nothing received, so that a device
    /// streaming data to a server that stopped answering still finds out.
    fn ping_due(&self) -> Instant {
        self.last_tx.min(self.last_rx) + self.keepalive
    }
}

fn device_state_name(state: DeviceState) -> &'static str {
    match state {
        DeviceState::Disconnected => "disconnected",
        DeviceState::Handshaking => "handshaking",
        DeviceState::Established => "established",
        DeviceState::Draining => "draining",
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------------------------------------------

/// What a server session is configured with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Deadline for the whole handshake up to `WELCOME`, counted from when the transport was accepted (the caller
    /// passes that instant), so it covers TLS and the WebSocket upgrade too.
    pub handshake_timeout: Duration,
    /// Keepalive used when the device asks for 0.
    pub default_keepalive_secs: u16,
    /// Bounds on the keepalive a device may ask for.
    pub min_keepalive_secs: u16,
    pub max_keepalive_secs: u16,
    /// Most device data frames in flight (received, not yet acknowledged); told to the device in `WELCOME`.
    pub window: u32,
    /// Most server data frames sent and not yet acknowledged by the device.
    pub send_window: usize,
    /// Told to the device in `WELCOME`.
    pub max_frame: u32,
    pub max_batch: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            default_keepalive_secs: 60,
            min_keepalive_secs: 5,
            max_keepalive_secs: 1200,
            window: 64,
            send_window: 64,
            max_frame: crate::Limits::DEFAULT.max_frame as u32,
            max_batch: crate::Limits::DEFAULT.max_batch as u32,
        }
    }
}

/// Where a server session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Waiting for `HELLO`.
    AwaitingHello,
    /// `HELLO` received, waiting for the application to accept or refuse it.
    Authenticating,
    Established,
    /// `GOAWAY` sent: data still in flight is acknowledged, new data is still accepted (the device may have sent it
    /// before the `GOAWAY` arrived).
    Draining,
    /// `ERROR` queued or sent; nothing more is handled.
    Closed,
}

/// Something the gateway must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// A device asks to open a session: authenticate it, then [`ServerSession::accept`] or
    /// [`ServerSession::refuse`].
    Hello(Hello),
    /// A device data frame with this sequence number passed the session's checks: forward it, and call
    /// [`ServerSession::stored`] when its worker has handled it.
    Data { seq: u64 },
    /// The device acknowledged server data frames up to `seq`.
    Acked { seq: u64 },
}

/// The server's end of one device connection.
#[derive(Debug)]
pub struct ServerSession {
    config: ServerConfig,
    session_id: u64,
    state: ServerState,
    deadline: Instant,
    keepalive: Duration,
    last_rx: Instant,
    /// Next device data sequence number expected.
    rx_expected: u64,
    /// Every device data frame up to here is stored and acknowledged (or to be, see `ack_pending`).
    acked: u64,
    /// Stored flags of device data frames `acked + 1 ..rx_expected`.
    stored: VecDeque<bool>,
    ack_pending: bool,
    /// Next server data sequence number, and the highest the device acknowledged.
    tx_next: u64,
    tx_acked: u64,
    /// Version chosen at `HELLO`.
    version: u8,
    outbox: VecDeque<Frame>,
}

impl ServerSession {
    /// A session for a transport accepted at `accepted` (the handshake deadline counts from then).
    pub fn new(config: ServerConfig, session_id: u64, accepted: Instant) -> Self {
        let deadline = accepted + config.handshake_timeout;
        // a window of 0 would refuse every data frame
        let config = ServerConfig {
            window: config.window.max(1),
            send_window: config.send_window.max(1),
            ..config
        };
        ServerSession {
            keepalive: keepalive_from_secs(config.default_keepalive_secs),
            config,
            session_id,
            state: ServerState::AwaitingHello,
            deadline,
            last_rx: accepted,
            rx_expected: 1,
            acked: 0,
            stored: VecDeque::new(),
            ack_pending: false,
            tx_next: 1,
            tx_acked: 0,
            version: MAX_VERSION,
            outbox: VecDeque::new(),
        }
    }

    pub fn state(&self) -> ServerState {
        self.state
    }

    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Device data frames received and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.stored.len()
    }

    /// Server data frames sent and not yet acknowledged by the device.
    pub fn unacked_sent(&self) -> u64 {
        self.tx_next - 1 - self.tx_acked
    }

    /// The keepalive in force.
    pub fn keepalive(&self) -> Duration {
        self.keepalive
    }

    /// Handles one frame from the device. An error ends the session: send [`ServerSession::error_frame`] and close.
    pub fn handle_frame(
        &mut self,
        frame: Frame,
        now: Instant,
    ) -> Result<Option<ServerEvent>, SessionError> {
        let state = self.state;
        let unexpected = |frame: &Frame| SessionError::UnexpectedFrame {
            frame: frame.frame_type().name(),
            state: server_state_name(state),
        };
        if state == ServerState::Closed {
            return Err(SessionError::Closed);
        }
        self.last_rx = now;
        match (state, frame) {
            (_, Frame::Error(e)) => {
                self.state = ServerState::Closed;
                Err(SessionError::Peer {
                    code: e.code,
                    retry_after_ms: e.retry_after_ms,
                    message: e.message.to_string(),
                })
            }
            (ServerState::AwaitingHello, Frame::Hello(hello)) => {
                // §3.2: the highest version both sides speak
                let Some(version) = crate::common_version(hello.min_version, hello.max_version)
                else {
                    return Err(SessionError::UnsupportedVersion {
                        min: hello.min_version,
                        max: hello.max_version,
                    });
                };
                self.state = ServerState::Authenticating;
                self.version = version;
                self.rx_expected = hello.resume_seq;
                self.acked = hello.resume_seq - 1;
                let asked = hello.keepalive_secs;
                let secs = if asked == 0 {
                    self.config.default_keepalive_secs
                } else {
                    asked.clamp(self.config.min_keepalive_secs, self.config.max_keepalive_secs)
                };
                self.keepalive = keepalive_from_secs(secs);
                Ok(Some(ServerEvent::Hello(hello)))
            }
            (ServerState::AwaitingHello | ServerState::Authenticating, frame) => {
                Err(unexpected(&frame))
            }
            (_, Frame::Ping { nonce }) => {
                self.outbox.push_back(Frame::Pong { nonce });
                Ok(None)
            }
            (_, Frame::Pong { .. }) => Ok(None),
            (_, Frame::Ack { seq }) => {
                let sent = self.tx_next - 1;
                if seq > sent {
                    return Err(SessionError::AckBeyondSent { acked: seq, sent });
                }
                if seq <= self.tx_acked {
                    return Ok(None);
                }
                self.tx_acked = seq;
                Ok(Some(ServerEvent::Acked { seq }))
            }
            (_, frame) if frame.frame_type().is_data() => {
                let seq = frame.seq().unwrap_or_default();
                self.accept_data(seq).map(Some)
            }
            (_, frame) => Err(unexpected(&frame)),
        }
    }

    /// Checks a data frame's sequence number from its encoded header alone, for a gateway that forwards the frame's
    /// bytes without decoding them further.
    pub fn handle_data_header(
        &mut self,
        header: &DataHeader,
        now: Instant,
    ) -> Result<ServerEvent, SessionError> {
        match self.state {
            ServerState::Established | ServerState::Draining => {
                self.last_rx = now;
                self.accept_data(header.seq)
            }
            ServerState::Closed => Err(SessionError::Closed),
            state => Err(SessionError::UnexpectedFrame {
                frame: header.frame_type.name(),
                state: server_state_name(state),
            }),
        }
    }

    fn accept_data(&mut self, seq: u64) -> Result<ServerEvent, SessionError> {
        // §3.3: data frames arrive in order, without gaps, within the window
        if seq != self.rx_expected {
            return Err(SessionError::Sequence { expected: self.rx_expected, got: seq });
        }
        if self.stored.len() >= self.config.window as usize {
            return Err(SessionError::WindowExceeded { limit: self.config.window as usize });
        }
        self.rx_expected += 1;
        self.stored.push_back(false);
        Ok(ServerEvent::Data { seq })
    }

    /// Accepts the authenticated `HELLO`: queues `WELCOME` and returns it.
    pub fn accept(&mut self) -> Welcome {
        let welcome = Welcome {
            version: self.version,
            session_id: self.session_id,
            keepalive_secs: self.keepalive.as_secs() as u16,
            max_frame: self.config.max_frame,
            max_batch: self.config.max_batch,
            window: self.config.window,
        };
        self.state = ServerState::Established;
        self.outbox.push_back(Frame::Welcome(welcome.clone()));
        welcome
    }

    /// Refuses the session: queues an `ERROR`; the caller closes the transport after sending it.
    pub fn refuse(&mut self, code: ErrorCode, retry_after_ms: u32, message: &str) {
        self.close(code, retry_after_ms, message);
    }

    /// Ends the session with an error frame (queued; send it, then close the transport).
    pub fn close(&mut self, code: ErrorCode, retry_after_ms: u32, message: &str) {
        self.state = ServerState::Closed;
        self.outbox.push_back(Frame::Error(ErrorFrame {
            code,
            retry_after_ms,
            message: ByteString::from(message),
        }));
    }

    /// The `ERROR` frame that reports `error` to the device.
    pub fn error_frame(error: &SessionError) -> Frame {
        Frame::Error(ErrorFrame {
            code: error.code(),
            retry_after_ms: 0,
            message: error.to_string().into(),
        })
    }

    /// The `ERROR` frame that reports an undecodable frame to the device.
    pub fn decode_error_frame(error: &DecodeError) -> Frame {
        Frame::Error(ErrorFrame {
            code: error.code(),
            retry_after_ms: 0,
            message: error.to_string().into(),
        })
    }

    /// Queues `GOAWAY`: the session drains; the caller closes it once [`ServerSession::in_flight`] is 0 or its
    /// drain timeout passes.
    pub fn goaway(&mut self, reason: GoawayReason, reconnect_after_ms: u32, message: &str) {
        if matches!(self.state, ServerState::Established | ServerState::Draining) {
            self.state = ServerState::Draining;
            self.outbox.push_back(Frame::Goaway(Goaway {
                reason,
                reconnect_after_ms,
                message: ByteString::from(message),
            }));
        }
    }

    /// A worker has handled device data frame `seq`. Returns true when the cumulative acknowledgement advanced
    /// (an `ACK` is then pending). Repeated or unknown numbers are ignored.
    pub fn stored(&mut self, seq: u64) -> bool {
        if seq <= self.acked || seq >= self.rx_expected {
            return false;
        }
        let index = (seq - self.acked - 1) as usize;
        if let Some(flag) = self.stored.get_mut(index) {
            *flag = true;
        }
        let mut advanced = false;
        while self.stored.front() == Some(&true) {
            self.stored.pop_front();
            self.acked += 1;
            advanced = true;
        }
        self.ack_pending |= advanced;
        advanced
    }

    /// Marks the data frames `first..=last` as stored (`stored` for each, but only over the numbers that can be
    /// pending, so a long run costs no more than the window); true if the cumulative acknowledgement advanced.
    pub fn stored_run(&mut self, first: u64, last: u64) -> bool {
        let from = first.max(self.acked + 1);
        let to = last.min(self.rx_expected.saturating_sub(1));
        let mut advanced = false;
        for seq in from..=to {
            advanced |= self.stored(seq);
        }
        advanced
    }

    /// Stamps the next server sequence number on an encoded data frame from a worker, for sending to the device.
    pub fn stamp(&mut self, frame: &[u8]) -> Result<Bytes, SendError> {
        if !matches!(self.state, ServerState::Established | ServerState::Draining) {
            return Err(SendError::Closed);
        }
        if self.unacked_sent() >= self.config.send_window as u64 {
            return Err(SendError::WindowFull);
        }
        let stamped = DataHeader::restamp(frame, self.tx_next).map_err(|_| SendError::NotData)?;
        self.tx_next += 1;
        Ok(stamped)
    }

    /// Assigns the next server sequence number to a data frame built here (instead of one from a worker).
    pub fn send(&mut self, mut frame: Frame) -> Result<u64, SendError> {
        if !frame.frame_type().is_data() {
            return Err(SendError::NotData);
        }
        if !matches!(self.state, ServerState::Established | ServerState::Draining) {
            return Err(SendError::Closed);
        }
        if self.unacked_sent() >= self.config.send_window as u64 {
            return Err(SendError::WindowFull);
        }
        let seq = self.tx_next;
        self.tx_next += 1;
        frame.set_seq(seq);
        self.outbox.push_back(frame);
        Ok(seq)
    }

    /// The next control frame to send (`WELCOME`, `ACK`, `PONG`, `GOAWAY`, `ERROR`).
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        if let Some(frame) = self.outbox.pop_front() {
            return Some(frame);
        }
        if std::mem::take(&mut self.ack_pending) {
            return Some(Frame::Ack { seq: self.acked });
        }
        None
    }

    /// When [`ServerSession::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            ServerState::AwaitingHello | ServerState::Authenticating => Some(self.deadline),
            ServerState::Established | ServerState::Draining if !self.keepalive.is_zero() => {
                Some(self.last_rx + dead_after(self.keepalive))
            }
            _ => None,
        }
    }

    /// Fires the handshake deadline and the keepalive window. An error ends the session (see
    /// [`ServerSession::handle_frame`]).
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        match self.poll_timeout() {
            Some(at) if now >= at => Err(match self.state {
                ServerState::AwaitingHello | ServerState::Authenticating => {
                    SessionError::HandshakeTimeout
                }
                _ => SessionError::KeepaliveTimeout,
            }),
            _ => Ok(()),
        }
    }
}

fn server_state_name(state: ServerState) -> &'static str {
    match state {
        ServerState::AwaitingHello => "awaiting HELLO",
        ServerState::Authenticating => "authenticating",
        ServerState::Established => "established",
        ServerState::Draining => "draining",
        ServerState::Closed => "closed",
    }
}
