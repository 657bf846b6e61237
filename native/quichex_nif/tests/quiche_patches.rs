//! Regression tests for the local patches applied to the vendored quiche
//! 0.30.0 (see `native/vendor/PATCHES.md`).
//!
//! Each test drives a client and a server `quiche::Connection` through an
//! in-memory "network" using only quiche's public API. Packets are moved by
//! hand, so a test can hold back, reorder or drop them deterministically.
//!
//! - Patch A (cloudflare/quiche#2525): a stream's send side is only complete
//!   once its FIN was acknowledged, not merely the data before it. Tests
//!   `a_*`, `b_*` and `c_*` lose the FIN on unpatched quiche 0.30.0.
//! - Patch B (cloudflare/quiche#1968): streams that complete through
//!   `stream_shutdown()` or on a draining receive side are collected, giving
//!   the peer its stream credit back. Tests `d_*`, `e_*` and `f_*` never get
//!   the credit back on unpatched quiche 0.30.0.
//! - Patch C (no upstream issue): a FIN that still has to be (re)sent keeps
//!   its stream in the flush queue, even when the data sent before it does
//!   not reach the final offset. Tests `h_*`, `i_*` and `j_*` lose the FIN on
//!   unpatched quiche 0.30.0, and with patch A alone.
//! - Patch D (no upstream issue): packets in flight on a path that is no
//!   longer active are declared lost once later packets are acknowledged on
//!   another path. Test `k_*` never gets the data on unpatched quiche 0.30.0
//!   (without timers).
//! - Patch E (no upstream issue): padding added to datagrams carrying
//!   Initial packets counts against the server's anti-amplification budget.
//!   Test `l_*` sends more than 3x what it received on unpatched quiche.
//! - Patch F (no upstream issue): a path left behind is released when a new
//!   path needs room. Test `m_*` loses the client after its second NAT
//!   rebinding on unpatched quiche.
//! - Patch G (related to cloudflare/quiche#1833): a late packet for a
//!   just-retired connection ID is dropped. Test `n_*` closes the connection
//!   on unpatched quiche.
//! - Patch H (no upstream issue): path validation has a timer of its own.
//!   Test `o_*` never validates (nor fails) the path on unpatched quiche.
//! - Patch I (no upstream issue): a FIN arriving for the first time in a
//!   frame whose data was all read already is reported. Test `p_*` never
//!   sees the FIN on unpatched quiche.
//!
//! Tests `b_*_written_after_data_ack_*` and `g_*` pass on unpatched quiche
//! too; they guard behaviour the patches must keep.

use std::net::SocketAddr;
use std::time::Duration;

use quiche::{Config, Connection, ConnectionId, RecvInfo, Shutdown};

const MAX_DATAGRAM_SIZE: usize = 1350;

// Stream IDs (RFC 9000, section 2.1).
const CLIENT_BIDI_0: u64 = 0;
const CLIENT_BIDI_1: u64 = 4;
const CLIENT_UNI_0: u64 = 2;
const SERVER_UNI_0: u64 = 3;

fn client_addr() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

fn server_addr() -> SocketAddr {
    "127.0.0.1:4433".parse().unwrap()
}

fn cert_path(file: &str) -> String {
    format!(
        "{}/../vendor/quiche/examples/{}",
        env!("CARGO_MANIFEST_DIR"),
        file
    )
}

/// A config with generous flow control; `max_streams_bidi` is the number of
/// bidirectional streams the peer of this endpoint may open.
fn config(is_server: bool, max_streams_bidi: u64) -> Config {
    let mut config = Config::new(quiche::PROTOCOL_VERSION).unwrap();

    config.set_application_protos(&[b"quichex-test"]).unwrap();
    config.set_max_idle_timeout(30_000);
    config.set_max_recv_udp_payload_size(MAX_DATAGRAM_SIZE);
    config.set_max_send_udp_payload_size(MAX_DATAGRAM_SIZE);
    config.set_initial_max_data(1_000_000);
    config.set_initial_max_stream_data_bidi_local(100_000);
    config.set_initial_max_stream_data_bidi_remote(100_000);
    config.set_initial_max_stream_data_uni(100_000);
    config.set_initial_max_streams_bidi(max_streams_bidi);
    config.set_initial_max_streams_uni(10);
    config.set_disable_active_migration(true);

    if is_server {
        config
            .load_cert_chain_from_pem_file(&cert_path("cert.crt"))
            .unwrap();
        config
            .load_priv_key_from_pem_file(&cert_path("cert.key"))
            .unwrap();
    } else {
        config.verify_peer(false);
    }

    config
}

/// Sends all pending packets of `conn`, without delivering them anywhere.
fn flush(conn: &mut Connection) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0; MAX_DATAGRAM_SIZE];

    loop {
        match conn.send(&mut buf) {
            Ok((len, _)) => out.push(buf[..len].to_vec()),

            Err(quiche::Error::Done) => break,

            Err(e) => panic!("send failed: {e:?}"),
        }
    }

    out
}

/// Feeds `pkts` to `conn`, as if sent from `from` to `to`.
fn deliver(conn: &mut Connection, pkts: &[Vec<u8>], from: SocketAddr, to: SocketAddr) {
    for pkt in pkts {
        let mut pkt = pkt.clone();

        match conn.recv(&mut pkt, RecvInfo { from, to }) {
            Ok(_) | Err(quiche::Error::Done) => (),

            Err(e) => panic!("recv failed: {e:?}"),
        }
    }
}

/// A client and a server connected through an in-memory network.
struct Pipe {
    client: Connection,
    server: Connection,
}

impl Pipe {
    /// Creates both endpoints and completes the handshake.
    fn new(server_max_streams_bidi: u64) -> Pipe {
        Pipe::with_configs(
            &mut config(false, 10),
            &mut config(true, server_max_streams_bidi),
        )
    }

