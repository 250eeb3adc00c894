//! Store-and-forward: the device's unacknowledged data frames in a local file, so a device that reboots sends again
//! what the server never acknowledged — with the same sequence numbers and incarnation, which the server uses to
//! drop what it did store (docs/PROTOCOL.md, resumption).
//!
//! The file is a log of records `[len u32 LE][xxh3 low 32 bits of body, u32 LE][body]`; a body is
//! `0, incarnation u64, first_seq u64` (the start; written first), `1, seq u64, frame` (a data frame, encoded as on
//! the wire) or `2, seq u64` (everything up to `seq` acknowledged). Appending a frame ends with `fdatasync`, so a
//! frame the application was told is queued survives a power cut; acknowledgements are not synced (losing one
//! only resends frames the server drops as duplicates). A torn or damaged tail is cut off on open. When the file
//! outgrows `compact_at` it is rewritten with only the unacknowledged frames (a new file renamed over the old).
//! It holds at most the session's window of frames beyond what is acknowledged.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thingport_protocol::{Frame, Limits};

const START: u8 = 0;
const FRAME: u8 = 1;
const ACKED: u8 = 2;
/// Largest record accepted when reading (a frame of the protocol's largest size and its header).
const MAX_RECORD: usize = 16 << 20;

/// A device's store-and-forward file.
#[derive(Debug)]
pub struct Outbox {
    path: PathBuf,
    file: File,
    len: u64,
    compact_at: u64,
    incarnation: u64,
    next_seq: u64,
    /// Unacknowledged frames, oldest first, with their encoding.
    pending: VecDeque<(u64, Bytes)>,
}

impl Outbox {
    /// Opens (or creates) the file at `path`. A new file gets a new random incarnation and starts at sequence 1.
    pub fn open(path: impl Into<PathBuf>, compact_at: u64) -> io::Result<Outbox> {
        let path = path.into();
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut file) => {
                file.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (state, valid) = replay(&bytes);
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        let mut outbox = Outbox {
            path,
            file,
            len: valid as u64,
            compact_at,
            incarnation: 0,
            next_seq: 1,
            pending: VecDeque::new(),
        };
        match state {
            Some(state) => {
                if valid < bytes.len() {
                    tracing::warn!(
                        path = %outbox.path.display(),
                        dropped = bytes.len() - valid,
                        "outbox: a torn or damaged tail was cut off"
                    );
                    outbox.file.set_len(valid as u64)?;
                    outbox.file.sync_data()?;
                }
                outbox.incarnation = state.incarnation;
                outbox.next_seq = state.next_seq;
                outbox.pending = state.pending;
                use std::io::Seek;
                outbox.file.seek(io::SeekFrom::End(0))?;
            }
            None => {
                if !bytes.is_empty() {
                    tracing::warn!(path = %outbox.path.display(), "outbox: unreadable; starting a new one");
                }
                outbox.incarnation = fastrand::u64(1..);
                outbox.rewrite()?;
            }
        }
        Ok(outbox)
    }

    /// The incarnation this device's sequence numbers belong to.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The sequence number of the first frame kept (or of the next new one when none is).
    pub fn first_seq(&self) -> u64 {
        self.pending.front().map_or(self.next_seq, |(seq, _)| *seq)
    }

