//! One `quiche::Connection` per resource. Only the owning Elixir connection
//! process calls these NIFs; the mutex makes a stray call from elsewhere safe.
//!
//! The driver pattern: `connection_recv` takes every datagram of one read,
//! `connection_send` returns all output of one send pass as GSO-ready
//! batches, `connection_poll` reports what changed.

use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

use rustler::{Binary, Encoder, Env, ResourceArc, Term};

use crate::atoms;
use crate::config::{bytes_term, ConfigResource};
use crate::error::{Error, Result};
use crate::util::{ceil_millis, decode_addr, encode_addr, unit_result};

/// Largest UDP payload one GSO send may carry (IPv4 limit, rounded down).
const MAX_GSO_BYTES: usize = 65_000;
/// Most segments one GSO send may carry (the kernel's UDP_MAX_SEGMENTS).
const MAX_GSO_SEGMENTS: usize = 64;
/// Most packets one `connection_send` call produces (bounds its run time).
pub const MAX_SEND_PACKETS: usize = 256;

pub struct ConnInner {
    pub conn: quiche::Connection,
    pub local: SocketAddr,
    /// Streams whose empty FIN is written once more after the next send pass.
    fin_repoke: Vec<u64>,
    /// Empty FINs written since the last send pass.
    pub fins_this_pass: usize,
    /// quiche's send capacity is exact (a recv happened since the last send).
    tx_fresh: bool,
}

pub struct ConnResource {
    inner: Mutex<ConnInner>,
}

#[rustler::resource_impl]
impl rustler::Resource for ConnResource {}

impl ConnResource {
    pub fn lock(&self) -> Result<MutexGuard<'_, ConnInner>> {
        Ok(self.inner.lock()?)
    }
}

fn new_resource(conn: quiche::Connection, local: SocketAddr) -> ResourceArc<ConnResource> {
    ResourceArc::new(ConnResource {
        inner: Mutex::new(ConnInner {
            conn,
            local,
            fin_repoke: Vec::new(),
            fins_this_pass: 0,
            tx_fresh: false,
        }),
    })
}

fn cid(bytes: &Binary) -> Result<quiche::ConnectionId<'static>> {
    let b = bytes.as_slice();
    if b.is_empty() || b.len() > quiche::MAX_CONN_ID_LEN {
        return Err(Error::BadArg("connection id"));
    }
    Ok(quiche::ConnectionId::from_vec(b.to_vec()))
}

fn maybe_keylog(conn: &mut quiche::Connection, config: &ConfigResource) {
    if !config.log_keys {
        return;
    }
    if let Some(path) = std::env::var_os("SSLKEYLOGFILE") {
        if let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            conn.set_keylog(Box::new(file));
        }
    }
}

/// Room (bytes of send capacity) needed before an empty FIN is written.
const EMPTY_FIN_ROOM: usize = 64;

/// Writes an empty FIN (the sending side ends after data already written).
///
/// quiche 0.30 has two bugs around zero-length FINs (cloudflare/quiche#2525):
/// a stream counts as complete once its data is acked even if the FIN was
/// never sent, so an ACK that lands between the FIN write and the next
/// `send()` gets the stream collected and the FIN is lost; and a FIN-only
/// stream is dropped from the flushable queue when the packet being built
/// has no room for its header. The defences here:
///
/// * write the FIN only when the connection can send now: quiche refreshes
///   its send capacity only in `recv()`, so only between a `connection_recv`
///   and the next `connection_send` is it exact. Otherwise `Done`, and the
///   caller retries on a later pass, or with `force` once the FIN has waited
///   long enough that nothing should still be in flight. The caller's next
///   step is a send pass, which builds the FIN frame before any further ACK
///   is read;
/// * move the stream to the front of the queue (urgency 0), so its frame is
///   the first stream frame of the next packet;
/// * write the FIN once more after that send pass (a duplicate FIN frame is
///   harmless; a missing one stalls the peer).
///
/// What stays open: a lost packet that carried the FIN, while the data before
/// it is acked by a later packet, is not retransmitted by quiche 0.30.
/// Sending the FIN with the last data (`fin: true`) avoids all of this.
pub fn write_empty_fin(inner: &mut ConnInner, id: u64, force: bool) -> quiche::Result<usize> {
    let cap = inner.conn.stream_capacity(id)?;
    let can_send_now = inner.tx_fresh && cap >= EMPTY_FIN_ROOM;
    if !(force || can_send_now) {
        return Err(quiche::Error::Done);
    }
    let _ = inner.conn.stream_priority(id, 0, false);
    match inner.conn.stream_send(id, &[], true) {
        // quiche takes the FIN, then reports Done when it had capacity.
        Ok(_) | Err(quiche::Error::Done) => {
            inner.fin_repoke.push(id);
            Ok(0)
        }
        Err(e) => Err(e),
    }
}