    /// Same, with the given configs.
    fn with_configs(client_config: &mut Config, server_config: &mut Config) -> Pipe {
        let client_scid = ConnectionId::from_ref(&[0xc1; 16]);
        let server_scid = ConnectionId::from_ref(&[0x5e; 16]);

        let client = quiche::connect(
            Some("quic.tech"),
            &client_scid,
            client_addr(),
            server_addr(),
            client_config,
        )
        .unwrap();

        let server = quiche::accept(
            &server_scid,
            None,
            server_addr(),
            client_addr(),
            server_config,
        )
        .unwrap();

        let mut pipe = Pipe { client, server };

        pipe.advance();

        assert!(pipe.client.is_established());
        assert!(pipe.server.is_established());

        pipe
    }

    /// Sends the client's pending packets and returns them, undelivered.
    fn client_flush(&mut self) -> Vec<Vec<u8>> {
        flush(&mut self.client)
    }

    /// Sends the server's pending packets and returns them, undelivered.
    fn server_flush(&mut self) -> Vec<Vec<u8>> {
        flush(&mut self.server)
    }

    fn deliver_to_server(&mut self, pkts: &[Vec<u8>]) {
        deliver(&mut self.server, pkts, client_addr(), server_addr());
    }

    fn deliver_to_client(&mut self, pkts: &[Vec<u8>]) {
        deliver(&mut self.client, pkts, server_addr(), client_addr());
    }

    /// Moves all pending client packets to the server, returning them.
    fn client_to_server(&mut self) -> Vec<Vec<u8>> {
        let pkts = self.client_flush();
        self.deliver_to_server(&pkts);
        pkts
    }

    /// Moves all pending server packets to the client, returning them.
    fn server_to_client(&mut self) -> Vec<Vec<u8>> {
        let pkts = self.server_flush();
        self.deliver_to_client(&pkts);
        pkts
    }

    /// Exchanges packets until neither side has anything left to send.
    fn advance(&mut self) {
        for _ in 0..100 {
            let c = self.client_to_server();
            let s = self.server_to_client();

            if c.is_empty() && s.is_empty() {
                return;
            }
        }

        panic!("the connections kept sending packets");
    }

    /// Makes the client detect the loss of earlier unacknowledged packets by
    /// packet threshold: sends 3 ack-eliciting packets that the server
    /// receives and acknowledges. No timers involved.
    fn client_detect_loss(&mut self) {
        let lost_before = self.client.stats().lost;

        for _ in 0..3 {
            self.client.send_ack_eliciting().unwrap();
            assert!(!self.client_to_server().is_empty());
        }

        assert!(!self.server_to_client().is_empty());

        assert!(
            self.client.stats().lost > lost_before,
            "the client did not detect the loss"
        );
    }

    /// Same as `client_detect_loss()`, the other way around.
    fn server_detect_loss(&mut self) {
        let lost_before = self.server.stats().lost;

        for _ in 0..3 {
            self.server.send_ack_eliciting().unwrap();
            assert!(!self.server_to_client().is_empty());
        }

        assert!(!self.client_to_server().is_empty());

        assert!(
            self.server.stats().lost > lost_before,
            "the server did not detect the loss"
        );
    }
}

/// What an application has read from a stream so far.
#[derive(Default)]
struct Received {
    data: Vec<u8>,
    fin: bool,
}

impl Received {
    /// Reads everything currently readable on `stream_id`.
    fn read(&mut self, conn: &mut Connection, stream_id: u64) {
        let mut buf = [0; 4096];

        while !self.fin {
            match conn.stream_recv(stream_id, &mut buf) {
                Ok((len, fin)) => {
                    self.data.extend_from_slice(&buf[..len]);
                    self.fin = fin;
                }

                Err(quiche::Error::Done) => break,

                Err(e) => panic!("stream_recv({stream_id}) failed: {e:?}"),
            }
        }
    }
}

/// True when the local stream is gone, i.e. it was collected.
fn is_collected(conn: &mut Connection, stream_id: u64) -> bool {
    conn.stream_capacity(stream_id) == Err(quiche::Error::InvalidStreamState(stream_id))
}

// ---------------------------------------------------------------------------
// Patch A: the FIN must be acknowledged before a send side is complete.
// ---------------------------------------------------------------------------

/// (a) The data is acknowledged after an empty FIN was written but before it
/// was sent: the FIN must still go out.
#[test]
fn a_empty_fin_written_before_data_ack_is_still_sent() {
    let mut pipe = Pipe::new(10);
    let mut received = Received::default();

    assert_eq!(
        pipe.client.stream_send(CLIENT_UNI_0, b"hello", false),
        Ok(5)
    );
    pipe.client_to_server();

    received.read(&mut pipe.server, CLIENT_UNI_0);
    assert_eq!(received.data, b"hello");
    assert!(!received.fin);

    // The server acknowledges the data, but the ACK is held back.
    let ack = pipe.server_flush();
    assert!(!ack.is_empty());

    // The application finishes the stream with an empty write...
    assert_eq!(pipe.client.stream_send(CLIENT_UNI_0, b"", true), Ok(0));

    // ...and the data's ACK arrives before the FIN is sent.
    pipe.deliver_to_client(&ack);

    // The FIN must still be sent.
    assert!(!pipe.client_to_server().is_empty(), "no FIN was sent");
    pipe.advance();

    received.read(&mut pipe.server, CLIENT_UNI_0);
    assert_eq!(received.data, b"hello");
    assert!(received.fin, "the server never saw the FIN");

    // Once the FIN is acked, the client collects the stream.
    assert!(is_collected(&mut pipe.client, CLIENT_UNI_0));
}

