//! One `quiche::Connection` per resource, with the stream table the driver
//! keeps beside it. Only the owning Elixir connection process calls these
//! NIFs; the mutex makes a stray call from elsewhere safe.
//!
//! The driver itself (`connection_poll`, `connection_flush`) is in
//! `driver.rs`; stream bookkeeping in `stream.rs`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use rustler::{Binary, Env, NifMap, ResourceArc, Term};

use crate::config::ConfigResource;
use crate::error::{Error, Result};
use crate::logs::Logs;
use crate::stream::StreamTable;
use crate::util::{bytes_term, cid, decode_addr, micros, unit_result, varint};

pub struct ConnInner {
    pub conn: quiche::Connection,
    pub local: SocketAddr,
    pub streams: StreamTable,
    pub logs: Logs,
    /// Datagrams read from quiche so far (quiche counts those it received:
    /// the difference, less what is queued, was dropped by a full queue).
    pub dgrams_read: u64,
    /// The last session (resumption ticket) reported, to report new ones.
    pub session_reported: Option<Vec<u8>>,
    /// quiche closed the connection on a stateless reset from the peer.
    pub stateless_reset: bool,
    /// A server's own anti-amplification budget while the client's address
    /// is not validated (see `Amplification`); None for clients, servers
    /// that validated the address with Retry, and once established.
    pub amp: Option<Amplification>,
    /// Driver passes that ended with less than a full datagram of budget
    /// left (reported in the stats).
    pub amp_limited: u64,
}

/// RFC 9000 section 8.1: before a server has validated the client's
/// address it sends at most 3 times the bytes it received from it. quiche
/// limits itself too; this is the driver's own count of the bytes that go
/// on the wire (padding and close packets included), so no quiche slip can
/// make us an amplifier. The address counts as validated once the
/// handshake completed (the client proved it received our Handshake keys).
pub struct Amplification {
    pub peer: SocketAddr,
    pub received: u64,
    pub sent: u64,
}

/// The most a server sends per byte received before validation.
pub const AMPLIFICATION_FACTOR: u64 = 3;

impl Amplification {
    /// Bytes that may still be sent.
    pub fn left(&self) -> u64 {
        (self.received * AMPLIFICATION_FACTOR).saturating_sub(self.sent)
    }
}

pub struct ConnResource {
    inner: Mutex<ConnInner>,
}

#[rustler::resource_impl]
impl rustler::Resource for ConnResource {}

/// Connection resources alive now (made and not yet freed by the VM's
/// garbage collector): what leak tests count on the native side.
static LIVE: AtomicU64 = AtomicU64::new(0);

impl Drop for ConnResource {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The number of connection resources alive in this VM.
#[rustler::nif]
fn connection_live_count() -> u64 {
    LIVE.load(Ordering::Relaxed)
}

impl ConnResource {
    pub fn lock(&self) -> Result<MutexGuard<'_, ConnInner>> {
        Ok(self.inner.lock()?)
    }
}

fn new_resource(
    mut conn: quiche::Connection,
    config: &ConfigResource,
    local: SocketAddr,
    window: u64,
    amp: Option<Amplification>,
) -> ResourceArc<ConnResource> {
    let logs = Logs::start(&mut conn, config);
    LIVE.fetch_add(1, Ordering::Relaxed);
    ResourceArc::new(ConnResource {
        inner: Mutex::new(ConnInner {
            conn,
            local,
            streams: StreamTable::new(window),
            logs,
            dgrams_read: 0,
            session_reported: None,
            stateless_reset: false,
            amp,
            amp_limited: 0,
        }),
    })
}

/// Starts a client connection. `server_name` is the SNI (nil for none);
/// `window` is the read-ahead credit each stream starts with; `session` a
/// ticket from an earlier connection to resume (nil for none).
#[rustler::nif]
fn connection_connect(
    config: ResourceArc<ConfigResource>,
    server_name: Option<String>,
    scid: Binary,
    local: Term,
    peer: Term,
    window: u64,
    session: Option<Binary>,
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
    if let Some(session) = session {
        conn.set_session(session.as_slice())
            .map_err(|_| Error::BadArg("session"))?;
    }
    Ok(new_resource(conn, &config, local, window, None))
}