/// Starts a client connection. `server_name` is the SNI (nil for none).
#[rustler::nif]
fn connection_connect(
    config: ResourceArc<ConfigResource>,
    server_name: Option<String>,
    scid: Binary,
    local: Term,
    peer: Term,
) -> Result<ResourceArc<ConnResource>> {
    let scid = cid(&scid)?;
    let local = decode_addr(local)?;
    let peer = decode_addr(peer)?;
    if let Some(name) = &server_name {
        if name.is_empty() || name.len() > 255 || name.contains('\0') {
            return Err(Error::BadArg("server_name"));
        }
    }
    let mut cfg = config.config.lock()?;
    let mut conn = quiche::connect(server_name.as_deref(), &scid, local, peer, &mut cfg)?;
    drop(cfg);
    maybe_keylog(&mut conn, &config);
    Ok(new_resource(conn, local))
}

/// Accepts a server connection; `odcid` is the original destination CID when
/// the client was validated with Retry, nil otherwise.
#[rustler::nif]
fn connection_accept(
    config: ResourceArc<ConfigResource>,
    scid: Binary,
    odcid: Option<Binary>,
    local: Term,
    peer: Term,
) -> Result<ResourceArc<ConnResource>> {
    let scid = cid(&scid)?;
    let odcid = match odcid {
        Some(b) => Some(cid(&b)?),
        None => None,
    };
    let local = decode_addr(local)?;
    let peer = decode_addr(peer)?;
    let mut cfg = config.config.lock()?;
    let mut conn = quiche::accept(&scid, odcid.as_ref(), local, peer, &mut cfg)?;
    drop(cfg);
    maybe_keylog(&mut conn, &config);
    Ok(new_resource(conn, local))
}

/// Feeds received datagrams: a list of `{from, data, segment_size}` where a
/// non-zero segment size splits a GRO buffer into its datagrams. Returns how
/// many datagrams quiche processed without error; bad ones are dropped, as
/// the RFC asks. Every datagram given is processed (dropping some here would
/// be silent loss); callers bound the batch (`Quichex.Connection.UDP` reads
/// at most 16 messages, a few hundred datagrams, per call).
#[rustler::nif]
fn connection_recv(
    conn: ResourceArc<ConnResource>,
    packets: Vec<(Term, Binary, usize)>,
) -> Result<usize> {
    let mut guard = conn.lock()?;
    let inner = &mut *guard;
    let to = inner.local;
    let mut accepted = 0usize;
    for (from, data, seg) in packets {
        let from = decode_addr(from)?;
        let bytes = data.as_slice();
        let seg = if seg == 0 { bytes.len().max(1) } else { seg };
        for datagram in bytes.chunks(seg) {
            // quiche 0.30 drops the rest of a datagram after a coalesced
            // packet it cannot decrypt (e.g. a Handshake packet once the
            // Handshake keys are gone), losing a CONNECTION_CLOSE behind it.
            // RFC 9000 section 12.2 asks receivers to try every packet, so
            // feed them one by one.
            let mut rest = datagram;
            while !rest.is_empty() {
                let len = first_packet_len(rest);
                let (packet, tail) = rest.split_at(len);
                rest = tail;
                let info = quiche::RecvInfo { from, to };
                let ok = SCRATCH.with_borrow_mut(|scratch| {
                    scratch.clear();
                    scratch.extend_from_slice(packet);
                    inner.conn.recv(scratch, info).is_ok()
                });
                if ok {
                    accepted += 1;
                }
            }
        }
    }
    inner.tx_fresh = true;
    Ok(accepted)
}