/// (b) A FIN sent on its own is lost after the data was acknowledged: it must
/// be retransmitted.
#[test]
fn b_lost_lone_fin_is_retransmitted_after_data_ack() {
    let mut pipe = Pipe::new(10);
    let mut received = Received::default();

    assert_eq!(
        pipe.client.stream_send(CLIENT_UNI_0, b"hello", false),
        Ok(5)
    );
    pipe.client_to_server();

    // The data's ACK is held back for now.
    let ack = pipe.server_flush();
    assert!(!ack.is_empty());

    // The empty FIN goes out on its own, and is lost.
    assert_eq!(pipe.client.stream_send(CLIENT_UNI_0, b"", true), Ok(0));
    let lost = pipe.client_flush();
    assert_eq!(lost.len(), 1);

    // Now the data is acknowledged.
    pipe.deliver_to_client(&ack);

    // The client detects the loss of the FIN's packet...
    pipe.client_detect_loss();

    // ...and retransmits the FIN.
    assert!(!pipe.client_to_server().is_empty(), "FIN not retransmitted");
    pipe.advance();

    received.read(&mut pipe.server, CLIENT_UNI_0);
    assert_eq!(received.data, b"hello");
    assert!(received.fin, "the server never saw the FIN");

    assert!(is_collected(&mut pipe.client, CLIENT_UNI_0));
}

/// (b') Same as (b), but the data is acknowledged before the FIN is even
/// written. This already works on unpatched quiche, and must keep working.
#[test]
fn b_lost_lone_fin_written_after_data_ack_is_retransmitted() {
    let mut pipe = Pipe::new(10);
    let mut received = Received::default();

    assert_eq!(
        pipe.client.stream_send(CLIENT_UNI_0, b"hello", false),
        Ok(5)
    );
    pipe.client_to_server();
    pipe.server_to_client();

    assert_eq!(pipe.client.stream_send(CLIENT_UNI_0, b"", true), Ok(0));
    let lost = pipe.client_flush();
    assert_eq!(lost.len(), 1);

    pipe.client_detect_loss();

    assert!(!pipe.client_to_server().is_empty(), "FIN not retransmitted");
    pipe.advance();

    received.read(&mut pipe.server, CLIENT_UNI_0);
    assert_eq!(received.data, b"hello");
    assert!(received.fin, "the server never saw the FIN");

    assert!(is_collected(&mut pipe.client, CLIENT_UNI_0));
}

/// (c) Request/response on a bidi stream: the server read the request's FIN,
/// its response data is acknowledged between the response's (empty) FIN
/// being written and sent. The client must see the FIN.
#[test]
fn c_response_fin_after_request_fin_read_is_sent() {
    let mut pipe = Pipe::new(10);
    let mut request = Received::default();
    let mut response = Received::default();

    assert_eq!(
        pipe.client.stream_send(CLIENT_BIDI_0, b"request", true),
        Ok(7)
    );
    pipe.advance();

    request.read(&mut pipe.server, CLIENT_BIDI_0);
    assert_eq!(request.data, b"request");
    assert!(request.fin);

    assert_eq!(
        pipe.server.stream_send(CLIENT_BIDI_0, b"response", false),
        Ok(8)
    );
    pipe.server_to_client();

    // The client acknowledges the response data; the ACK is held back.
    let ack = pipe.client_flush();
    assert!(!ack.is_empty());

    assert_eq!(pipe.server.stream_send(CLIENT_BIDI_0, b"", true), Ok(0));

    pipe.deliver_to_server(&ack);

    assert!(!pipe.server_to_client().is_empty(), "no FIN was sent");
    pipe.advance();

    response.read(&mut pipe.client, CLIENT_BIDI_0);
    assert_eq!(response.data, b"response");
    assert!(response.fin, "the client never saw the FIN");
}

/// (c'') The other way around: the response data is acknowledged and its
/// empty FIN written, then the server reads the request's FIN (stream_recv()
/// collects complete streams too) before sending. The client must see the
/// FIN.
#[test]
fn c_response_fin_pending_when_request_fin_is_read_is_sent() {
    let mut pipe = Pipe::new(10);
    let mut request = Received::default();
    let mut response = Received::default();

    assert_eq!(
        pipe.client.stream_send(CLIENT_BIDI_0, b"request", false),
        Ok(7)
    );
    pipe.advance();

    request.read(&mut pipe.server, CLIENT_BIDI_0);
    assert_eq!(request.data, b"request");
    assert!(!request.fin);

    // The response data is sent and acknowledged.
    assert_eq!(
        pipe.server.stream_send(CLIENT_BIDI_0, b"response", false),
        Ok(8)
    );
    pipe.advance();

    // The response's FIN is written, but not sent yet...
    assert_eq!(pipe.server.stream_send(CLIENT_BIDI_0, b"", true), Ok(0));

    // ...when the request's FIN arrives and is read.
    assert_eq!(pipe.client.stream_send(CLIENT_BIDI_0, b"", true), Ok(0));
    let request_fin = pipe.client_flush();
    pipe.deliver_to_server(&request_fin);

    request.read(&mut pipe.server, CLIENT_BIDI_0);
    assert!(request.fin);

    assert!(!pipe.server_to_client().is_empty(), "no FIN was sent");
    pipe.advance();

    response.read(&mut pipe.client, CLIENT_BIDI_0);
    assert_eq!(response.data, b"response");
    assert!(response.fin, "the client never saw the FIN");
}

/// (c') Same as (c), but the lone FIN is also lost after the data's ACK
/// arrived: it must be retransmitted.
#[test]
fn c_lost_response_fin_after_request_fin_read_is_retransmitted() {
    let mut pipe = Pipe::new(10);
    let mut request = Received::default();
    let mut response = Received::default();

    assert_eq!(
        pipe.client.stream_send(CLIENT_BIDI_0, b"request", true),
        Ok(7)
    );
    pipe.advance();

    request.read(&mut pipe.server, CLIENT_BIDI_0);
    assert!(request.fin);

    assert_eq!(
        pipe.server.stream_send(CLIENT_BIDI_0, b"response", false),
        Ok(8)
    );
    pipe.server_to_client();
    let ack = pipe.client_flush();
    assert!(!ack.is_empty());

    assert_eq!(pipe.server.stream_send(CLIENT_BIDI_0, b"", true), Ok(0));
    let lost = pipe.server_flush();
    assert_eq!(lost.len(), 1);

    pipe.deliver_to_server(&ack);

    pipe.server_detect_loss();

    assert!(!pipe.server_to_client().is_empty(), "FIN not retransmitted");
    pipe.advance();

    response.read(&mut pipe.client, CLIENT_BIDI_0);
    assert_eq!(response.data, b"response");
    assert!(response.fin, "the client never saw the FIN");
}

