//! [`Device`]: a [`DeviceSession`] over a [`FrameConn`] — one connection at a time, driven by the caller. What
//! the load generator runs thousands of; [`crate::Client`] adds reconnection, handlers and the outbox on top.

use std::time::Instant;

use anyhow::anyhow;
use bytes::Bytes;
use thingport_protocol::{
    DeviceConfig, DeviceEvent, DeviceSession, DeviceState, Frame, Limits, SessionError, Welcome,
};

use crate::conn::{Closed, Endpoint, FrameConn};

/// A device: a [`DeviceSession`] over a [`FrameConn`].
#[derive(Debug)]
pub struct Device {
    pub session: DeviceSession,
    conn: Option<FrameConn>,
    limits: Limits,
}

/// What ended a device's connection.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The server sent `ERROR` (or the session broke a rule): the session ended.
    #[error("session ended: {0}")]
    Session(#[from] SessionError),
    /// The connection closed.
    #[error("connection closed: {0:?}")]
    Closed(Closed),
    #[error("{0:#}")]
    Io(#[from] anyhow::Error),
}

impl Device {
    pub fn new(config: DeviceConfig, next_seq: u64) -> Device {
        Device {
            session: DeviceSession::new(config, next_seq, Instant::now()),
            conn: None,
            limits: Limits::DEFAULT,
        }
    }

    /// Connects and completes the handshake; returns the server's `WELCOME`.
    pub async fn connect(&mut self, endpoint: &Endpoint) -> Result<Welcome, DeviceError> {
        let conn = FrameConn::connect(endpoint).await?;
        self.conn = Some(conn);
        self.session.connect(Instant::now());
        loop {
            match self.next_event().await? {
                DeviceEvent::Connected(welcome) => return Ok(welcome),
                other => tracing::debug!(event = ?other, "event before WELCOME"),
            }
        }
    }

    /// Queues a data frame and sends what can be sent now.
    pub async fn send(&mut self, frame: Frame) -> Result<u64, DeviceError> {
        let seq = self.session.send(frame).map_err(|e| anyhow!("{e}"))?;
        self.flush().await?;
        Ok(seq)
    }

    /// Sends whatever the session has to send.
    pub async fn flush(&mut self) -> Result<(), DeviceError> {
        let now = Instant::now();
        let frames: Vec<Bytes> =
            std::iter::from_fn(|| self.session.poll_transmit(now)).map(|f| f.to_bytes()).collect();
        if frames.is_empty() {
            return Ok(());
        }
        let conn = self.conn.as_mut().ok_or_else(|| anyhow!("not connected"))?;
        conn.send(&frames).await?;
        Ok(())
    }

    /// Drives the session until it has an event for the application.
    pub async fn next_event(&mut self) -> Result<DeviceEvent, DeviceError> {
        loop {
            self.flush().await?;
            if let Some(event) = self.recv_event().await? {
                return Ok(event);
            }
        }
    }

    /// Waits for one frame from the server or one timer, and handles it; `None` when that produced no event for
    /// the application. Cancel-safe, so it can sit in a `select!` beside the application's own timers; call
    /// [`Device::flush`] after it to send what the session queued (acknowledgements, pings).
    pub async fn recv_event(&mut self) -> Result<Option<DeviceEvent>, DeviceError> {
        let timer = self.session.poll_timeout().map(tokio::time::Instant::from_std);
        let conn = self.conn.as_mut().ok_or_else(|| anyhow!("not connected"))?;
        let received = tokio::select! {
            received = conn.recv() => received,
            _ = async {
                match timer {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                if let Err(e) = self.session.handle_timeout(Instant::now()) {
                    self.abort();
                    return Err(e.into());
                }
                return Ok(None);
            }
        };
        let raw = match received {
            Ok(Ok(raw)) => raw,
            Ok(Err(closed)) => {
                self.abort();
                return Err(DeviceError::Closed(closed));
            }
            Err(e) => {
                self.abort();
                return Err(e.into());
            }
        };
        let frame = match Frame::decode(raw, &self.limits) {
            Ok(frame) => frame,
            Err(e) => {
                self.abort();
                return Err(anyhow!("undecodable frame from server: {e}").into());
            }
        };
        match self.session.handle_frame(frame, Instant::now()) {
            Ok(event) => Ok(event),
            Err(e) => {
                self.abort();
                Err(e.into())
            }
        }
    }

    /// Drops the connection at once; unacknowledged data stays for the next one.
    pub fn abort(&mut self) {
        self.conn = None;
        if self.session.state() != DeviceState::Disconnected {
            self.session.disconnected();
        }
    }

    /// Closes the connection; unacknowledged data stays for the next one.
    pub async fn disconnect(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.close().await;
        }
        if self.session.state() != DeviceState::Disconnected {
            self.session.disconnected();
        }
    }

    /// The underlying connection, for tests that misbehave on purpose.
    pub fn conn(&mut self) -> Option<&mut FrameConn> {
        self.conn.as_mut()
    }
}