/// Accepts a server connection; `odcid` is the original destination CID when
/// the client was validated with Retry, nil otherwise; `reset_token` the
/// 16-byte stateless reset token of `scid`.
#[rustler::nif]
fn connection_accept(
    config: ResourceArc<ConfigResource>,
    scid: Binary,
    odcid: Option<Binary>,
    local: Term,
    peer: Term,
    window: u64,
    reset_token: Binary,
) -> Result<ResourceArc<ConnResource>> {
    let token = crate::paths::reset_token(&reset_token)?;
    let scid = cid(&scid)?;
    let odcid = match odcid {
        Some(b) => Some(cid(&b)?),
        None => None,
    };
    let local = decode_addr(local)?;
    let peer = decode_addr(peer)?;
    let mut cfg = config.config.lock()?;
    // quiche takes a server's first reset token from the config: set it for
    // this connection while the config is locked.
    cfg.set_stateless_reset_token(Some(token));
    let conn = quiche::accept(&scid, odcid.as_ref(), local, peer, &mut cfg);
    cfg.set_stateless_reset_token(None);
    let conn = conn?;
    drop(cfg);
    // A Retry token already proved the client's address.
    let amp = odcid.is_none().then_some(Amplification {
        peer,
        received: 0,
        sent: 0,
    });
    Ok(new_resource(conn, &config, local, window, amp))
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
    let r = varint(code, "error_code").and_then(|code| {
        conn.lock()
            .and_then(|mut inner| Ok(inner.conn.close(app, code, reason.as_slice())?))
    });
    unit_result(env, r)
}

/// A CONNECTION_CLOSE seen or sent: `{app?, code, reason_phrase}`.
fn conn_error<'a>(
    env: Env<'a>,
    e: Option<&quiche::ConnectionError>,
) -> Option<(bool, u64, Term<'a>)> {
    e.map(|e| (e.is_app, e.error_code, bytes_term(env, &e.reason)))
}

#[derive(NifMap)]
struct Stats {
    packets_received: usize,
    packets_sent: usize,
    packets_lost: usize,
    packets_spurious_lost: usize,
    packets_retransmitted: usize,
    bytes_sent: u64,
    bytes_received: u64,
    bytes_acked: u64,
    bytes_lost: u64,
    stream_bytes_retransmitted: u64,
    dgrams_received: usize,
    dgrams_sent: usize,
    paths: usize,
    streams_reset_local: u64,
    streams_stopped_local: u64,
    streams_reset_by_peer: u64,
    streams_stopped_by_peer: u64,
    rtt: Option<u64>,
    min_rtt: Option<u64>,
    rttvar: Option<u64>,
    cwnd: Option<usize>,
    pmtu: Option<usize>,
    delivery_rate: Option<u64>,
    send_quantum: usize,
    /// Times output was held back by the anti-amplification budget
    /// (quiche's count and the driver's).
    amplification_limited: u64,
}

/// Connection statistics, with the active path's RTT (µs) and congestion
/// window.
#[rustler::nif]
fn connection_stats(conn: ResourceArc<ConnResource>) -> Result<Stats> {
    let guard = conn.lock()?;
    let c = &guard.conn;
    let s = c.stats();
    let path = c.path_stats().next();
    Ok(Stats {
        packets_received: s.recv,
        packets_sent: s.sent,
        packets_lost: s.lost,
        packets_spurious_lost: s.spurious_lost,
        packets_retransmitted: s.retrans,
        bytes_sent: s.sent_bytes,
        bytes_received: s.recv_bytes,
        bytes_acked: s.acked_bytes,
        bytes_lost: s.lost_bytes,
        stream_bytes_retransmitted: s.stream_retrans_bytes,
        dgrams_received: s.dgram_recv,
        dgrams_sent: s.dgram_sent,
        paths: s.paths_count,
        streams_reset_local: s.reset_stream_count_local,
        streams_stopped_local: s.stopped_stream_count_local,
        streams_reset_by_peer: s.reset_stream_count_remote,
        streams_stopped_by_peer: s.stopped_stream_count_remote,
        rtt: path.as_ref().map(|p| micros(p.rtt)),
        min_rtt: path.as_ref().and_then(|p| p.min_rtt.map(micros)),
        rttvar: path.as_ref().map(|p| micros(p.rttvar)),
        cwnd: path.as_ref().map(|p| p.cwnd),
        pmtu: path.as_ref().map(|p| p.pmtu),
        delivery_rate: path.as_ref().map(|p| p.delivery_rate),
        send_quantum: c.send_quantum(),
        amplification_limited: s.amplification_limited_count + guard.amp_limited,
    })
}