    /// The unacknowledged frames, oldest first, with their sequence numbers set.
    pub fn pending(&self) -> impl Iterator<Item = Frame> + '_ {
        self.pending.iter().filter_map(|(_, raw)| Frame::decode(raw.clone(), &Limits::DEFAULT).ok())
    }

    /// How many frames are kept.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Keeps `frame`, whose sequence number must be the next one ([`Outbox::first_seq`] + [`Outbox::len`]), and
    /// syncs it to disk.
    pub fn append(&mut self, frame: &Frame) -> io::Result<()> {
        let seq = frame.seq().unwrap_or(0);
        if seq != self.next_seq {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("outbox: frame {seq} where {} is next", self.next_seq),
            ));
        }
        let raw = frame.to_bytes();
        let mut body = BytesMut::with_capacity(9 + raw.len());
        body.put_u8(FRAME);
        body.put_u64_le(seq);
        body.put_slice(&raw);
        self.write_record(&body)?;
        self.file.sync_data()?;
        self.pending.push_back((seq, raw));
        self.next_seq = seq + 1;
        Ok(())
    }

    /// Everything up to `seq` is acknowledged: forgotten, and the file compacted when it has grown past
    /// `compact_at`.
    pub fn acked(&mut self, seq: u64) -> io::Result<()> {
        let before = self.pending.len();
        while self.pending.front().is_some_and(|(s, _)| *s <= seq) {
            self.pending.pop_front();
        }
        if self.pending.len() == before {
            return Ok(());
        }
        if self.len >= self.compact_at {
            return self.rewrite();
        }
        let mut body = BytesMut::with_capacity(9);
        body.put_u8(ACKED);
        body.put_u64_le(seq);
        self.write_record(&body)
    }

    fn write_record(&mut self, body: &[u8]) -> io::Result<()> {
        let mut record = Vec::with_capacity(8 + body.len());
        encode_record(&mut record, body);
        self.file.write_all(&record)?;
        self.len += record.len() as u64;
        Ok(())
    }

    /// Writes a new file holding only the start and the kept frames, and renames it over the old one.
    fn rewrite(&mut self) -> io::Result<()> {
        let mut out = Vec::new();
        let mut start = BytesMut::with_capacity(17);
        start.put_u8(START);
        start.put_u64_le(self.incarnation);
        start.put_u64_le(self.first_seq());
        encode_record(&mut out, &start);
        for (seq, raw) in &self.pending {
            let mut body = BytesMut::with_capacity(9 + raw.len());
            body.put_u8(FRAME);
            body.put_u64_le(*seq);
            body.put_slice(raw);
            encode_record(&mut out, &body);
        }
        let temp = self.path.with_extension("new");
        {
            let mut file = File::create(&temp)?;
            file.write_all(&out)?;
            file.sync_all()?;
        }
        std::fs::rename(&temp, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.len = out.len() as u64;
        Ok(())
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn encode_record(out: &mut Vec<u8>, body: &[u8]) {
    out.put_u32_le(body.len() as u32);
    out.put_u32_le(xxhash_rust::xxh3::xxh3_64(body) as u32);
    out.put_slice(body);
}

#[derive(Debug)]
struct Replayed {
    incarnation: u64,
    next_seq: u64,
    pending: VecDeque<(u64, Bytes)>,
}

/// The state the records of `bytes` describe (`None` without a start record), and how many bytes were valid.
fn replay(bytes: &[u8]) -> (Option<Replayed>, usize) {
    let mut state: Option<Replayed> = None;
    let mut buf = bytes;
    let mut valid = 0;
    while buf.len() >= 8 {
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let sum = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if len > MAX_RECORD || buf.len() < 8 + len {
            break;
        }
        let body = &buf[8..8 + len];
        if xxhash_rust::xxh3::xxh3_64(body) as u32 != sum || !apply(&mut state, body) {
            break;
        }
        buf = &buf[8 + len..];
        valid += 8 + len;
    }
    (state, valid)
}

/// Applies one record; false when it makes no sense here (the file is damaged from this point).
fn apply(state: &mut Option<Replayed>, mut body: &[u8]) -> bool {
    if body.is_empty() {
        return false;
    }
    match (body.get_u8(), state.as_mut()) {
        (START, None) if body.len() == 16 => {
            let incarnation = body.get_u64_le();
            let next_seq = body.get_u64_le().max(1);
            *state = Some(Replayed { incarnation, next_seq, pending: VecDeque::new() });
            true
        }
        (FRAME, Some(state)) if body.len() > 8 => {
            let seq = body.get_u64_le();
            let raw = Bytes::copy_from_slice(body);
            let decodes = Frame::decode(raw.clone(), &Limits::DEFAULT)
                .is_ok_and(|f| f.frame_type().is_data() && f.seq() == Some(seq));
            if seq != state.next_seq || !decodes {
                return false;
            }
            state.pending.push_back((seq, raw));
            state.next_seq = seq + 1;
            true
        }
        (ACKED, Some(state)) if body.len() == 8 => {
            let seq = body.get_u64_le();
            while state.pending.front().is_some_and(|(s, _)| *s <= seq) {
                state.pending.pop_front();
            }
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "in tests a panic is a failed assertion")]

    use super::*;
    use thingport_protocol::{Event, Value};

    fn event(seq: u64, n: i64) -> Frame {
        Frame::Event(Event { seq, timestamp_ms: 1, name: "e".into(), payload: Value::Int(n) })
    }

    #[test]
    fn unacknowledged_frames_survive_a_reopen_with_their_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox");
        let incarnation = {
            let mut outbox = Outbox::open(&path, 1 << 20).unwrap();
            assert_eq!(outbox.first_seq(), 1);
            for seq in 1..=5 {
                outbox.append(&event(seq, seq as i64)).unwrap();
            }
            outbox.acked(2).unwrap();
            outbox.incarnation()
        };
        let outbox = Outbox::open(&path, 1 << 20).unwrap();
        assert_eq!(outbox.incarnation(), incarnation);
        assert_eq!(outbox.first_seq(), 3);
        let seqs: Vec<_> = outbox.pending().map(|f| f.seq().unwrap()).collect();
        assert_eq!(seqs, [3, 4, 5]);
        // out of order is refused
        let mut outbox = outbox;
        assert!(outbox.append(&event(9, 0)).is_err());
        outbox.append(&event(6, 6)).unwrap();
    }

    #[test]
    fn a_torn_tail_is_cut_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox");
        {
            let mut outbox = Outbox::open(&path, 1 << 20).unwrap();
            for seq in 1..=3 {
                outbox.append(&event(seq, 0)).unwrap();
            }
        }
        let len = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 3).unwrap();
        let mut outbox = Outbox::open(&path, 1 << 20).unwrap();
        assert_eq!(outbox.len(), 2, "the torn third frame is gone");
        outbox.append(&event(3, 0)).unwrap();
        let outbox = Outbox::open(&path, 1 << 20).unwrap();
        assert_eq!(outbox.pending().map(|f| f.seq().unwrap()).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn compaction_keeps_only_the_unacknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox");
        let mut outbox = Outbox::open(&path, 4096).unwrap();
        for seq in 1..=1000 {
            outbox.append(&event(seq, 0)).unwrap();
            outbox.acked(seq.saturating_sub(3)).unwrap();
        }
        assert!(std::fs::metadata(&path).unwrap().len() < 8192);
        let reopened = Outbox::open(&path, 4096).unwrap();
        assert_eq!(reopened.incarnation(), outbox.incarnation());
        assert_eq!(
            reopened.pending().map(|f| f.seq().unwrap()).collect::<Vec<_>>(),
            [998, 999, 1000]
        );
    }
}
