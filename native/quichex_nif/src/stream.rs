//! The streams the Elixir side has attached a process to, and the stream
//! operations the driver runs on them.
//!
//! Each attached stream has a read-ahead credit: how many bytes the driver
//! may read out of quiche and hand to the stream process before the process
//! gives credit back. A stream the peer opens is attached the first time the
//! driver reports something about it; a stream we open, by
//! `connection_stream_open`. A stream is detached when its process ends.

use std::collections::HashMap;

use rustler::{Encoder, Env, OwnedBinary, ResourceArc, Term};

use crate::atoms;
use crate::connection::{ConnInner, ConnResource};
use crate::error::{encode_quiche_error, Error, Result};
use crate::util::{bytes_term, unit_result, varint};

/// Most bytes one stream hands out per read.
const MAX_READ_CHUNK: usize = 256 << 10;
/// RFC 9218's default urgency, given to the peer's streams (ours get theirs
/// at `connection_stream_open`); quiche's own default sends them last.
const DEFAULT_URGENCY: u8 = 3;

pub struct Slot {
    /// Bytes the driver may still read for this stream.
    credit: u64,
    /// A STOP_SENDING for this stream was reported.
    stop_reported: bool,
    /// The stream's FIN or reset was reported: nothing more to read.
    recv_done: bool,
}

pub struct StreamTable {
    slots: HashMap<u64, Slot>,
    /// Credit a newly attached stream starts with.
    window: u64,
    /// quiche's count of STOP_SENDING frames at the last check.
    stops_seen: u64,
}

impl StreamTable {
    pub fn new(window: u64) -> StreamTable {
        StreamTable {
            slots: HashMap::new(),
            window,
            stops_seen: 0,
        }
    }

    fn attach(&mut self, id: u64) -> &mut Slot {
        let window = self.window;
        self.slots.entry(id).or_insert(Slot {
            credit: window,
            stop_reported: false,
            recv_done: false,
        })
    }

    pub fn add_credit(&mut self, id: u64, bytes: u64) {
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.credit = slot.credit.saturating_add(bytes);
        }
    }

    pub fn is_attached(&self, id: u64) -> bool {
        self.slots.contains_key(&id)
    }
}

fn is_bidi(id: u64) -> bool {
    id & 0x2 == 0
}

fn is_local(id: u64, is_server: bool) -> bool {
    (id & 0x1 == 1) == is_server
}

/// Whether we can send on the stream (bidirectional, or our own
/// unidirectional one).
fn can_send(id: u64, is_server: bool) -> bool {
    is_bidi(id) || is_local(id, is_server)
}

fn check_id(id: u64) -> Result<u64> {
    varint(id, "stream id")
}

fn check_urgency(urgency: u8) -> Result<u8> {
    if urgency > 7 {
        return Err(Error::BadArg("urgency"));
    }
    Ok(urgency)
}

/// Creates a local stream so the peer's stream limit is checked now
/// (`{:error, :stream_limit}` when there is no credit) and attaches it with
/// its RFC 9218 priority (`urgency` 0..7, lower first; `incremental`).
#[rustler::nif]
fn connection_stream_open(
    env: Env,
    conn: ResourceArc<ConnResource>,
    id: u64,
    urgency: u8,
    incremental: bool,
) -> Term {
    let r = (|| {
        let id = check_id(id)?;
        let urgency = check_urgency(urgency)?;
        let mut guard = conn.lock()?;
        let inner = &mut *guard;
        if !is_local(id, inner.conn.is_server()) {
            return Err(Error::BadArg("stream id"));
        }
        inner.conn.stream_priority(id, urgency, incremental)?;
        inner.streams.attach(id);
        Ok(())
    })();
    unit_result(env, r)
}

/// Changes a stream's RFC 9218 priority.
#[rustler::nif]
fn connection_stream_priority(
    env: Env,
    conn: ResourceArc<ConnResource>,
    id: u64,
    urgency: u8,
    incremental: bool,
) -> Term {
    let r = (|| {
        let id = check_id(id)?;
        let urgency = check_urgency(urgency)?;
        conn.lock()?
            .conn
            .stream_priority(id, urgency, incremental)?;
        Ok(())
    })();
    unit_result(env, r)
}

/// Which of `ids` quiche would take data for now (send capacity above 0).
#[rustler::nif]
fn connection_writable_streams(conn: ResourceArc<ConnResource>, ids: Vec<u64>) -> Result<Vec<u64>> {
    let mut guard = conn.lock()?;
    let c = &mut guard.conn;
    let mut writable = Vec::new();
    for id in ids {
        if matches!(c.stream_capacity(check_id(id)?), Ok(n) if n > 0) {
            writable.push(id);
        }
    }
    Ok(writable)
}

