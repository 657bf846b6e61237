//! The NIF side of one driver pass, in two calls:
//!
//! * `connection_poll` takes the input of the pass (every datagram of one
//!   socket read, the timer, read credit and stream commands from the stream
//!   processes) and reports what changed: handshake state, STOP_SENDING, and
//!   the data read ahead for each readable stream within its credit.
//! * `connection_flush` writes the pending stream data and returns all
//!   output of the pass as GSO-ready batches, with quiche's next timer.
//!
//! Both bound their work so a call stays well under a millisecond.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustler::{Atom, Binary, Encoder, Env, NifMap, ResourceArc, Term};

use crate::connection::{ConnInner, ConnResource};
use crate::error::Result;
use crate::stream;
use crate::util::{bytes_term, ceil_millis, decode_addr, encode_addr};
use crate::wire;

/// Most bytes one poll reads out of all streams together.
const MAX_READ_TOTAL: usize = 1 << 20;
/// Most bytes one flush copies into quiche.
const MAX_WRITE_TOTAL: usize = 1 << 20;
/// Largest UDP payload one GSO send may carry (IPv4 limit, rounded down).
const MAX_GSO_BYTES: usize = 65_000;
/// Most segments one GSO send may carry (the kernel's UDP_MAX_SEGMENTS).
const MAX_GSO_SEGMENTS: usize = 64;
/// Most packets one flush produces.
const MAX_SEND_PACKETS: usize = 256;
/// Most datagrams (RFC 9221) one poll reads.
const MAX_DGRAMS_READ: usize = 1024;

thread_local! {
    /// Packet buffer shared by every connection handled on this scheduler
    /// thread (a NIF call runs start to end on one thread), so an idle
    /// connection holds no buffer of its own.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[derive(NifMap)]
struct Poll<'a> {
    established: bool,
    draining: bool,
    closed: bool,
    /// STOP_SENDING from the peer: `[{id, code}]`.
    stopped: Vec<(u64, u64)>,
    /// `[{id, data, fin?} | {id, {:reset, code}} | {id, {:error, reason}}]`.
    reads: Vec<Term<'a>>,
    /// The read budget ran out before every readable stream was served.
    more: bool,
    peer_streams_left_bidi: u64,
    peer_streams_left_uni: u64,
    /// DATAGRAM payloads received, in order.
    dgrams: Vec<Term<'a>>,
    /// Datagrams quiche dropped because its receive queue was full, so far.
    dgrams_dropped: u64,
    /// Packets declared lost so far.
    packets_lost: usize,
    /// Why a key log or qlog failed, reported once.
    log_failure: Option<String>,
    /// Path events (see paths::take_events).
    path_events: Vec<Term<'a>>,
    /// Our connection IDs the peer retired (to unroute).
    retired_cids: Vec<Term<'a>>,
    /// How many more connection IDs the peer accepts from us.
    scids_left: usize,
    /// How many spare connection IDs of the peer's we hold (a client needs
    /// one to probe or migrate to a new path).
    dcids_left: usize,
    /// A session ticket newer than the last one reported (clients).
    session: Option<Term<'a>>,
    in_early_data: bool,
}