thread_local! {
    /// Packet buffer shared by every connection handled on this scheduler
    /// thread (a NIF call runs start to end on one thread), so an idle
    /// connection holds no buffer of its own.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads a QUIC variable-length integer at `pos`: `(value, bytes)`.
fn varint(buf: &[u8], pos: usize) -> Option<(u64, usize)> {
    let first = *buf.get(pos)?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(pos..pos + len)?;
    let mut v = u64::from(first & 0x3f);
    for b in &bytes[1..] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

/// Length of the first packet of a (possibly coalesced) datagram: a long
/// header packet's own length, or everything for a short header packet or
/// anything that does not parse (quiche then judges it as a whole).
pub fn first_packet_len(buf: &[u8]) -> usize {
    long_packet_len(buf)
        .filter(|&n| n > 0 && n <= buf.len())
        .unwrap_or(buf.len())
}

fn long_packet_len(buf: &[u8]) -> Option<usize> {
    let first = *buf.first()?;
    if first & 0x80 == 0 {
        return None;
    }
    let version = u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?);
    if version == 0 {
        return None; // Version Negotiation: the rest is versions.
    }
    let mut pos = 5;
    let dcid_len = usize::from(*buf.get(pos)?);
    pos += 1 + dcid_len;
    let scid_len = usize::from(*buf.get(pos)?);
    pos += 1 + scid_len;
    match (first >> 4) & 0x03 {
        0 => {
            // Initial: a token precedes the length.
            let (token_len, n) = varint(buf, pos)?;
            pos += n + usize::try_from(token_len).ok()?;
        }
        3 => return None, // Retry: no length field.
        _ => {}
    }
    let (len, n) = varint(buf, pos)?;
    pos.checked_add(n)?.checked_add(usize::try_from(len).ok()?)
}

struct Batch {
    to: SocketAddr,
    start: usize,
    len: usize,
    seg: usize,
    count: usize,
}

/// Runs quiche's send loop into `buf`, grouping packets into GSO batches:
/// a batch ends at a packet shorter than its segment size, a new
/// destination, 64 segments or 65,000 bytes. Sets `more` to false when
/// quiche has nothing left to send.
fn send_batches(
    conn: &mut quiche::Connection,
    buf: &mut [u8],
    max_packets: usize,
    mtu: usize,
    more: &mut bool,
) -> Vec<Batch> {
    let mut batches: Vec<Batch> = Vec::new();
    let mut off = 0usize;
    for _ in 0..max_packets {
        let (n, info) = match conn.send(&mut buf[off..off + mtu]) {
            Ok(v) => v,
            Err(_) => {
                // Done, or a fatal error that closed the connection (poll reports it).
                *more = false;
                break;
            }
        };
        let extend = match batches.last() {
            Some(b) => {
                b.to == info.to
                    && b.len % b.seg == 0
                    && n <= b.seg
                    && b.count < MAX_GSO_SEGMENTS
                    && b.len + n <= MAX_GSO_BYTES
            }
            None => false,
        };
        match batches.last_mut() {
            Some(b) if extend => {
                b.len += n;
                b.count += 1;
            }
            _ => batches.push(Batch {
                to: info.to,
                start: off,
                len: n,
                seg: n.max(1),
                count: 1,
            }),
        }
        off += n;
    }
    batches
}

/// Runs quiche's send loop for at most `max_packets` packets. Returns
/// `{batches, more?, timeout_ms | nil, closed?}`: each batch is
/// `{to, binary, segment_size}` where every segment but the last has exactly
/// `segment_size` bytes, ready for one GSO `sendmsg`; `more?` is true when
/// the packet budget ran out first; the timeout is quiche's next timer.
#[rustler::nif]
fn connection_send<'a>(
    env: Env<'a>,
    conn: ResourceArc<ConnResource>,
    max_packets: usize,
) -> Result<Term<'a>> {
    let mut guard = conn.lock()?;
    let inner = &mut *guard;
    let max_packets = max_packets.clamp(1, MAX_SEND_PACKETS);
    let mtu = inner.conn.max_send_udp_payload_size().max(1200);
    let mut more = true;
    let needed = max_packets * mtu;
    let items: Vec<Term> = SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < needed {
            scratch.resize(needed, 0);
        }
        let batches = send_batches(&mut inner.conn, scratch, max_packets, mtu, &mut more);
        batches
            .iter()
            .map(|b| {
                let data = bytes_term(env, &scratch[b.start..b.start + b.len]);
                (encode_addr(env, &b.to), data, b.seg).encode(env)
            })
            .collect()
    });
    // Re-write the FINs of the previous pass (see write_empty_fin).
    for id in std::mem::take(&mut inner.fin_repoke) {
        let _ = inner.conn.stream_send(id, &[], true);
    }
    inner.fins_this_pass = 0;
    inner.tx_fresh = false;
    let timeout = inner.conn.timeout().map(ceil_millis);
    Ok((items, more, timeout, inner.conn.is_closed()).encode(env))
}