// ---------------------------------------------------------------------------
// Patch B: streams completed by stream_shutdown() or on a draining receive
// side are collected, and the peer gets its stream credit back.
// ---------------------------------------------------------------------------

/// Opens a client bidi stream with `request` (no FIN), has the server read
/// it and answer with a complete response whose FIN the client acknowledges.
fn open_and_answer(pipe: &mut Pipe, request_fin: bool) {
    assert_eq!(pipe.client.peer_streams_left_bidi(), 1);

    assert_eq!(
        pipe.client
            .stream_send(CLIENT_BIDI_0, b"request", request_fin),
        Ok(7)
    );
    pipe.advance();

    assert_eq!(pipe.client.peer_streams_left_bidi(), 0);
    assert!(pipe.server.readable().any(|id| id == CLIENT_BIDI_0));

    // The server's send side completes: response and FIN are acked.
    assert_eq!(
        pipe.server.stream_send(CLIENT_BIDI_0, b"response", true),
        Ok(8)
    );
    pipe.advance();

    let mut response = Received::default();
    response.read(&mut pipe.client, CLIENT_BIDI_0);
    assert_eq!(response.data, b"response");
    assert!(response.fin);
}

/// Checks that the client can open its next bidi stream.
fn assert_bidi_credit_returned(pipe: &mut Pipe) {
    assert!(
        pipe.client.peer_streams_left_bidi() > 0,
        "the server never returned the bidi stream credit"
    );

    assert_eq!(pipe.client.stream_send(CLIENT_BIDI_1, b"next", true), Ok(4));
    pipe.advance();

    let mut next = Received::default();
    next.read(&mut pipe.server, CLIENT_BIDI_1);
    assert_eq!(next.data, b"next");
    assert!(next.fin);
}

/// (d) The server stops reading a stream whose response it already
/// completed; the client answers STOP_SENDING with RESET_STREAM. The stream
/// must be collected and the credit returned.
#[test]
fn d_shutdown_read_then_peer_reset_returns_credit() {
    let mut pipe = Pipe::new(1);

    open_and_answer(&mut pipe, false);

    // The server is not interested in the rest of the request.
    pipe.server
        .stream_shutdown(CLIENT_BIDI_0, Shutdown::Read, 42)
        .unwrap();

    // STOP_SENDING goes out, RESET_STREAM comes back (quiche answers it
    // automatically), the server collects the stream and sends MAX_STREAMS.
    pipe.advance();

    assert_eq!(
        pipe.client.stream_send(CLIENT_BIDI_0, b"more", false),
        Err(quiche::Error::StreamStopped(42))
    );
    pipe.advance();

    assert_bidi_credit_returned(&mut pipe);
}

/// (e) The request's FIN already arrived but the data was not read, and the
/// response is complete: shutdown(Read) completes the stream right away.
#[test]
fn e_shutdown_read_after_peer_fin_returns_credit() {
    let mut pipe = Pipe::new(1);

    open_and_answer(&mut pipe, true);

    // The request is complete but unread.
    assert!(pipe.server.readable().any(|id| id == CLIENT_BIDI_0));

    pipe.server
        .stream_shutdown(CLIENT_BIDI_0, Shutdown::Read, 42)
        .unwrap();

    assert!(!pipe.server.readable().any(|id| id == CLIENT_BIDI_0));

    pipe.advance();

    assert_bidi_credit_returned(&mut pipe);
}

/// (f) The server stops reading while the rest of the request, with its
/// FIN, is already on its way: the draining stream completes when the data
/// arrives (before the client even sees STOP_SENDING).
#[test]
fn f_shutdown_read_then_peer_fin_returns_credit() {
    let mut pipe = Pipe::new(1);

    open_and_answer(&mut pipe, false);

    // The client finishes the request; the packet is in flight.
    assert_eq!(pipe.client.stream_send(CLIENT_BIDI_0, b"more", true), Ok(4));
    let in_flight = pipe.client_flush();
    assert!(!in_flight.is_empty());

    pipe.server
        .stream_shutdown(CLIENT_BIDI_0, Shutdown::Read, 42)
        .unwrap();

    // The STOP_SENDING is lost, the request's remaining data arrives.
    let stop_sending = pipe.server_flush();
    assert!(!stop_sending.is_empty());
    pipe.deliver_to_server(&in_flight);

    pipe.advance();

    assert_bidi_credit_returned(&mut pipe);
}

/// (g) Shutting down the write side of a stream whose receive side is
/// finished completes the stream; the RESET_STREAM must still reach the
/// peer, even when lost, and the credit must come back.
#[test]
fn g_shutdown_write_after_request_read_resets_and_returns_credit() {
    let mut pipe = Pipe::new(1);

    assert_eq!(
        pipe.client.stream_send(CLIENT_BIDI_0, b"request", true),
        Ok(7)
    );
    pipe.advance();

    let mut request = Received::default();
    request.read(&mut pipe.server, CLIENT_BIDI_0);
    assert!(request.fin);

    assert_eq!(
        pipe.server.stream_send(CLIENT_BIDI_0, b"partial", false),
        Ok(7)
    );
    pipe.advance();

    let mut response = Received::default();
    response.read(&mut pipe.client, CLIENT_BIDI_0);
    assert_eq!(response.data, b"partial");

    pipe.server
        .stream_shutdown(CLIENT_BIDI_0, Shutdown::Write, 7)
        .unwrap();

    // The RESET_STREAM is lost once, and must be retransmitted.
    let lost = pipe.server_flush();
    assert_eq!(lost.len(), 1);
    pipe.server_detect_loss();
    pipe.advance();

    let mut buf = [0; 64];
    assert_eq!(
        pipe.client.stream_recv(CLIENT_BIDI_0, &mut buf),
        Err(quiche::Error::StreamReset(7))
    );
    pipe.advance();

    assert_bidi_credit_returned(&mut pipe);
}

