//! Fuzz targets for the bytes a peer controls on their way through the NIF.
//!
//! Each target is a function of the fuzzer's input that panics when an
//! invariant breaks; `src/bin/<target>.rs` hands it to AFL++, and
//! `tests/corpus.rs` replays the committed corpus through it.
//!
//! * `header`: `wire::parse_header` (the listener's `packet_header` NIF),
//!   `wire::first_packet_len` and the datagram splitting of `connection_poll`.
//! * `varint`: `wire::read_varint` against the `octets` crate quiche uses.
//! * `retry`: connection ID checks and the Version Negotiation and Retry
//!   packets built from a peer's IDs and token, parsed back.
//! * `recv`: a GRO buffer split as `connection_poll` splits it, fed packet by
//!   packet to a fresh server (or client) connection, which then answers.
//! * `session`: a session ticket (bytes the server sent, kept by the
//!   application) given back to a client connection.

use std::cell::RefCell;
use std::net::SocketAddr;

use quichex_nif::wire;

const SERVER_CID: [u8; 16] = [0x5e; 16];
const CLIENT_CID: [u8; 16] = [0xc1; 16];

fn server_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4433))
}

fn client_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40000))
}

/// The test certificate quiche ships (also used by the NIF's own tests).
pub fn cert_path(file: &str) -> String {
    format!(
        "{}/../native/vendor/quiche/examples/{}",
        env!("CARGO_MANIFEST_DIR"),
        file
    )
}

/// A config like the ones `Quichex.Config` builds, for one side.
pub fn config(is_server: bool) -> quiche::Config {
    let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION).expect("config");
    config
        .set_application_protos(&[b"quichex-fuzz"])
        .expect("alpn");
    config.set_max_idle_timeout(30_000);
    config.set_initial_max_data(1_000_000);
    config.set_initial_max_stream_data_bidi_local(100_000);
    config.set_initial_max_stream_data_bidi_remote(100_000);
    config.set_initial_max_stream_data_uni(100_000);
    config.set_initial_max_streams_bidi(100);
    config.set_initial_max_streams_uni(100);
    config.enable_dgram(true, 64, 64);
    if is_server {
        config
            .load_cert_chain_from_pem_file(&cert_path("cert.crt"))
            .expect("cert");
        config
            .load_priv_key_from_pem_file(&cert_path("cert.key"))
            .expect("key");
    } else {
        config.verify_peer(false);
    }
    config
}

thread_local! {
    // Building a config (and loading the certificate) per input would
    // dominate the run time; connections are fresh per input.
    static SERVER: RefCell<quiche::Config> = RefCell::new(config(true));
    static CLIENT: RefCell<quiche::Config> = RefCell::new(config(false));
}

/// Input: one byte giving the length of our connection IDs (mod 21), then a
/// datagram.
pub fn header(data: &[u8]) {
    let Some((&n, datagram)) = data.split_first() else {
        return;
    };
    let dcid_len = usize::from(n) % (quiche::MAX_CONN_ID_LEN + 1);
    if let Ok(hdr) = wire::parse_header(datagram, dcid_len) {
        // Other versions may carry CIDs of up to 255 bytes (RFC 8999); the
        // listener answers those with Version Negotiation.
        if hdr.ty == quiche::Type::Short || quiche::version_is_supported(hdr.version) {
            assert!(hdr.dcid.len() <= quiche::MAX_CONN_ID_LEN);
            assert!(hdr.scid.len() <= quiche::MAX_CONN_ID_LEN);
        }
        if datagram[0] & 0x80 == 0 {
            assert_eq!(hdr.ty, quiche::Type::Short);
            assert_eq!(&hdr.dcid[..], &datagram[1..=dcid_len]);
        } else {
            let len = usize::from(datagram[5]);
            assert_eq!(&hdr.dcid[..], &datagram[6..6 + len]);
        }
        if hdr.ty == quiche::Type::Retry || hdr.ty == quiche::Type::VersionNegotiation {
            assert_eq!(wire::first_packet_len(datagram), datagram.len());
        }
    }
    check_split(datagram);
}

/// The packets of a datagram are non-empty and add up to it.
fn check_split(datagram: &[u8]) {
    let first = wire::first_packet_len(datagram);
    assert!(first <= datagram.len());
    assert_eq!(first == 0, datagram.is_empty());
    let mut total = 0;
    for packet in wire::packets(datagram) {
        assert!(!packet.is_empty());
        assert_eq!(packet, &datagram[total..total + packet.len()]);
        total += packet.len();
    }
    assert_eq!(total, datagram.len());
}

/// Input: a varint (and whatever follows). Our decoder must agree with the
/// `octets` crate quiche itself uses, at every offset.
pub fn varint(data: &[u8]) {
    for pos in 0..data.len().min(16) {
        let ours = wire::read_varint(data, pos);
        let mut o = octets::Octets::with_slice(&data[pos..]);
        let theirs = o.get_varint().ok().map(|v| (v, o.off()));
        assert_eq!(ours, theirs, "varint at {pos} of {data:02x?}");
        if let Some((v, len)) = ours {
            let mut buf = [0u8; 8];
            let mut w = octets::OctetsMut::with_slice(&mut buf);
            let encoded = w.put_varint_with_len(v, len).expect("re-encode").len();
            assert_eq!(encoded, len);
            assert_eq!(wire::read_varint(&buf, 0), Some((v, len)));
        }
    }
    assert_eq!(wire::read_varint(data, data.len()), None);
}