/// One poll: `packets` is `[{from, data, segment_size}]` (a non-zero segment
/// size splits a GRO buffer into its datagrams) received on the local
/// address `to` (nil: the connection's first), `timer` says quiche's timer
/// fired, `credits` is `[{stream_id, bytes}]` of read credit given back,
/// `commands` is `[{stream_id, :read | :write | :detach, error_code}]`.
#[rustler::nif]
fn connection_poll<'a>(
    env: Env<'a>,
    conn: ResourceArc<ConnResource>,
    packets: Vec<(Term<'a>, Binary<'a>, usize)>,
    to: Term<'a>,
    timer: bool,
    credits: Vec<(u64, u64)>,
    commands: Vec<(u64, Atom, u64)>,
) -> Result<Poll<'a>> {
    // Decode everything before touching the connection.
    let commands = commands
        .into_iter()
        .map(|(id, dir, code)| {
            Ok((
                crate::util::varint(id, "stream id")?,
                stream::decode_command(dir, code)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let packets = packets
        .into_iter()
        .map(|(from, data, seg)| Ok((decode_addr(from)?, data, seg)))
        .collect::<Result<Vec<_>>>()?;
    // nil: the connection's own local address.
    let to = if to.is_atom() {
        None
    } else {
        Some(decode_addr(to)?)
    };

    let mut guard = conn.lock()?;
    let inner = &mut *guard;
    for (id, command) in commands {
        stream::apply(inner, id, command);
    }
    receive(inner, &packets, to);
    if timer {
        inner.conn.on_timeout();
    }
    for (id, bytes) in credits {
        inner.streams.add_credit(id, bytes);
    }

    let readable: Vec<u64> = inner.conn.readable().collect();
    let fresh = stream::fresh_peer_streams(inner, &readable);
    let stopped = stream::take_stops(inner, &fresh);
    let mut reads = Vec::new();
    let mut budget = MAX_READ_TOTAL;
    let mut more = false;
    for id in readable {
        if budget == 0 {
            more = true;
            break;
        }
        if let Some((report, n)) = stream::read(env, inner, id, budget) {
            budget -= n;
            reads.push(report);
        }
    }

    let dgrams = read_dgrams(env, inner);
    let log_failure = inner.logs.take_failure();
    let path_events = crate::paths::take_events(env, inner);
    let retired_cids = crate::paths::take_retired(env, inner);
    let session = new_session(env, inner);
    let c = &inner.conn;
    let stats = c.stats();
    let queued = c.dgram_recv_queue_len() as u64;
    Ok(Poll {
        path_events,
        retired_cids,
        scids_left: c.scids_left(),
        dcids_left: c.available_dcids(),
        session,
        in_early_data: c.is_in_early_data(),
        dgrams,
        dgrams_dropped: (stats.dgram_recv as u64).saturating_sub(inner.dgrams_read + queued),
        packets_lost: stats.lost,
        log_failure,
        established: c.is_established(),
        draining: c.is_draining(),
        closed: c.is_closed(),
        stopped,
        reads,
        more,
        peer_streams_left_bidi: c.peer_streams_left_bidi(),
        peer_streams_left_uni: c.peer_streams_left_uni(),
    })
}

/// Takes received DATAGRAM payloads out of quiche's queue.
fn read_dgrams<'a>(env: Env<'a>, inner: &mut ConnInner) -> Vec<Term<'a>> {
    let mut out = Vec::new();
    while out.len() < MAX_DGRAMS_READ {
        let Some(len) = inner.conn.dgram_recv_front_len() else {
            break;
        };
        let Some(mut bin) = rustler::OwnedBinary::new(len) else {
            break;
        };
        match inner.conn.dgram_recv(bin.as_mut_slice()) {
            Ok(n) if n == len => {
                inner.dgrams_read += 1;
                out.push(bin.release(env).encode(env));
            }
            _ => break,
        }
    }
    out
}

/// The session ticket, when quiche has one newer than the last reported.
fn new_session<'a>(env: Env<'a>, inner: &mut ConnInner) -> Option<Term<'a>> {
    let session = inner.conn.session()?;
    if inner.session_reported.as_deref() == Some(session) {
        return None;
    }
    inner.session_reported = Some(session.to_vec());
    Some(bytes_term(env, session))
}

