//! What a TLS session did, seen from outside rustls.
//!
//! quinn tells a client whether its 0-RTT data was accepted, but it tells
//! neither side whether the session was resumed, nor a server whether it
//! accepted 0-RTT. So every session of quinn_peer is wrapped in
//! [`ObservedSession`], which passes everything through to quinn's rustls
//! session and watches:
//!
//! - the server's handshake messages (written by a server, read by a
//!   client): a TLS 1.3 server sends a Certificate only in a full handshake,
//!   so a Finished without one is a resumption (RFC 8446 section 2.2), and
//!   NewSessionTicket messages are counted;
//! - the 0-RTT keys: a rustls server has them only once it accepted early
//!   data (it drops them when it rejects it), a client once it offers it.
//!
//! `Connection::handshake_data()` then returns a [`Handshake`] (instead of
//! quinn's `HandshakeData`) with these facts as they are at that moment.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::crypto::{
    self, ExportKeyingMaterialError, HeaderKey, KeyPair, Keys, PacketKey, UnsupportedVersion,
};
use quinn::{ConnectError, ConnectionId, Side};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::TransportError;

/// TLS handshake message types (RFC 8446 section 4).
const NEW_SESSION_TICKET: u8 = 4;
const CERTIFICATE: u8 = 11;
const FINISHED: u8 = 20;

/// A snapshot of a session, from `Connection::handshake_data()`.
#[derive(Debug, Clone)]
pub struct Handshake {
    /// The negotiated ALPN protocol.
    pub protocol: Option<Vec<u8>>,
    /// The server's Finished went by without a Certificate before it.
    pub resumed: bool,
    /// Server: 0-RTT was accepted. Client: the server accepted our 0-RTT
    /// (false while the handshake is not complete).
    pub early_data_accepted: bool,
    /// NewSessionTicket messages from the server so far.
    pub tickets: usize,
    /// The TLS handshake is still under way.
    pub handshaking: bool,
}

/// The server's handshake messages, reassembled from a byte stream that
/// may be cut anywhere (a client reads them from CRYPTO frames).
#[derive(Default)]
struct ServerMessages {
    pending: Vec<u8>,
    certificate: bool,
    finished: bool,
    tickets: usize,
}

impl ServerMessages {
    fn feed(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        // Each message: type (1 byte), length (3 bytes), body.
        while self.pending.len() >= 4 {
            let len = u32::from_be_bytes([0, self.pending[1], self.pending[2], self.pending[3]]);
            let end = 4 + len as usize;
            if self.pending.len() < end {
                break;
            }
            match self.pending[0] {
                CERTIFICATE => self.certificate = true,
                FINISHED => self.finished = true,
                NEW_SESSION_TICKET => self.tickets += 1,
                _ => {}
            }
            self.pending.drain(..end);
        }
    }

    fn resumed(&self) -> bool {
        self.finished && !self.certificate
    }
}

/// quinn's rustls session, watched.
pub struct ObservedSession {
    inner: Box<dyn crypto::Session>,
    side: Side,
    messages: ServerMessages,
    /// Server: rustls gave us 0-RTT keys, so it accepted early data.
    early_keys: AtomicBool,
}

impl ObservedSession {
    fn new(inner: Box<dyn crypto::Session>, side: Side) -> Self {
        ObservedSession {
            inner,
            side,
            messages: ServerMessages::default(),
            early_keys: AtomicBool::new(false),
        }
    }
}