/// Tells quiche its timer fired.
#[rustler::nif]
fn connection_on_timeout(env: Env, conn: ResourceArc<ConnResource>) -> Term {
    let r = conn.lock().map(|mut inner| inner.conn.on_timeout());
    unit_result(env, r)
}

/// Reports the connection's state after a pass:
/// `{established?, draining?, closed?, timeout_ms | nil, readable_ids,
///   stop_sending_count, peer_streams_left_bidi, peer_streams_left_uni}`.
#[rustler::nif]
fn connection_poll<'a>(env: Env<'a>, conn: ResourceArc<ConnResource>) -> Result<Term<'a>> {
    let mut guard = conn.lock()?;
    let inner = &mut *guard;
    let c = &mut inner.conn;
    let readable: Vec<u64> = c.readable().collect();
    // STOP_SENDING: the caller compares this counter with the last one it
    // saw and asks connection_stopped_streams/2 about its streams when it grew.
    let stopped_count = c.stats().stopped_stream_count_remote;
    let timeout = c.timeout().map(ceil_millis);
    let items = [
        c.is_established().encode(env),
        c.is_draining().encode(env),
        c.is_closed().encode(env),
        timeout.encode(env),
        readable.encode(env),
        stopped_count.encode(env),
        c.peer_streams_left_bidi().encode(env),
        c.peer_streams_left_uni().encode(env),
    ];
    Ok(rustler::types::tuple::make_tuple(env, &items))
}

/// Closes the connection with an application (`app? = true`) or transport
/// error code. `{:error, :done}` means it was already closed.
#[rustler::nif]
fn connection_close<'a>(
    env: Env<'a>,
    conn: ResourceArc<ConnResource>,
    app: bool,
    code: u64,
    reason: Binary,
) -> Term<'a> {
    let r = if code > crate::util::MAX_VARINT {
        Err(Error::BadArg("error_code"))
    } else {
        conn.lock()
            .and_then(|mut inner| Ok(inner.conn.close(app, code, reason.as_slice())?))
    };
    unit_result(env, r)
}

fn encode_conn_error<'a>(env: Env<'a>, e: Option<&quiche::ConnectionError>) -> Term<'a> {
    match e {
        Some(e) => (e.is_app, e.error_code, bytes_term(env, &e.reason)).encode(env),
        None => atoms::nil().encode(env),
    }
}