/// Feeds received datagrams to quiche. Every datagram given is processed
/// (dropping some would be silent loss); the caller bounds the batch
/// (`Quichex.Connection.UDP` reads a few hundred datagrams at most).
fn receive(inner: &mut ConnInner, packets: &[(SocketAddr, Binary, usize)], to: Option<SocketAddr>) {
    let to = to.unwrap_or(inner.local);
    for (from, data, seg) in packets {
        let bytes = data.as_slice();
        if let Some(amp) = inner.amp.as_mut().filter(|a| a.peer == *from) {
            amp.received += bytes.len() as u64;
        }
        for datagram in wire::datagrams(bytes, *seg) {
            // quiche 0.30 drops the rest of a datagram after a coalesced
            // packet it cannot decrypt (e.g. a Handshake packet once the
            // Handshake keys are gone), losing a CONNECTION_CLOSE behind it.
            // RFC 9000 section 12.2 asks receivers to try every packet, so
            // feed them one by one.
            for packet in wire::packets(datagram) {
                let info = quiche::RecvInfo { from: *from, to };
                let was_closed = inner.conn.is_closed();
                SCRATCH.with_borrow_mut(|scratch| {
                    scratch.clear();
                    scratch.extend_from_slice(packet);
                    // A packet quiche rejects is dropped, as the RFC asks.
                    let _ = inner.conn.recv(scratch, info);
                });
                // quiche closes silently, with no error, only when a packet
                // is the peer's stateless reset.
                let c = &inner.conn;
                if !was_closed
                    && c.is_closed()
                    && c.peer_error().is_none()
                    && c.local_error().is_none()
                    && !c.is_timed_out()
                {
                    inner.stateless_reset = true;
                }
            }
        }
    }
    if inner.conn.is_established() {
        inner.amp = None;
    }
}

#[derive(NifMap)]
struct Flush<'a> {
    /// One result per write given, in order: bytes written or `{:error, reason}`.
    writes: Vec<Term<'a>>,
    /// `[{from, to, data, segment_size, delay_us}]`: every segment of `data`
    /// but the last has exactly `segment_size` bytes, ready for one GSO send
    /// from the local address `from`, `delay_us` microseconds from now
    /// (quiche's pacing; 0: now).
    batches: Vec<Term<'a>>,
    /// The packet budget ran out before quiche had nothing left to send.
    more: bool,
    /// quiche's next timer, in milliseconds.
    timeout: Option<u64>,
    closed: bool,
    /// The largest DATAGRAM payload that fits now; nil when the peer does
    /// not accept datagrams (or the handshake has not told yet).
    dgram_max: Option<usize>,
    /// DATAGRAMs waiting in quiche's send queue.
    dgram_queued: usize,
    /// DATAGRAMs given that quiche refused (too big for the path now).
    dgrams_refused: usize,
    /// 0-RTT keys are in use: a client may send early data.
    in_early_data: bool,
}

/// Writes `[{stream_id, data, fin?}]` (several writes for one stream go in
/// order; after one that did not fit, the rest of that stream's get 0),
/// queues the DATAGRAM payloads `dgrams`, and runs quiche's send loop for at
/// most `max_packets` packets, so datagrams leave in the same GSO batches as
/// stream data.
#[rustler::nif]
fn connection_flush<'a>(
    env: Env<'a>,
    conn: ResourceArc<ConnResource>,
    writes: Vec<(u64, Binary<'a>, bool)>,
    dgrams: Vec<Binary<'a>>,
    max_packets: usize,
) -> Result<Flush<'a>> {
    let writes = writes
        .into_iter()
        .map(|(id, data, fin)| Ok((crate::util::varint(id, "stream id")?, data, fin)))
        .collect::<Result<Vec<_>>>()?;
    let mut guard = conn.lock()?;
    let inner = &mut *guard;

    let mut results = Vec::with_capacity(writes.len());
    let mut budget = MAX_WRITE_TOTAL;
    let mut blocked: Vec<u64> = Vec::new();
    for (id, data, fin) in writes {
        let bytes = data.as_slice();
        if blocked.contains(&id) {
            results.push(0usize.encode(env));
            continue;
        }
        let len = bytes.len().min(budget);
        // FIN only with the last byte.
        let (report, written) =
            stream::write(env, inner, id, &bytes[..len], fin && len == bytes.len());
        budget -= written;
        if written < bytes.len() {
            blocked.push(id);
        }
        results.push(report);
    }

    let mut dgrams_refused = 0;
    for dgram in &dgrams {
        if inner.conn.dgram_send(dgram.as_slice()).is_err() {
            dgrams_refused += 1;
        }
    }

    let max_packets = max_packets.clamp(1, MAX_SEND_PACKETS);
    let mtu = inner.conn.max_send_udp_payload_size().max(1200);
    let needed = max_packets * mtu;
    let mut more = true;
    let batches: Vec<Term> = SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < needed {
            scratch.resize(needed, 0);
        }
        let batches = send_batches(inner, scratch, max_packets, mtu, &mut more);
        let now = Instant::now();
        batches
            .iter()
            .map(|b| {
                let data = bytes_term(env, &scratch[b.start..b.start + b.len]);
                let delay = b.at.saturating_duration_since(now).as_micros() as u64;
                (
                    encode_addr(env, &b.from),
                    encode_addr(env, &b.to),
                    data,
                    b.seg,
                    delay,
                )
                    .encode(env)
            })
            .collect()
    });
    Ok(Flush {
        writes: results,
        batches,
        more,
        timeout: inner.conn.timeout().map(ceil_millis),
        closed: inner.conn.is_closed(),
        dgram_max: inner.conn.dgram_max_writable_len(),
        dgram_queued: inner.conn.dgram_send_queue_len(),
        dgrams_refused,
        in_early_data: inner.conn.is_in_early_data(),
    })
}