// ---------------------------------------------------------------------------
// Patch C: a pending FIN keeps the stream flushable.
// ---------------------------------------------------------------------------

/// (h) An empty FIN is written while an earlier range waits for
/// retransmission and the data after it was acked: the retransmission does
/// not reach the final offset, so the FIN must be sent on its own after it.
#[test]
fn h_empty_fin_written_while_earlier_data_awaits_retransmission() {
    let mut pipe = Pipe::new(10);
    let mut received = Received::default();

    assert_eq!(pipe.client.stream_send(CLIENT_UNI_0, b"aaaa", false), Ok(4));
    let lost = pipe.client_flush();
    assert_eq!(lost.len(), 1);

    assert_eq!(pipe.client.stream_send(CLIENT_UNI_0, b"bbbb", false), Ok(4));
    pipe.client_to_server();
    pipe.server_to_client();

    // "aaaa" is declared lost and queued for retransmission.
    pipe.client_detect_loss();

    assert_eq!(pipe.client.stream_send(CLIENT_UNI_0, b"", true), Ok(0));
    pipe.advance();

    received.read(&mut pipe.server, CLIENT_UNI_0);
    assert_eq!(received.data, b"aaaabbbb");
    assert!(received.fin, "the server never saw the FIN");

    assert!(is_collected(&mut pipe.client, CLIENT_UNI_0));
}

/// (i) A lone FIN is lost together with an earlier range, while the data in
/// between was acked: both must be retransmitted.
#[test]
fn i_lost_fin_and_earlier_data_are_both_retransmitted() {
    let mut pipe = Pipe::new(10);
    let mut received = Received::default();

    assert_eq!(pipe.client.stream_send(CLIENT_UNI_0, b"aaaa", false), Ok(4));
    let lost = pipe.client_flush();
    assert_eq!(lost.len(), 1);

    assert_eq!(pipe.client.stream_send(CLIENT_UNI_0, b"bbbb", false), Ok(4));
    pipe.client_to_server();

    assert_eq!(pipe.client.stream_send(CLIENT_UNI_0, b"", true), Ok(0));
    let lost = pipe.client_flush();
    assert_eq!(lost.len(), 1);

    pipe.client_detect_loss();
    pipe.advance();

    received.read(&mut pipe.server, CLIENT_UNI_0);
    assert_eq!(received.data, b"aaaabbbb");
    assert!(received.fin, "the server never saw the FIN");

    assert!(is_collected(&mut pipe.client, CLIENT_UNI_0));
}

/// (j) The FIN only ever went out attached to a PTO probe's copy of the
/// data; the original (FIN-less) packet is acked, the probe is lost. Nothing
/// is left to retransmit but the FIN, which must still be sent.
///
/// This one needs a timer: it waits for the client's PTO (a few tens of
/// milliseconds after the handshake) and fires it with `on_timeout()`.
#[test]
fn j_fin_lost_on_pto_copy_after_original_data_acked() {
    let mut pipe = Pipe::new(10);
    let mut received = Received::default();

    assert_eq!(pipe.client.stream_send(CLIENT_UNI_0, b"data", false), Ok(4));
    let original = pipe.client_flush();
    assert_eq!(original.len(), 1);

    // The PTO fires: the data is rescheduled (not declared lost).
    let timeout = pipe.client.timeout().expect("no PTO armed");
    assert!(timeout < Duration::from_secs(2), "PTO too far: {timeout:?}");
    std::thread::sleep(timeout);
    pipe.client.on_timeout();

    // The FIN is written before the probe is built, so the probe carries
    // "data" with the FIN. It is lost.
    let retrans_before = pipe.client.stats().retrans;
    assert_eq!(pipe.client.stream_send(CLIENT_UNI_0, b"", true), Ok(0));
    let probes = pipe.client_flush();
    assert!(!probes.is_empty());
    assert!(
        pipe.client.stats().retrans > retrans_before,
        "the timer that fired was not the PTO"
    );

    // The original packet arrives after all and is acked.
    pipe.deliver_to_server(&original);
    pipe.server_to_client();

    pipe.client_detect_loss();
    pipe.advance();

    received.read(&mut pipe.server, CLIENT_UNI_0);
    assert_eq!(received.data, b"data");
    assert!(received.fin, "the server never saw the FIN");

    assert!(is_collected(&mut pipe.client, CLIENT_UNI_0));
}

/// (p) The receiver read all the data; the sender's empty FIN was lost and,
/// the data's ACK being lost too, a PTO probe resends the data with the FIN
/// in one frame. That frame is all duplicate data plus a FIN never seen:
/// the receiver must still report the FIN.
///
/// Like (j), this one waits for the client's PTO and fires it.
#[test]
fn p_new_fin_on_already_read_data_is_reported() {
    let mut pipe = Pipe::new(10);
    let mut received = Received::default();

    assert_eq!(pipe.client.stream_send(CLIENT_UNI_0, b"data", false), Ok(4));
    pipe.client_to_server();
    received.read(&mut pipe.server, CLIENT_UNI_0);
    assert_eq!(received.data, b"data");
    assert!(!received.fin);

    // The server's ACK is lost, and so is the empty FIN.
    assert!(!pipe.server_flush().is_empty());
    assert_eq!(pipe.client.stream_send(CLIENT_UNI_0, b"", true), Ok(0));
    assert_eq!(pipe.client_flush().len(), 1);

    // The PTO fires: the probe carries "data" again, with the FIN.
    let timeout = pipe.client.timeout().expect("no PTO armed");
    assert!(timeout < Duration::from_secs(2), "PTO too far: {timeout:?}");
    std::thread::sleep(timeout);
    pipe.client.on_timeout();
    assert!(!pipe.client_to_server().is_empty(), "no probe");
    pipe.advance();

    received.read(&mut pipe.server, CLIENT_UNI_0);
    assert_eq!(received.data, b"data");
    assert!(received.fin, "the server never saw the FIN");
}

/// The client's NAT binding changes: what the server sends to the old
/// address is lost, and the client's next packet arrives from a new one.
/// Returns the client's new (NATed) address.
fn nat_rebinding() -> SocketAddr {
    "127.0.0.1:40001".parse().unwrap()
}