impl crypto::Session for ObservedSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        self.inner.initial_keys(dst_cid, side)
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        let inner = self.inner.handshake_data()?;
        let protocol = inner
            .downcast::<HandshakeData>()
            .ok()
            .and_then(|d| d.protocol);
        let early_data_accepted = match self.side {
            Side::Server => self.early_keys.load(Ordering::SeqCst),
            Side::Client => {
                self.inner.early_data_accepted() == Some(true) && !self.is_handshaking()
            }
        };
        Some(Box::new(Handshake {
            protocol,
            resumed: self.messages.resumed(),
            early_data_accepted,
            tickets: self.messages.tickets,
            handshaking: self.is_handshaking(),
        }))
    }

    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        self.inner.peer_identity()
    }

    fn early_crypto(&self) -> Option<(Box<dyn HeaderKey>, Box<dyn PacketKey>)> {
        let keys = self.inner.early_crypto();
        if keys.is_some() {
            self.early_keys.store(true, Ordering::SeqCst);
        }
        keys
    }

    fn early_data_accepted(&self) -> Option<bool> {
        self.inner.early_data_accepted()
    }

    fn is_handshaking(&self) -> bool {
        self.inner.is_handshaking()
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        if self.side == Side::Client {
            self.messages.feed(buf);
        }
        self.inner.read_handshake(buf)
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        self.inner.transport_parameters()
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        let start = buf.len();
        let keys = self.inner.write_handshake(buf);
        if self.side == Side::Server {
            self.messages.feed(&buf[start..]);
        }
        keys
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn PacketKey>>> {
        self.inner.next_1rtt_keys()
    }

    fn is_valid_retry(&self, orig_dst_cid: &ConnectionId, header: &[u8], payload: &[u8]) -> bool {
        self.inner.is_valid_retry(orig_dst_cid, header, payload)
    }

    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        self.inner.export_keying_material(output, label, context)
    }
}

/// quinn's rustls server config, with every session observed.
pub struct ObservedServer(pub Arc<QuicServerConfig>);

impl crypto::ServerConfig for ObservedServer {
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<Keys, UnsupportedVersion> {
        self.0.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.0.retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        version: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        let inner = crypto::ServerConfig::start_session(self.0.clone(), version, params);
        Box::new(ObservedSession::new(inner, Side::Server))
    }
}

/// quinn's rustls client config, with every session observed.
pub struct ObservedClient(pub Arc<QuicClientConfig>);

impl crypto::ClientConfig for ObservedClient {
    fn start_session(
        self: Arc<Self>,
        version: u32,
        server_name: &str,
        params: &TransportParameters,
    ) -> Result<Box<dyn crypto::Session>, ConnectError> {
        let inner =
            crypto::ClientConfig::start_session(self.0.clone(), version, server_name, params)?;
        Ok(Box::new(ObservedSession::new(inner, Side::Client)))
    }
}

/// The observed facts of a connection (None before the handshake data is
/// ready, or for a session that is not an [`ObservedSession`]).
pub fn handshake(conn: &quinn::Connection) -> Option<Handshake> {
    conn.handshake_data()
        .and_then(|d| d.downcast::<Handshake>().ok())
        .map(|d| *d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: usize) -> Vec<u8> {
        let len = (body as u32).to_be_bytes();
        let mut out = vec![kind, len[1], len[2], len[3]];
        out.resize(4 + body, 0xAA);
        out
    }

    #[test]
    fn a_full_handshake_is_not_a_resumption() {
        let mut m = ServerMessages::default();
        for (kind, body) in [
            (2, 90),
            (8, 20),
            (CERTIFICATE, 900),
            (15, 80),
            (FINISHED, 32),
        ] {
            m.feed(&message(kind, body));
        }
        assert!(m.finished && m.certificate && !m.resumed());
    }

    #[test]
    fn messages_cut_anywhere_are_reassembled() {
        let mut stream = Vec::new();
        for (kind, body) in [(2, 90), (8, 20), (FINISHED, 32), (NEW_SESSION_TICKET, 200)] {
            stream.extend(message(kind, body));
        }
        let mut m = ServerMessages::default();
        for chunk in stream.chunks(7) {
            m.feed(chunk);
        }
        assert!(m.resumed());
        assert_eq!(m.tickets, 1);
        assert!(m.pending.is_empty());
    }
}