struct Batch {
    from: SocketAddr,
    to: SocketAddr,
    start: usize,
    len: usize,
    seg: usize,
    count: usize,
    /// When quiche's pacer wants the batch's first packet sent.
    at: Instant,
}

/// Packets whose pacing times are this close go out in one batch.
const PACING_GRANULARITY: Duration = Duration::from_millis(1);

/// Runs quiche's send loop into `buf`, grouping packets into GSO batches:
/// a batch ends at a packet shorter than its segment size, a new
/// destination, 64 segments, 65,000 bytes or quiche's send quantum (the
/// burst its pacer allows), or a packet paced more than a millisecond after
/// the batch's first. Sets `more` to false when quiche has nothing left to
/// send.
fn send_batches(
    inner: &mut ConnInner,
    buf: &mut [u8],
    max_packets: usize,
    mtu: usize,
    more: &mut bool,
) -> Vec<Batch> {
    let mut batches: Vec<Batch> = Vec::new();
    let mut off = 0usize;
    let quantum = inner.conn.send_quantum().min(MAX_GSO_BYTES).max(mtu);
    for _ in 0..max_packets {
        // Before the client's address is validated, no datagram may go past
        // the budget: quiche gets a buffer no larger than what is left.
        let room = match &inner.amp {
            Some(amp) => usize::try_from(amp.left()).unwrap_or(usize::MAX).min(mtu),
            None => mtu,
        };
        if room == 0 {
            // Waits for more bytes from the client (a later pass).
            *more = false;
            break;
        }
        let (n, info) = match inner.conn.send(&mut buf[off..off + room]) {
            Ok(v) => v,
            Err(_) => {
                // Done, or a fatal error that closed the connection (the
                // next poll reports it).
                *more = false;
                break;
            }
        };
        if let Some(amp) = inner.amp.as_mut() {
            amp.sent += n as u64;
        }
        let extend = match batches.last() {
            Some(b) => {
                b.to == info.to
                    && b.from == info.from
                    && b.len % b.seg == 0
                    && n <= b.seg
                    && b.count < MAX_GSO_SEGMENTS
                    && b.len + n <= quantum
                    && info.at <= b.at + PACING_GRANULARITY
            }
            None => false,
        };
        match batches.last_mut() {
            Some(b) if extend => {
                b.len += n;
                b.count += 1;
            }
            _ => batches.push(Batch {
                from: info.from,
                to: info.to,
                start: off,
                len: n,
                seg: n.max(1),
                count: 1,
                at: info.at,
            }),
        }
        off += n;
    }
    // A pass that ends with less than one full datagram of budget left was
    // (or is about to be) held back by it.
    if let Some(amp) = &inner.amp {
        if amp.left() < mtu as u64 {
            inner.amp_limited += 1;
        }
    }
    batches
}