/// Connection statistics, with the active path's RTT and congestion window.
#[rustler::nif]
fn connection_stats<'a>(env: Env<'a>, conn: ResourceArc<ConnResource>) -> Result<Term<'a>> {
    let guard = conn.lock()?;
    let c = &guard.conn;
    let s = c.stats();
    let path = c.path_stats().next();
    let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let pairs: Vec<(Term, Term)> = vec![
        (atoms::recv().encode(env), s.recv.encode(env)),
        (atoms::sent().encode(env), s.sent.encode(env)),
        (atoms::lost().encode(env), s.lost.encode(env)),
        (
            atoms::spurious_lost().encode(env),
            s.spurious_lost.encode(env),
        ),
        (atoms::retrans().encode(env), s.retrans.encode(env)),
        (atoms::sent_bytes().encode(env), s.sent_bytes.encode(env)),
        (atoms::recv_bytes().encode(env), s.recv_bytes.encode(env)),
        (atoms::acked_bytes().encode(env), s.acked_bytes.encode(env)),
        (atoms::lost_bytes().encode(env), s.lost_bytes.encode(env)),
        (
            atoms::stream_retrans_bytes().encode(env),
            s.stream_retrans_bytes.encode(env),
        ),
        (atoms::dgram_recv().encode(env), s.dgram_recv.encode(env)),
        (atoms::dgram_sent().encode(env), s.dgram_sent.encode(env)),
        (atoms::paths_count().encode(env), s.paths_count.encode(env)),
        (
            atoms::reset_stream_count_local().encode(env),
            s.reset_stream_count_local.encode(env),
        ),
        (
            atoms::stopped_stream_count_local().encode(env),
            s.stopped_stream_count_local.encode(env),
        ),
        (
            atoms::reset_stream_count_remote().encode(env),
            s.reset_stream_count_remote.encode(env),
        ),
        (
            atoms::stopped_stream_count_remote().encode(env),
            s.stopped_stream_count_remote.encode(env),
        ),
        (
            atoms::rtt().encode(env),
            path.as_ref().map(|p| micros(p.rtt)).encode(env),
        ),
        (
            atoms::min_rtt().encode(env),
            path.as_ref()
                .and_then(|p| p.min_rtt.map(micros))
                .encode(env),
        ),
        (
            atoms::rttvar().encode(env),
            path.as_ref().map(|p| micros(p.rttvar)).encode(env),
        ),
        (
            atoms::cwnd().encode(env),
            path.as_ref().map(|p| p.cwnd).encode(env),
        ),
        (
            atoms::pmtu().encode(env),
            path.as_ref().map(|p| p.pmtu).encode(env),
        ),
        (
            atoms::delivery_rate().encode(env),
            path.as_ref().map(|p| p.delivery_rate).encode(env),
        ),
        (
            atoms::send_quantum().encode(env),
            c.send_quantum().encode(env),
        ),
    ];
    Term::map_from_pairs(env, &pairs).map_err(|_| Error::BadArg("stats"))
}

