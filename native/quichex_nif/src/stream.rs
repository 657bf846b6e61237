//! Stream operations on a connection resource, batched: the connection
//! process hands every pending write (or read) of one pass in one call.

use rustler::{Binary, Encoder, Env, ResourceArc, Term};

use crate::atoms;
use crate::connection::ConnResource;
use crate::error::{encode_quiche_error, Error, Result};
use crate::util::{unit_result, MAX_VARINT};

/// Most bytes one stream hands out per `connection_stream_recv` entry.
const MAX_RECV_CHUNK: usize = 256 << 10;
/// Most bytes all entries of one `connection_stream_recv` call hand out.
const MAX_RECV_TOTAL: usize = 1 << 20;
/// Most bytes one `connection_stream_send` call copies into quiche.
const MAX_SEND_TOTAL: usize = 1 << 20;
/// Most empty FINs written per send pass (see `write_empty_fin`).
const MAX_EMPTY_FINS_PER_PASS: usize = 16;

fn check_id(id: u64) -> Result<u64> {
    if id > MAX_VARINT {
        return Err(Error::BadArg("stream id"));
    }
    Ok(id)
}

/// Writes `[{id, data, fin?, force?}]`; returns `[{id, written} |
/// {id, {:held, written}} | {id, :done} | {id, {:error, reason}}]`.
///
/// `{:held, written}`: every byte but the last went in; the caller keeps the
/// last one and writes it with the next data or with the FIN (see
/// `hold_last_byte`). `force?` writes as given: no byte held back, and an
/// empty FIN even when quiche's send capacity is stale (see
/// `connection::write_empty_fin`).
/// `written` may be less than the data's size when flow control or the
/// send buffer is full; `:done` means nothing (not even a FIN) was taken.
#[rustler::nif]
fn connection_stream_send<'a>(
    env: Env<'a>,
    conn: ResourceArc<ConnResource>,
    writes: Vec<(u64, Binary<'a>, bool, bool)>,
) -> Result<Term<'a>> {
    let mut guard = conn.lock()?;
    let mut budget = MAX_SEND_TOTAL;
    let mut out = Vec::with_capacity(writes.len());
    for (id, data, fin, force_fin) in writes {
        let id = check_id(id)?;
        let bytes = data.as_slice();
        let len = bytes.len().min(budget);
        // Only pass FIN when the whole buffer goes in this call.
        let fin = fin && len == bytes.len();
        let res = match (len, fin) {
            (0, false) => Ok(0),
            // quiche applies an empty FIN and then reports Done when the
            // connection has send capacity (sent == 0 && cap > 0): the FIN
            // is taken. Writing it again would queue a second FIN frame.
            (0, true) => {
                if guard.fins_this_pass >= MAX_EMPTY_FINS_PER_PASS {
                    out.push((id, atoms::done()).encode(env));
                    continue;
                }
                let res = crate::connection::write_empty_fin(&mut guard, id, force_fin);
                if res.is_ok() {
                    guard.fins_this_pass += 1;
                }
                res
            }
            _ if !fin && !force_fin && hold_last_byte(&guard, id) => {
                // See hold_last_byte: all but the last byte go in now.
                match guard.conn.stream_send(id, &bytes[..len - 1], false) {
                    Ok(n) if n == len - 1 => {
                        budget -= n;
                        out.push((id, (atoms::held(), n)).encode(env));
                        continue;
                    }
                    other => other,
                }
            }
            _ => guard.conn.stream_send(id, &bytes[..len], fin),
        };
        let item = match res {
            Ok(n) => {
                budget -= n;
                (id, n).encode(env)
            }
            Err(quiche::Error::Done) => (id, atoms::done()).encode(env),
            Err(e) => (id, (atoms::error(), encode_quiche_error(env, &e))).encode(env),
        };
        out.push(item);
    }
    Ok(out.encode(env))
}

/// Whether a write without FIN should keep its last byte back.
///
/// quiche 0.30 can lose a FIN written on its own after the stream's data
/// (cloudflare/quiche#2525) once the stream can be collected, that is once
/// the peer's side is finished too (a peer FIN read, or a stream we can only
/// send on). Keeping the last byte lets the FIN that usually follows travel
/// with data, which quiche always delivers.
fn hold_last_byte(inner: &crate::connection::ConnInner, id: u64) -> bool {
    let c = &inner.conn;
    let local_uni = id & 0x2 != 0 && (id & 0x1 == 1) == c.is_server();
    local_uni || c.stream_finished(id)
}