/// (k) NAT rebinding in the middle of a server-to-client transfer: every
/// packet the server sent to the client's old address is lost. The server
/// follows the client to its new address and the lost data is resent once
/// packets sent on the new path are acknowledged, without timers (on
/// unpatched quiche, only the old path's PTOs resend it, one or two packets
/// at a time with exponential backoff).
#[test]
fn k_packets_lost_on_the_path_left_behind_are_retransmitted() {
    let mut pipe = Pipe::new(10);
    let mut received = Received::default();
    let payload: Vec<u8> = (0..12_000u32).map(|i| (i % 251) as u8).collect();

    assert_eq!(
        pipe.server.stream_send(SERVER_UNI_0, &payload, true),
        Ok(payload.len())
    );
    let lost = pipe.server_flush();
    assert!(lost.len() >= 8, "only {} packets", lost.len());

    // The client's next packets come from its new address.
    let mut rounds = 0;
    while !received.fin {
        rounds += 1;
        assert!(
            rounds <= 50,
            "only {} of {} bytes arrived",
            received.data.len(),
            payload.len()
        );

        pipe.client.send_ack_eliciting().unwrap();
        let pkts = pipe.client_flush();
        deliver(&mut pipe.server, &pkts, nat_rebinding(), server_addr());

        // The client's NAT maps the new address back to the one it knows.
        let pkts = pipe.server_flush();
        pipe.deliver_to_client(&pkts);
        if pipe.client.stream_readable(SERVER_UNI_0) {
            received.read(&mut pipe.client, SERVER_UNI_0);
        }
    }

    assert_eq!(received.data, payload);
    assert!(pipe.server.stats().lost >= lost.len());
    let paths: Vec<_> = pipe.server.path_stats().collect();
    assert!(paths
        .iter()
        .any(|p| p.peer_addr == nat_rebinding() && p.active));
}

/// (l) A client's first flight reaches the server, then nothing more (a
/// spoofed source address). Everything the server sends, its PTO
/// retransmissions and their padding included, stays within 3x the bytes
/// it received (RFC 9000, section 8.1). Unpatched quiche 0.30.0 charges
/// only each packet's own bytes against the budget, not the padding that
/// brings datagrams carrying Initial packets to 1200 bytes.
#[test]
fn l_amplification_budget_counts_padding() {
    let client_scid = ConnectionId::from_ref(&[0xc1; 16]);
    let server_scid = ConnectionId::from_ref(&[0x5e; 16]);
    let mut client_config = config(false, 10);
    let mut server_config = config(true, 10);
    // Quick PTOs, so several retransmissions fit in the test.
    server_config.set_initial_rtt(Duration::from_millis(5));

    let mut client = quiche::connect(
        Some("quic.tech"),
        &client_scid,
        client_addr(),
        server_addr(),
        &mut client_config,
    )
    .unwrap();
    let mut server = quiche::accept(
        &server_scid,
        None,
        server_addr(),
        client_addr(),
        &mut server_config,
    )
    .unwrap();

    let first_flight = flush(&mut client);
    let received: usize = first_flight.iter().map(Vec::len).sum();
    deliver(&mut server, &first_flight, client_addr(), server_addr());

    let mut sent: usize = flush(&mut server).iter().map(Vec::len).sum();
    let mut ptos = 0;

    while ptos < 8 {
        let Some(timeout) = server.timeout() else {
            break;
        };
        if server.is_closed() {
            break;
        }
        std::thread::sleep(timeout);
        server.on_timeout();
        sent += flush(&mut server).iter().map(Vec::len).sum::<usize>();
        ptos += 1;
    }

    assert!(ptos >= 3, "only {ptos} timeouts fired");
    assert!(
        sent <= 3 * received,
        "sent {sent} bytes for {received} received"
    );
}

/// (m) The client's NAT binding changes again and again (a new source port
/// each time). The server follows it every time. On unpatched quiche 0.30.0
/// each rebinding leaves a path behind that keeps its connection ID, the
/// path map (`active_connection_id_limit` paths) fills up after the second
/// one, and from then on every packet from the client's new address is
/// dropped.
#[test]
fn m_repeated_nat_rebindings_keep_the_connection() {
    let mut pipe = Pipe::new(10);

    for round in 0..6u64 {
        let nat: SocketAddr = format!("127.0.0.1:{}", 41_000 + round).parse().unwrap();
        let stream_id = CLIENT_BIDI_0 + 4 * round;
        let mut received = Received::default();

        assert_eq!(pipe.client.stream_send(stream_id, b"ping", true), Ok(4));

        // Packets move until neither side has anything to send; the client's
        // come from its new address.
        for _ in 0..50 {
            let c = pipe.client_flush();
            deliver(&mut pipe.server, &c, nat, server_addr());
            let s = pipe.server_flush();
            pipe.deliver_to_client(&s);
            if pipe.server.stream_readable(stream_id) {
                received.read(&mut pipe.server, stream_id);
            }
            if c.is_empty() && s.is_empty() {
                break;
            }
        }

        assert_eq!(
            received.data, b"ping",
            "round {round}: the server got nothing"
        );
        assert!(received.fin, "round {round}: no FIN");
        let active: Vec<_> = pipe.server.path_stats().filter(|p| p.active).collect();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].peer_addr, nat, "round {round}");
    }
}

/// Both sides give the other a spare connection ID (sequence 1).
fn spare_cids(pipe: &mut Pipe) {
    let cid = ConnectionId::from_ref(&[0x5f; 16]);
    pipe.server.new_scid(&cid, 0x1234, false).unwrap();
    let cid = ConnectionId::from_ref(&[0xc2; 16]);
    pipe.client.new_scid(&cid, 0x5678, false).unwrap();
    pipe.advance();
}

/// A pipe whose client may migrate (the other tests' configs forbid it).
fn migration_pipe() -> Pipe {
    let mut client = config(false, 10);
    let mut server = config(true, 10);
    client.set_disable_active_migration(false);
    server.set_disable_active_migration(false);
    Pipe::with_configs(&mut client, &mut server)
}