/// Takes `n mod 32` bytes (a length byte, then that many) off the front.
fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let Some((&n, rest)) = data.split_first() else {
        return &[];
    };
    let n = usize::from(n % 32).min(rest.len());
    let (field, rest) = rest.split_at(n);
    *data = rest;
    field
}

/// Input: a version (4 bytes), then the client's SCID, the client's DCID and
/// our new SCID (each a length byte and bytes), then the token. Fields the
/// NIF refuses are refused; packets built are parsed back to what was put in.
pub fn retry(data: &[u8]) {
    let Some((version, mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let version = u32::from_be_bytes(*version);
    let scid = take(&mut rest);
    let dcid = take(&mut rest);
    let new_scid = take(&mut rest);
    let token = rest;
    let (Some(scid_id), Some(dcid_id), Some(new_id)) = (
        wire::conn_id_or_empty(scid),
        wire::conn_id_or_empty(dcid),
        wire::conn_id_or_empty(new_scid),
    ) else {
        assert!([scid, dcid, new_scid]
            .iter()
            .any(|c| c.len() > quiche::MAX_CONN_ID_LEN));
        return;
    };

    let mut out = [0u8; wire::STATELESS_PACKET_LEN];
    let n = wire::negotiate_version(&scid_id, &dcid_id, &mut out).expect("fits");
    let vn = wire::parse_header(&out[..n], 0).expect("our VN parses");
    assert_eq!(vn.ty, quiche::Type::VersionNegotiation);
    assert_eq!(&vn.dcid[..], scid);
    assert_eq!(&vn.scid[..], dcid);
    assert_eq!(vn.versions, Some(vec![quiche::PROTOCOL_VERSION]));

    if token.len() > wire::MAX_RETRY_TOKEN_LEN {
        return; // The NIF refuses it before quiche sees it.
    }
    let mut out = [0u8; wire::STATELESS_PACKET_LEN];
    match wire::retry(&scid_id, &dcid_id, &new_id, token, version, &mut out) {
        Ok(n) => {
            assert!(quiche::version_is_supported(version));
            let hdr = wire::parse_header(&out[..n], 0).expect("our Retry parses");
            assert_eq!(hdr.ty, quiche::Type::Retry);
            assert_eq!(hdr.version, version);
            assert_eq!(&hdr.dcid[..], scid);
            assert_eq!(&hdr.scid[..], new_scid);
            assert_eq!(hdr.token.as_deref(), Some(token));
            assert_eq!(wire::first_packet_len(&out[..n]), n);
        }
        Err(e) => {
            assert!(!quiche::version_is_supported(version), "{e:?}");
        }
    }
}

/// Input: one byte (bit 0: our role, 1 client, 0 server; the rest times 8:
/// the GRO segment size, 0 for one datagram), then what the network brings.
/// Split and fed as `connection_poll` feeds it; the connection then answers
/// and runs its timer once.
pub fn recv(data: &[u8]) {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let is_client = sel & 1 == 1;
    let seg = usize::from(sel >> 1) * 8;
    let (local, peer) = if is_client {
        (client_addr(), server_addr())
    } else {
        (server_addr(), client_addr())
    };
    let conn = if is_client {
        let scid = quiche::ConnectionId::from_ref(&CLIENT_CID);
        CLIENT.with_borrow_mut(|c| quiche::connect(Some("localhost"), &scid, local, peer, c))
    } else {
        let scid = quiche::ConnectionId::from_ref(&SERVER_CID);
        SERVER.with_borrow_mut(|c| quiche::accept(&scid, None, local, peer, c))
    };
    let mut conn = conn.expect("a fresh connection");
    let info = quiche::RecvInfo {
        from: peer,
        to: local,
    };
    let mut scratch = Vec::new();
    for datagram in wire::datagrams(bytes, seg) {
        for packet in wire::packets(datagram) {
            scratch.clear();
            scratch.extend_from_slice(packet);
            let _ = conn.recv(&mut scratch, info);
        }
    }
    drain(&mut conn);
    conn.on_timeout();
    drain(&mut conn);
}

/// Sends what the connection has to send, within a bound.
fn drain(conn: &mut quiche::Connection) {
    let mut out = [0u8; 1350];
    for _ in 0..32 {
        match conn.send(&mut out) {
            Ok((n, _)) => assert!(n <= out.len()),
            Err(_) => break,
        }
    }
    let mut buf = [0u8; 1350];
    for id in conn.readable().collect::<Vec<_>>() {
        while let Ok((n, _)) = conn.stream_recv(id, &mut buf) {
            assert!(n <= buf.len());
        }
    }
    while let Ok(n) = conn.dgram_recv(&mut buf) {
        assert!(n <= buf.len());
    }
}

/// Input: a session ticket. `connection_connect` gives it to quiche, which
/// must refuse what it cannot use and otherwise start a connection.
pub fn session(data: &[u8]) {
    let scid = quiche::ConnectionId::from_ref(&CLIENT_CID);
    let conn = CLIENT.with_borrow_mut(|c| {
        quiche::connect(Some("localhost"), &scid, client_addr(), server_addr(), c)
    });
    let mut conn = conn.expect("a fresh connection");
    if conn.set_session(data).is_ok() {
        drain(&mut conn);
    }
}