/// What the Elixir side asks of a stream before a poll.
pub enum Command {
    /// STOP_SENDING with a code; nothing more is read.
    StopReading(u64),
    /// RESET_STREAM with a code.
    Reset(u64),
    /// The stream's process ended: stop reading (with the code, if the peer
    /// has not finished) and forget the stream.
    Detach(u64),
}

pub fn decode_command(direction: rustler::Atom, code: u64) -> Result<Command> {
    let code = varint(code, "error_code")?;
    if direction == atoms::read() {
        Ok(Command::StopReading(code))
    } else if direction == atoms::write() {
        Ok(Command::Reset(code))
    } else if direction == atoms::detach() {
        Ok(Command::Detach(code))
    } else {
        Err(Error::BadArg("direction"))
    }
}

/// Applies a command. Shutting a side that is already finished, or a stream
/// quiche already collected, is not an error.
pub fn apply(inner: &mut ConnInner, id: u64, command: Command) {
    let c = &mut inner.conn;
    let ignore = |r: quiche::Result<()>| {
        let _ = r;
    };
    match command {
        Command::StopReading(code) => {
            ignore(c.stream_shutdown(id, quiche::Shutdown::Read, code));
            if let Some(slot) = inner.streams.slots.get_mut(&id) {
                slot.credit = 0;
            }
        }
        Command::Reset(code) => ignore(c.stream_shutdown(id, quiche::Shutdown::Write, code)),
        Command::Detach(code) => {
            ignore(c.stream_shutdown(id, quiche::Shutdown::Read, code));
            // A stream the peer stopped is collected by the capacity query
            // once it is complete.
            let _ = c.stream_capacity(id);
            inner.streams.slots.remove(&id);
        }
    }
}

/// STOP_SENDING reported by the peer since the last check: `[{id, code}]`.
///
/// quiche only counts them (`stopped_stream_count_remote`); when the count
/// grew, every attached stream we can send on, and every peer stream that
/// is about to be attached (`fresh`), is asked. This runs before any stream
/// is read: reading a reset stream can let quiche collect it, and the stop
/// would then be lost.
pub fn take_stops(inner: &mut ConnInner, fresh: &[u64]) -> Vec<(u64, u64)> {
    let count = inner.conn.stats().stopped_stream_count_remote;
    if count <= inner.streams.stops_seen {
        return Vec::new();
    }
    inner.streams.stops_seen = count;
    let is_server = inner.conn.is_server();
    let mut candidates: Vec<u64> = inner
        .streams
        .slots
        .iter()
        .filter(|(id, slot)| !slot.stop_reported && can_send(**id, is_server))
        .map(|(id, _)| *id)
        .collect();
    candidates.extend(fresh.iter().copied().filter(|id| can_send(*id, is_server)));
    let mut stopped = Vec::new();
    for id in candidates {
        if let Err(quiche::Error::StreamStopped(code)) = inner.conn.stream_capacity(id) {
            if !inner.streams.is_attached(id) {
                let _ = inner.conn.stream_priority(id, DEFAULT_URGENCY, true);
            }
            inner.streams.attach(id).stop_reported = true;
            stopped.push((id, code));
        }
    }
    stopped
}

/// Readable streams that have no slot yet: new streams the peer opened.
pub fn fresh_peer_streams(inner: &ConnInner, readable: &[u64]) -> Vec<u64> {
    let is_server = inner.conn.is_server();
    readable
        .iter()
        .copied()
        .filter(|id| !is_local(*id, is_server) && !inner.streams.is_attached(*id))
        .collect()
}