/// (n) A packet still carrying a connection ID of the server's that the
/// client has just retired arrives after the client's RETIRE_CONNECTION_ID
/// (reordering). The server drops it; its data comes again. Unpatched quiche
/// 0.30.0 fails `recv()` with `InvalidState` and closes the connection with
/// PROTOCOL_VIOLATION.
#[test]
fn n_packet_with_a_just_retired_cid_is_dropped_not_fatal() {
    let mut pipe = Pipe::new(10);
    let mut received = Received::default();
    spare_cids(&mut pipe);

    // P: stream data, still to the server's CID 0.
    assert_eq!(pipe.client.stream_send(CLIENT_BIDI_0, b"late", true), Ok(4));
    let p = pipe.client_flush();
    assert!(!p.is_empty());

    // Q: the client moves to CID 1 and retires CID 0; Q arrives first.
    pipe.client.retire_dcid(0).unwrap();
    let q = pipe.client_flush();
    pipe.deliver_to_server(&q);

    let mut pkt = p[0].clone();
    let r = pipe.server.recv(
        &mut pkt,
        RecvInfo {
            from: client_addr(),
            to: server_addr(),
        },
    );
    assert!(r.is_ok(), "recv of the late packet: {r:?}");
    assert!(!pipe.server.is_closed(), "{:?}", pipe.server.local_error());

    // The data is retransmitted once its loss is detected.
    pipe.client_detect_loss();
    pipe.advance();
    received.read(&mut pipe.server, CLIENT_BIDI_0);
    assert_eq!(received.data, b"late");
    assert!(received.fin);
}

/// (o) A client probes a new path. The server acknowledges the packet that
/// carried the PATH_CHALLENGE (on the old path) but its PATH_RESPONSE is
/// lost. The client challenges again and, once a response gets through,
/// validates the path. Unpatched quiche 0.30.0 never sends another
/// challenge and never fails the path: it stays "validating" for good.
#[test]
fn o_path_challenge_is_retried_when_its_response_is_lost() {
    let mut pipe = migration_pipe();
    spare_cids(&mut pipe);
    let new_addr: SocketAddr = "127.0.0.1:40002".parse().unwrap();

    pipe.client.probe_path(new_addr, server_addr()).unwrap();
    let probe = pipe.client_flush();
    deliver(&mut pipe.server, &probe, new_addr, server_addr());

    // Everything the server sends to the new address (the PATH_RESPONSE) is
    // lost; the rest (its ACK of the probe, on the old path) arrives.
    let mut buf = [0; MAX_DATAGRAM_SIZE];
    let mut lost = 0;
    pipe.server.send_ack_eliciting().unwrap();
    loop {
        match pipe.server.send(&mut buf) {
            Ok((_, info)) if info.to == new_addr => lost += 1,
            Ok((len, info)) => deliver(
                &mut pipe.client,
                &[buf[..len].to_vec()],
                server_addr(),
                info.to,
            ),
            Err(quiche::Error::Done) => break,
            Err(e) => panic!("send failed: {e:?}"),
        }
    }
    assert!(lost >= 1);
    let c = pipe.client_flush();
    pipe.deliver_to_server(&c);

    // The client's timers fire (a few tens of milliseconds each, after the
    // handshake's RTT samples); from now on everything gets through.
    let started = std::time::Instant::now();
    let mut probes = 0;
    while started.elapsed() < Duration::from_secs(5) {
        let validated = pipe.client.path_stats().any(|p| {
            p.local_addr == new_addr && format!("{:?}", p.validation_state) == "Validated"
        });
        if validated {
            break;
        }
        if let Some(wait) = pipe.client.timeout() {
            std::thread::sleep(wait.min(Duration::from_millis(100)));
        }
        pipe.client.on_timeout();
        loop {
            match pipe.client.send(&mut buf) {
                Ok((len, info)) => {
                    if info.from == new_addr {
                        probes += 1;
                    }
                    deliver(
                        &mut pipe.server,
                        &[buf[..len].to_vec()],
                        info.from,
                        server_addr(),
                    );
                }
                Err(quiche::Error::Done) => break,
                Err(e) => panic!("send failed: {e:?}"),
            }
        }
        loop {
            match pipe.server.send(&mut buf) {
                Ok((len, info)) => deliver(
                    &mut pipe.client,
                    &[buf[..len].to_vec()],
                    server_addr(),
                    info.to,
                ),
                Err(quiche::Error::Done) => break,
                Err(e) => panic!("send failed: {e:?}"),
            }
        }
    }

    assert!(probes >= 1, "the client never challenged again");
    let path = pipe
        .client
        .path_stats()
        .find(|p| p.local_addr == new_addr)
        .unwrap();
    assert_eq!(format!("{:?}", path.validation_state), "Validated");
}

/// The validation state of `conn`'s path to `peer`, if it has one.
fn path_state(conn: &Connection, peer: SocketAddr) -> Option<String> {
    conn.path_stats()
        .find(|p| p.peer_addr == peer)
        .map(|p| format!("{:?}", p.validation_state))
}

/// The server writes what is left of `payload` on `SERVER_UNI_0` (as far as its window allows), its flight reaches the client, and the
/// client reads. Returns the flight.
fn server_to_reader(
    pipe: &mut Pipe,
    payload: &[u8],
    written: &mut usize,
    received: &mut Received,
) -> Vec<Vec<u8>> {
    if *written < payload.len() {
        *written += pipe
            .server
            .stream_send(SERVER_UNI_0, &payload[*written..], true)
            .unwrap_or(0);
    }
    let s = pipe.server_flush();
    pipe.deliver_to_client(&s);
    if pipe.client.stream_readable(SERVER_UNI_0) {
        received.read(&mut pipe.client, SERVER_UNI_0);
    }
    s
}

// ---------------------------------------------------------------------------
// Patch J: a server fails a path for its amplification budget only while
// the peer's address on it is unverified.
// ---------------------------------------------------------------------------