/// Static and negotiated facts about the connection.
#[rustler::nif]
fn connection_info<'a>(env: Env<'a>, conn: ResourceArc<ConnResource>) -> Result<Term<'a>> {
    let guard = conn.lock()?;
    let c = &guard.conn;
    let tp = c.peer_transport_params().map(|tp| {
        let pairs: Vec<(Term, Term)> = vec![
            (
                atoms::max_idle_timeout().encode(env),
                tp.max_idle_timeout.encode(env),
            ),
            (
                atoms::initial_max_data().encode(env),
                tp.initial_max_data.encode(env),
            ),
            (
                atoms::initial_max_stream_data_bidi_local().encode(env),
                tp.initial_max_stream_data_bidi_local.encode(env),
            ),
            (
                atoms::initial_max_stream_data_bidi_remote().encode(env),
                tp.initial_max_stream_data_bidi_remote.encode(env),
            ),
            (
                atoms::initial_max_stream_data_uni().encode(env),
                tp.initial_max_stream_data_uni.encode(env),
            ),
            (
                atoms::initial_max_streams_bidi().encode(env),
                tp.initial_max_streams_bidi.encode(env),
            ),
            (
                atoms::initial_max_streams_uni().encode(env),
                tp.initial_max_streams_uni.encode(env),
            ),
            (
                atoms::max_udp_payload_size().encode(env),
                tp.max_udp_payload_size.encode(env),
            ),
            (
                atoms::ack_delay_exponent().encode(env),
                tp.ack_delay_exponent.encode(env),
            ),
            (
                atoms::max_ack_delay().encode(env),
                tp.max_ack_delay.encode(env),
            ),
            (
                atoms::disable_active_migration().encode(env),
                tp.disable_active_migration.encode(env),
            ),
            (
                atoms::active_conn_id_limit().encode(env),
                tp.active_conn_id_limit.encode(env),
            ),
            (
                atoms::max_datagram_frame_size().encode(env),
                tp.max_datagram_frame_size.encode(env),
            ),
            (
                atoms::retry_used().encode(env),
                tp.retry_source_connection_id.is_some().encode(env),
            ),
        ];
        Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::nil().encode(env))
    });
    let alpn = c.application_proto();
    let pairs: Vec<(Term, Term)> = vec![
        (
            atoms::alpn().encode(env),
            if alpn.is_empty() {
                atoms::nil().encode(env)
            } else {
                bytes_term(env, alpn)
            },
        ),
        (
            atoms::server_name().encode(env),
            c.server_name().encode(env),
        ),
        (atoms::is_server().encode(env), c.is_server().encode(env)),
        (
            atoms::is_established().encode(env),
            c.is_established().encode(env),
        ),
        (atoms::is_resumed().encode(env), c.is_resumed().encode(env)),
        (atoms::is_closed().encode(env), c.is_closed().encode(env)),
        (
            atoms::is_draining().encode(env),
            c.is_draining().encode(env),
        ),
        (
            atoms::is_timed_out().encode(env),
            c.is_timed_out().encode(env),
        ),
        (atoms::trace_id().encode(env), c.trace_id().encode(env)),
        (
            atoms::source_id().encode(env),
            bytes_term(env, c.source_id().as_ref()),
        ),
        (
            atoms::destination_id().encode(env),
            bytes_term(env, c.destination_id().as_ref()),
        ),
        (
            atoms::peer_error().encode(env),
            encode_conn_error(env, c.peer_error()),
        ),
        (
            atoms::local_error().encode(env),
            encode_conn_error(env, c.local_error()),
        ),
        (
            atoms::peer_cert().encode(env),
            c.peer_cert().map(|b| bytes_term(env, b)).encode(env),
        ),
        (atoms::peer_transport_params().encode(env), tp.encode(env)),
        (
            atoms::max_send_udp_payload_size().encode(env),
            c.max_send_udp_payload_size().encode(env),
        ),
    ];
    Term::map_from_pairs(env, &pairs).map_err(|_| Error::BadArg("info"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_coalesced_long_header_packets() {
        // Handshake packet: type 2, version 1, 1-byte CIDs, length 3.
        let mut d = vec![0xe0, 0, 0, 0, 1, 1, 0xaa, 1, 0xbb, 0x03, 1, 2, 3];
        let first = d.len();
        // Followed by a short header packet.
        d.extend_from_slice(&[0x40, 9, 9, 9, 9]);
        assert_eq!(first_packet_len(&d), first);
        assert_eq!(first_packet_len(&d[first..]), 5);
    }

    #[test]
    fn initial_token_is_skipped() {
        // Initial: type 0, token length 2, length 1.
        let d = [0xc0, 0, 0, 0, 1, 0, 0, 0x02, 7, 7, 0x01, 5, 0xff];
        assert_eq!(first_packet_len(&d), 12);
    }

    #[test]
    fn garbage_and_truncation_take_the_whole_datagram() {
        assert_eq!(first_packet_len(&[0xc0, 0, 0]), 3);
        assert_eq!(first_packet_len(&[0xe0, 0, 0, 0, 1, 0, 0, 0x3f]), 8);
        assert_eq!(first_packet_len(&[0xe0, 0, 0, 0, 1, 30]), 6);
        assert_eq!(first_packet_len(&[0xe0, 0, 0, 0, 0, 1, 2]), 7);
        assert_eq!(first_packet_len(&[]), 0);
    }

    #[test]
    fn varints_decode() {
        assert_eq!(varint(&[0x25], 0), Some((37, 1)));
        assert_eq!(varint(&[0x7b, 0xbd], 0), Some((15293, 2)));
        assert_eq!(varint(&[0x9d, 0x7f, 0x3e, 0x7d], 0), Some((494878333, 4)));
        assert_eq!(varint(&[0x9d, 0x7f], 0), None);
    }
}