#[derive(NifMap)]
struct TransportParams {
    max_idle_timeout: u64,
    initial_max_data: u64,
    initial_max_stream_data_bidi_local: u64,
    initial_max_stream_data_bidi_remote: u64,
    initial_max_stream_data_uni: u64,
    initial_max_streams_bidi: u64,
    initial_max_streams_uni: u64,
    max_udp_payload_size: u64,
    ack_delay_exponent: u64,
    max_ack_delay: u64,
    disable_active_migration: bool,
    active_conn_id_limit: u64,
    max_datagram_frame_size: Option<u64>,
    retry_used: bool,
}

#[derive(NifMap)]
struct Info<'a> {
    alpn: Option<Term<'a>>,
    server_name: Option<String>,
    is_server: bool,
    is_established: bool,
    is_resumed: bool,
    is_closed: bool,
    is_draining: bool,
    is_timed_out: bool,
    trace_id: String,
    source_id: Term<'a>,
    destination_id: Term<'a>,
    peer_error: Option<(bool, u64, Term<'a>)>,
    local_error: Option<(bool, u64, Term<'a>)>,
    peer_cert: Option<Term<'a>>,
    /// The peer's certificate chain as it sent it (leaf first), DER.
    peer_cert_chain: Option<Vec<Term<'a>>>,
    peer_transport_params: Option<TransportParams>,
    max_send_udp_payload_size: usize,
    in_early_data: bool,
    /// BoringSSL's ssl_early_data_reason_t (2: accepted).
    early_data_reason: u32,
    stateless_reset: bool,
}

/// Static and negotiated facts about the connection.
#[rustler::nif]
fn connection_info<'a>(env: Env<'a>, conn: ResourceArc<ConnResource>) -> Result<Info<'a>> {
    let guard = conn.lock()?;
    let c = &guard.conn;
    let tp = c.peer_transport_params().map(|tp| TransportParams {
        max_idle_timeout: tp.max_idle_timeout,
        initial_max_data: tp.initial_max_data,
        initial_max_stream_data_bidi_local: tp.initial_max_stream_data_bidi_local,
        initial_max_stream_data_bidi_remote: tp.initial_max_stream_data_bidi_remote,
        initial_max_stream_data_uni: tp.initial_max_stream_data_uni,
        initial_max_streams_bidi: tp.initial_max_streams_bidi,
        initial_max_streams_uni: tp.initial_max_streams_uni,
        max_udp_payload_size: tp.max_udp_payload_size,
        ack_delay_exponent: tp.ack_delay_exponent,
        max_ack_delay: tp.max_ack_delay,
        disable_active_migration: tp.disable_active_migration,
        active_conn_id_limit: tp.active_conn_id_limit,
        max_datagram_frame_size: tp.max_datagram_frame_size,
        retry_used: tp.retry_source_connection_id.is_some(),
    });
    let alpn = c.application_proto();
    Ok(Info {
        alpn: (!alpn.is_empty()).then(|| bytes_term(env, alpn)),
        server_name: c.server_name().map(str::to_owned),
        is_server: c.is_server(),
        is_established: c.is_established(),
        is_resumed: c.is_resumed(),
        is_closed: c.is_closed(),
        is_draining: c.is_draining(),
        is_timed_out: c.is_timed_out(),
        trace_id: c.trace_id().to_owned(),
        source_id: bytes_term(env, c.source_id().as_ref()),
        destination_id: bytes_term(env, c.destination_id().as_ref()),
        peer_error: conn_error(env, c.peer_error()),
        local_error: conn_error(env, c.local_error()),
        peer_cert: c.peer_cert().map(|b| bytes_term(env, b)),
        peer_cert_chain: c
            .peer_cert_chain()
            .map(|chain| chain.iter().map(|b| bytes_term(env, b)).collect()),
        peer_transport_params: tp,
        max_send_udp_payload_size: c.max_send_udp_payload_size(),
        in_early_data: c.is_in_early_data(),
        early_data_reason: c.early_data_reason(),
        stateless_reset: guard.stateless_reset,
    })
}