/// (q) The client's NAT binding changes in the middle of a server-to-client
/// transfer. The server's first PATH_CHALLENGE on the new path leaves in a
/// small packet (3x what the client's packet carried, the amplification
/// budget, spent on it and on data); the client's PATH_RESPONSE verifies its
/// address, and the server challenges again with a full-size packet to
/// check the path's MTU. That packet is lost. The server retries and the
/// path is validated. Unpatched quiche 0.30.0 fails the path at the first
/// lost challenge, because its spent amplification budget is still checked
/// although the address is verified and the budget no longer applies: the
/// active path fails and the connection dies (PROTOCOL_VIOLATION at the
/// client's next packet) on a busy machine.
#[test]
fn q_lost_mtu_challenge_after_address_verified_is_retried() {
    let mut pipe = Pipe::new(10);
    let nat = nat_rebinding();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut received = Received::default();

    // quiche takes what its send window allows; the rest is written as it
    // opens.
    let mut written = pipe
        .server
        .stream_send(SERVER_UNI_0, &payload, true)
        .unwrap();
    // Lost on the way to the client's old address.
    let lost = pipe.server_flush();
    assert!(!lost.is_empty());

    // The client's next packet comes from its new address: the server
    // challenges it there within its small budget.
    pipe.client.send_ack_eliciting().unwrap();
    let c = pipe.client_flush();
    deliver(&mut pipe.server, &c, nat, server_addr());
    let s = pipe.server_flush();
    let small: usize = s.iter().map(Vec::len).sum();
    assert!(
        small < 1200,
        "the first flight on the new path is {small} bytes"
    );
    pipe.deliver_to_client(&s);

    // The client's PATH_RESPONSE verifies its address; the server's next
    // flight (its full-size challenge included) is lost.
    let c = pipe.client_flush();
    deliver(&mut pipe.server, &c, nat, server_addr());
    let lost = pipe.server_flush();
    assert!(!lost.is_empty());

    // Timers fire; after each, everything gets through.
    let started = std::time::Instant::now();
    while !received.fin {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "only {} of {} bytes arrived",
            received.data.len(),
            payload.len()
        );
        if let Some(wait) = pipe.server.timeout() {
            std::thread::sleep(wait.min(Duration::from_millis(100)));
        }
        pipe.server.on_timeout();
        assert_ne!(path_state(&pipe.server, nat).as_deref(), Some("Failed"));
        assert!(!pipe.server.is_closed(), "{:?}", pipe.server.local_error());

        server_to_reader(&mut pipe, &payload, &mut written, &mut received);
        let c = pipe.client_flush();
        deliver(&mut pipe.server, &c, nat, server_addr());
        assert!(!pipe.server.is_closed(), "{:?}", pipe.server.local_error());
    }

    assert_eq!(received.data, payload);
    assert_eq!(path_state(&pipe.server, nat).as_deref(), Some("Validated"));
}

// ---------------------------------------------------------------------------
// Patch K: a path that failed validation is validated afresh when the peer
// moves (back) to it.
// ---------------------------------------------------------------------------

/// (r) After a NAT rebinding, every packet the server sends to the client's
/// new address is lost for a while (a busy peer), so the new path fails its
/// validation and the server falls back to the old one. Then the client's
/// packets arrive again from the new address: the server moves there and
/// validates it again, and the transfer completes. Unpatched quiche 0.30.0
/// makes the failed path active but leaves it failed (not usable): the
/// connection has no active path, and the client's next packet closes it
/// with PROTOCOL_VIOLATION.
#[test]
fn r_peer_back_on_a_failed_path_gets_it_validated_again() {
    let mut pipe = Pipe::new(10);
    let nat = nat_rebinding();
    let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let mut received = Received::default();

    let mut written = pipe
        .server
        .stream_send(SERVER_UNI_0, &payload, true)
        .unwrap();
    let _lost = pipe.server_flush();

    // The client's packets come from its new address; all the server sends
    // is lost until the new path fails.
    pipe.client.send_ack_eliciting().unwrap();
    let c = pipe.client_flush();
    deliver(&mut pipe.server, &c, nat, server_addr());
    let started = std::time::Instant::now();
    while path_state(&pipe.server, nat).as_deref() != Some("Failed") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the new path never failed: {:?}",
            path_state(&pipe.server, nat)
        );
        let _lost = pipe.server_flush();
        if let Some(wait) = pipe.server.timeout() {
            std::thread::sleep(wait.min(Duration::from_millis(100)));
        }
        pipe.server.on_timeout();
    }
    assert!(!pipe.server.is_closed(), "{:?}", pipe.server.local_error());

    // The client's packets arrive from the new address again.
    let started = std::time::Instant::now();
    while !received.fin {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "only {} of {} bytes arrived",
            received.data.len(),
            payload.len()
        );
        // Two packets at once (one read of a busy socket): the second is
        // processed before the server has sent anything on the path.
        pipe.client.send_ack_eliciting().unwrap();
        let mut pkts = pipe.client_flush();
        pipe.client.send_ack_eliciting().unwrap();
        pkts.extend(pipe.client_flush());
        for pkt in pkts {
            let mut pkt = pkt.clone();
            let r = pipe.server.recv(
                &mut pkt,
                RecvInfo {
                    from: nat,
                    to: server_addr(),
                },
            );
            assert!(
                matches!(r, Ok(_) | Err(quiche::Error::Done)),
                "recv from the new address: {r:?}"
            );
        }
        assert!(!pipe.server.is_closed(), "{:?}", pipe.server.local_error());
        let s = server_to_reader(&mut pipe, &payload, &mut written, &mut received);
        if let Some(wait) = pipe.server.timeout() {
            if s.is_empty() {
                std::thread::sleep(wait.min(Duration::from_millis(20)));
                pipe.server.on_timeout();
            }
        }
    }

    assert_eq!(received.data, payload);
    assert_eq!(path_state(&pipe.server, nat).as_deref(), Some("Validated"));
    let active: Vec<_> = pipe.server.path_stats().filter(|p| p.active).collect();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].peer_addr, nat);
}