/// Reads one readable stream within its credit and `budget`; attaches a
/// new peer stream first. Returns the report term (`{id, data, fin?}`,
/// `{id, {:reset, code}}` or `{id, {:error, reason}}`) and the bytes read,
/// or nothing when there was nothing to hand out.
///
/// A reset, or a FIN with no data before it, is reported even without
/// credit, so the end of a stream is never held back behind flow control.
pub fn read<'a>(
    env: Env<'a>,
    inner: &mut ConnInner,
    id: u64,
    budget: usize,
) -> Option<(Term<'a>, usize)> {
    let is_server = inner.conn.is_server();
    let slot = match inner.streams.slots.get_mut(&id) {
        Some(slot) => slot,
        None if !is_local(id, is_server) => {
            let _ = inner.conn.stream_priority(id, DEFAULT_URGENCY, true);
            inner.streams.attach(id)
        }
        None => {
            // A local stream without a process is one whose process ended
            // before the peer's data came: nobody reads it.
            let _ = inner.conn.stream_shutdown(id, quiche::Shutdown::Read, 0);
            return None;
        }
    };
    if slot.recv_done {
        return None;
    }
    let credit = usize::try_from(slot.credit).unwrap_or(usize::MAX);
    let want = credit.min(MAX_READ_CHUNK).min(budget);
    let c = &mut inner.conn;
    let probe = want.max(1);
    let avail = c.stream_readable_len(id, probe);
    if want == 0 && avail > 0 {
        return None;
    }
    // When every contiguous byte fits, one more byte of room lets quiche
    // also take the FIN marker queued behind the data, so the stream stops
    // being readable (and can be collected) once its end is reported.
    let room = if avail < probe { avail + 1 } else { avail };
    let mut bin = OwnedBinary::new(room)?;
    let mut filled = 0usize;
    let mut fin = false;
    let mut failure = None;
    while filled < room {
        match c.stream_recv(id, &mut bin.as_mut_slice()[filled..]) {
            Ok((n, f)) => {
                filled += n;
                fin = f;
                if f || n == 0 {
                    break;
                }
            }
            Err(quiche::Error::Done) => break,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let slot = inner.streams.attach(id);
    slot.credit = slot.credit.saturating_sub(filled as u64);
    if filled == 0 {
        let report = match failure {
            Some(quiche::Error::StreamReset(code)) => (id, (atoms::reset(), code)).encode(env),
            Some(e) => (id, (atoms::error(), encode_quiche_error(env, &e))).encode(env),
            None if fin => (id, bytes_term(env, &[]), true).encode(env),
            None => return None,
        };
        slot.recv_done = true;
        return Some((report, 0));
    }
    // A reset behind some data is reported by the next read.
    slot.recv_done = fin;
    let data = if filled == room || bin.realloc(filled) {
        bin.release(env).encode(env)
    } else {
        bytes_term(env, &bin.as_slice()[..filled])
    };
    Some(((id, data, fin).encode(env), filled))
}

/// Writes `data` (with FIN when `fin` and every byte fits) and returns the
/// result term: the bytes written, or `{:error, reason}`. `:finished` means
/// the stream's sending side is already complete or gone (quiche no longer
/// knows it, or its FIN was already written).
pub fn write<'a>(
    env: Env<'a>,
    inner: &mut ConnInner,
    id: u64,
    data: &[u8],
    fin: bool,
) -> (Term<'a>, usize) {
    let c = &mut inner.conn;
    let finished = || (atoms::error(), atoms::finished());
    // stream_send answers Done both for "no capacity" and for a stream quiche
    // already collected; ask first so the second is never taken for the
    // first.
    match c.stream_capacity(id) {
        Err(quiche::Error::StreamStopped(code)) => {
            return ((atoms::error(), (atoms::stopped(), code)).encode(env), 0)
        }
        Err(quiche::Error::InvalidStreamState(_)) => return (finished().encode(env), 0),
        Err(e) => {
            return (
                (atoms::error(), encode_quiche_error(env, &e)).encode(env),
                0,
            )
        }
        Ok(_) => {}
    }
    match c.stream_send(id, data, fin) {
        Ok(n) => (n.encode(env), n),
        Err(quiche::Error::Done) => (0usize.encode(env), 0),
        Err(quiche::Error::StreamStopped(code)) => {
            ((atoms::error(), (atoms::stopped(), code)).encode(env), 0)
        }
        Err(quiche::Error::FinalSize) | Err(quiche::Error::InvalidStreamState(_)) => {
            (finished().encode(env), 0)
        }
        Err(e) => (
            (atoms::error(), encode_quiche_error(env, &e)).encode(env),
            0,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_id_kinds() {
        // Client-initiated bidi 0, server bidi 1, client uni 2, server uni 3.
        assert!(is_bidi(0) && is_bidi(1) && !is_bidi(2) && !is_bidi(3));
        assert!(is_local(0, false) && !is_local(0, true));
        assert!(is_local(3, true) && !is_local(3, false));
        assert!(can_send(2, false) && !can_send(2, true));
        assert!(can_send(3, true) && !can_send(3, false));
    }

    #[test]
    fn slots_start_with_the_window_and_add_credit() {
        let mut t = StreamTable::new(100);
        assert_eq!(t.attach(4).credit, 100);
        t.add_credit(4, 50);
        assert_eq!(t.slots[&4].credit, 150);
        // Credit for an unknown stream is ignored.
        t.add_credit(8, 50);
        assert!(!t.is_attached(8));
    }
}