/// Reads `[{id, max_bytes}]`; returns `{results, more?}` where results hold,
/// for each stream that had something, `{id, data, fin?}` or
/// `{id, {:error, reason}}` (reset by the peer, ...); streams with nothing to
/// read are left out. `more?` is true when the call's byte budget ran out
/// before every stream was served: call again.
#[rustler::nif]
fn connection_stream_recv<'a>(
    env: Env<'a>,
    conn: ResourceArc<ConnResource>,
    reads: Vec<(u64, usize)>,
) -> Result<Term<'a>> {
    let mut guard = conn.lock()?;
    let c = &mut guard.conn;
    let mut budget = MAX_RECV_TOTAL;
    let mut out = Vec::new();
    let mut more = false;
    for (id, max) in reads {
        let id = check_id(id)?;
        if budget == 0 {
            more = true;
            break;
        }
        let want = max.clamp(1, MAX_RECV_CHUNK).min(budget);
        let mut buf = vec![0u8; want];
        let mut filled = 0usize;
        let mut fin = false;
        let mut error = None;
        while filled < want {
            match c.stream_recv(id, &mut buf[filled..]) {
                Ok((n, f)) => {
                    filled += n;
                    if f {
                        fin = true;
                        break;
                    }
                    if n == 0 {
                        break;
                    }
                }
                Err(quiche::Error::Done) => break,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        budget -= filled;
        if let Some(e) = error {
            if filled == 0 {
                out.push((id, (atoms::error(), encode_quiche_error(env, &e))).encode(env));
                continue;
            }
        }
        if filled > 0 || fin {
            let data = crate::config::bytes_term(env, &buf[..filled]);
            out.push((id, data, fin).encode(env));
        }
    }
    Ok((out, more).encode(env))
}

/// Creates a local stream ahead of its first write so the peer's stream
/// limit is checked now: `{:error, :stream_limit}` when there is no credit.
#[rustler::nif]
fn connection_stream_open(env: Env, conn: ResourceArc<ConnResource>, id: u64) -> Term {
    let r = check_id(id).and_then(|id| {
        conn.lock()?.conn.stream_priority(id, 127, true)?;
        Ok(())
    });
    unit_result(env, r)
}

/// Shuts a direction down: `:read` sends STOP_SENDING, `:write` RESET_STREAM.
/// Shutting a side that is already finished is `:ok`.
#[rustler::nif]
fn connection_stream_shutdown<'a>(
    env: Env<'a>,
    conn: ResourceArc<ConnResource>,
    id: u64,
    direction: rustler::Atom,
    code: u64,
) -> Term<'a> {
    unit_result(env, shutdown(&conn, id, direction, code))
}

fn shutdown(conn: &ConnResource, id: u64, direction: rustler::Atom, code: u64) -> Result<()> {
    let id = check_id(id)?;
    if code > MAX_VARINT {
        return Err(Error::BadArg("error_code"));
    }
    let how = if direction == atoms::read() {
        quiche::Shutdown::Read
    } else if direction == atoms::write() {
        quiche::Shutdown::Write
    } else {
        return Err(Error::BadArg("direction"));
    };
    match conn.lock()?.conn.stream_shutdown(id, how, code) {
        Ok(()) | Err(quiche::Error::Done) | Err(quiche::Error::InvalidStreamState(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// quiche's view of one stream: `{readable?, finished?, closed?, capacity}`
/// (`finished?`: the peer's FIN was read; `capacity`: bytes writable now,
/// or an error reason for a stopped or unknown stream).
#[rustler::nif]
fn connection_stream_status<'a>(
    env: Env<'a>,
    conn: ResourceArc<ConnResource>,
    id: u64,
) -> Result<Term<'a>> {
    let id = check_id(id)?;
    let mut guard = conn.lock()?;
    let c = &mut guard.conn;
    let capacity = match c.stream_capacity(id) {
        Ok(n) => n.encode(env),
        Err(e) => (atoms::error(), encode_quiche_error(env, &e)).encode(env),
    };
    Ok((
        c.stream_readable(id),
        c.stream_finished(id),
        c.stream_closed(id),
        capacity,
    )
        .encode(env))
}

/// Which of `ids` the peer asked us to stop sending on: `[{id, code}]`.
/// Called when the STOP_SENDING counter of `connection_poll` grows. (quiche
/// lists stopped streams in `writable()`, but that is empty while the
/// connection has no send capacity, which is exactly when a writer waits.)
#[rustler::nif]
fn connection_stopped_streams(
    conn: ResourceArc<ConnResource>,
    ids: Vec<u64>,
) -> Result<Vec<(u64, u64)>> {
    let mut guard = conn.lock()?;
    let c = &mut guard.conn;
    let mut stopped = Vec::new();
    for id in ids {
        if let Err(quiche::Error::StreamStopped(code)) = c.stream_capacity(check_id(id)?) {
            stopped.push((id, code));
        }
    }
    Ok(stopped)
}
