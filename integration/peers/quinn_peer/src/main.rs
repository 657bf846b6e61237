//! QUIC echo peer on quinn, a foreign peer for Quichex's interop tests.
//!
//! `quinn_peer server ...` and `quinn_peer client ...` mirror
//! `../aioquic_echo_server.py` and `../aioquic_echo_client.py`: same flags,
//! same echo protocol (including the `RESET <code>` / `STOP <code>` stream
//! commands, DATAGRAM frames echoed as DATAGRAM frames), same stdout lines
//! (the client's JSON line has `key_update` instead of `key_phase`). See
//! `../README.md`.

mod observe;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    ConnectionError, Endpoint, Incoming, ReadError, ReadToEndError, SendDatagramError,
    TransportConfig, VarInt,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring as provider, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// Seconds the client lingers after sending CONNECTION_CLOSE (as the aioquic client).
const CLOSE_GRACE: Duration = Duration::from_millis(250);
const DEFAULT_ALPN: &str = "quichex-echo";
/// `--dgrams`: stop waiting for echoes after this long without one.
const DGRAM_QUIET: Duration = Duration::from_millis(500);
/// Bytes of DATAGRAM payloads buffered each way (quinn's defaults are about as large).
const DGRAM_BUFFER: usize = 1 << 20;
/// How often the server looks at each client's address (for `MIGRATED`).
const PEER_ADDRESS_POLL: Duration = Duration::from_millis(10);

fn main() -> ExitCode {
    let mut argv: VecDeque<String> = std::env::args().skip(1).collect();
    let mode = argv.pop_front().unwrap_or_default();
    let args = match Args::parse(argv) {
        Ok(args) => args,
        Err(msg) => usage(&msg),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match mode.as_str() {
        "server" => match rt.block_on(server(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("quinn_peer server: {e}");
                ExitCode::FAILURE
            }
        },
        "client" => rt.block_on(client(args)),
        _ => usage("first argument must be `server` or `client`"),
    }
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "quinn_peer: {msg}\n\
         usage: quinn_peer server [--host H] [--port N] --cert PEM --key PEM [--alpn NAME]... \
         [--retry] [--idle-timeout S] [--chacha20]\n       \
         quinn_peer client [--host H] --port N [--alpn NAME] [--cafile PEM | --insecure] \
         [--server-name NAME] [--streams N] [--uni N] [--size BYTES] [--close-code N] \
         [--close-reason TEXT] [--timeout S] [--key-update] [--chacha20] [--reset-code N] \
         [--stop-code N] [--ask-reset N] [--ask-stop N] [--wait-idle S] [--version HEX] \
         [--dgrams N] [--dgram-size BYTES] [--dgram-burst N] [--resume [--early-data]] \
         [--rebind]"
    );
    std::process::exit(2) // like argparse
}

// ---------------------------------------------------------------- arguments

#[derive(Debug)]
struct Args {
    host: String,
    port: Option<u16>,
    cert: Option<String>,
    key: Option<String>,
    alpn: Vec<String>,
    retry: bool,
    idle_timeout: f64,
    chacha20: bool,
    cafile: Option<String>,
    insecure: bool,
    server_name: Option<String>,
    streams: usize,
    uni: usize,
    size: usize,
    close_code: u64,
    close_reason: String,
    timeout: f64,
    key_update: bool,
    reset_code: Option<u64>,
    stop_code: Option<u64>,
    ask_reset: Option<u64>,
    ask_stop: Option<u64>,
    wait_idle: Option<f64>,
    version: Option<u32>,
    dgrams: usize,
    dgram_size: usize,
    dgram_burst: usize,
    resume: bool,
    early_data: bool,
    rebind: bool,
}

impl Args {
    /// Accepts `--flag value` and `--flag=value`, as argparse does.
    fn parse(mut argv: VecDeque<String>) -> Result<Args, String> {
        let mut a = Args {
            host: "127.0.0.1".into(),
            port: None,
            cert: None,
            key: None,
            alpn: Vec::new(),
            retry: false,
            idle_timeout: 30.0,
            chacha20: false,
            cafile: None,
            insecure: false,
            server_name: None,
            streams: 1,
            uni: 0,
            size: 1000,
            close_code: 0,
            close_reason: "done".into(),
            timeout: 30.0,
            key_update: false,
            reset_code: None,
            stop_code: None,
            ask_reset: None,
            ask_stop: None,
            wait_idle: None,
            version: None,
            dgrams: 0,
            dgram_size: 1000,
            dgram_burst: 20,
            resume: false,
            early_data: false,
            rebind: false,
        };
        while let Some(arg) = argv.pop_front() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (arg, None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| argv.pop_front())
                    .ok_or(format!("{flag} needs a value"))
            };
            fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
                v.parse()
                    .map_err(|_| format!("{flag}: invalid number {v:?}"))
            }
            match flag.as_str() {
                "--host" => a.host = value()?,
                "--port" => a.port = Some(num(&flag, value()?)?),
                "--cert" => a.cert = Some(value()?),
                "--key" => a.key = Some(value()?),
                "--alpn" => a.alpn.push(value()?),
                "--idle-timeout" => a.idle_timeout = num(&flag, value()?)?,
                "--cafile" => a.cafile = Some(value()?),
                "--server-name" => a.server_name = Some(value()?),
                "--streams" => a.streams = num(&flag, value()?)?,
                "--uni" => a.uni = num(&flag, value()?)?,
                "--size" => a.size = num(&flag, value()?)?,
                "--close-code" => a.close_code = num(&flag, value()?)?,
                "--close-reason" => a.close_reason = value()?,
                "--timeout" => a.timeout = num(&flag, value()?)?,
                "--reset-code" => a.reset_code = Some(num(&flag, value()?)?),
                "--stop-code" => a.stop_code = Some(num(&flag, value()?)?),
                "--ask-reset" => a.ask_reset = Some(num(&flag, value()?)?),
                "--ask-stop" => a.ask_stop = Some(num(&flag, value()?)?),
                "--wait-idle" => a.wait_idle = Some(num(&flag, value()?)?),
                "--dgrams" => a.dgrams = num(&flag, value()?)?,
                "--dgram-size" => a.dgram_size = num(&flag, value()?)?,
                "--dgram-burst" => a.dgram_burst = num(&flag, value()?)?,
                "--version" => {
                    let v = value()?;
                    let hex = v.trim_start_matches("0x").trim_start_matches("0X");
                    a.version = Some(
                        u32::from_str_radix(hex, 16)
                            .map_err(|_| format!("{flag}: invalid hex version {v:?}"))?,
                    );
                }
                "--retry" | "--chacha20" | "--insecure" | "--key-update" | "--resume"
                | "--early-data" | "--rebind"
                    if inline.is_some() =>
                {
                    return Err(format!("{flag} takes no value"))
                }
                "--retry" => a.retry = true,
                "--chacha20" => a.chacha20 = true,
                "--insecure" => a.insecure = true,
                "--key-update" => a.key_update = true,
                "--resume" => a.resume = true,
                "--early-data" => a.early_data = true,
                "--rebind" => a.rebind = true,
                _ => return Err(format!("unknown argument {flag:?}")),
            }
        }
        if a.cafile.is_some() && a.insecure {
            return Err("--cafile and --insecure are mutually exclusive".into());
        }
        if a.early_data && !a.resume {
            return Err("--early-data needs --resume".into());
        }
        if a.resume && a.version.is_some() {
            return Err("--resume and --version cannot be combined".into());
        }
        if a.dgrams > 0 && a.dgram_size < 4 {
            return Err("--dgram-size must be at least 4 (the index)".into());
        }
        Ok(a)
    }

    fn addr(&self, port: u16) -> Result<SocketAddr, String> {
        (self.host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?
            .next()
            .ok_or(format!("cannot resolve {}", self.host))
    }
}

// ---------------------------------------------------------------- TLS

/// The *ring* provider, optionally restricted to TLS_CHACHA20_POLY1305_SHA256.
fn crypto_provider(chacha20: bool) -> Arc<CryptoProvider> {
    let mut p = provider::default_provider();
    if chacha20 {
        p.cipher_suites = vec![provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    }
    Arc::new(p)
}

/// Initial packets are always protected with AES-128-GCM (RFC 9001 §5.2),
/// whatever suites TLS may negotiate. quinn's `TryFrom` looks for it in the
/// provider's list, so with `--chacha20` it must be passed explicitly.
fn initial_suite() -> rustls::quic::Suite {
    provider::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .and_then(|s| s.quic_suite())
        .expect("AES-128-GCM QUIC suite")
}

fn transport(idle_timeout: Duration) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(idle_timeout.try_into().expect("idle timeout")))
        .max_concurrent_bidi_streams(1000u32.into())
        .max_concurrent_uni_streams(1000u32.into())
        .datagram_receive_buffer_size(Some(DGRAM_BUFFER))
        .datagram_send_buffer_size(DGRAM_BUFFER);
    Arc::new(t)
}

/// `--insecure`: accept any certificate (signatures are still checked).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            msg,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            msg,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// webpki, plus one thing OpenSSL (hence aioquic) allows: a server
/// certificate that is itself in `--cafile` is trusted directly, even when it
/// is a self-signed CA certificate (`openssl req -x509` makes CA:TRUE ones,
/// which webpki rejects as CaUsedAsEndEntity). Its names are still checked.
#[derive(Debug)]
struct DirectTrust {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for DirectTrust {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError::Other, Error::InvalidCertificate};
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(InvalidCertificate(Other(_))) if self.pinned.iter().any(|c| c == end_entity) => {
                let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&parsed, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            result => result,
        }
    }
    fn verify_tls12_signature(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(msg, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(msg, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

// ---------------------------------------------------------------- server

/// One line on stdout, flushed.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn server(args: Args) -> Result<(), String> {
    let (cert, key) = match (&args.cert, &args.key) {
        (Some(c), Some(k)) => (c, k),
        _ => usage("server needs --cert and --key"),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;

    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider(args.chacha20))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    let alpn = if args.alpn.is_empty() {
        vec![DEFAULT_ALPN.to_string()]
    } else {
        args.alpn.clone()
    };
    tls.alpn_protocols = alpn.into_iter().map(String::into_bytes).collect();
    tls.max_early_data_size = u32::MAX; // as quinn's own default config
    let tls = QuicServerConfig::with_initial(Arc::new(tls), initial_suite())
        .map_err(|e| e.to_string())?;
    let tls = observe::ObservedServer(Arc::new(tls));
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(tls));
    config.transport_config(transport(Duration::from_secs_f64(args.idle_timeout)));

    let endpoint = Endpoint::server(config, args.addr(args.port.unwrap_or(0))?)
        .map_err(|e| format!("bind {}: {e}", args.host))?;
    say(&format!(
        "LISTENING {}",
        endpoint.local_addr().map_err(|e| e.to_string())?.port()
    ));
    watch_stdin();

    while let Some(incoming) = endpoint.accept().await {
        if args.retry && !incoming.remote_address_validated() {
            // Answer with a Retry; the client's next Initial carries the token.
            let _ = incoming.retry();
            continue;
        }
        tokio::spawn(serve_connection(incoming));
    }
    Ok(())
}

/// Exit when stdin reaches EOF (the Erlang port was closed). A stdin that is
/// not a pipe, socket or terminal (`< /dev/null`, a file) is not watched.
fn watch_stdin() {
    use std::io::IsTerminal;
    let stdin = std::io::stdin();
    let watchable = stdin.is_terminal()
        || std::fs::metadata("/dev/stdin")
            .map(|m| m.file_type().is_fifo() || m.file_type().is_socket())
            .unwrap_or(false);
    if !watchable {
        return;
    }
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut lock = stdin.lock();
        while matches!(lock.read(&mut buf), Ok(n) if n > 0) {}
        let _ = std::io::stdout().flush();
        std::process::exit(0);
    });
}

async fn serve_connection(incoming: Incoming) {
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => return report_close(&e),
    };
    // Served from the start (quinn calls it 0.5-RTT), so that streams a
    // client sends as 0-RTT data are read before the handshake completes.
    let (conn, handshake_done) = match connecting.into_0rtt() {
        Ok((conn, done)) => (conn, Some(done)),
        Err(connecting) => match connecting.await {
            Ok(conn) => (conn, None),
            Err(e) => return report_close(&e),
        },
    };

    let bidi = conn.clone();
    tokio::spawn(async move {
        while let Ok((send, recv)) = bidi.accept_bi().await {
            tokio::spawn(echo_bidi(send, recv, bidi.clone()));
        }
    });
    let uni = conn.clone();
    tokio::spawn(async move {
        while let Ok(mut recv) = uni.accept_uni().await {
            // Buffer until FIN, then send it all back on a new uni stream.
            let conn = uni.clone();
            tokio::spawn(async move {
                let Ok(data) = recv.read_to_end(usize::MAX).await else {
                    return;
                };
                let Ok(mut send) = conn.open_uni().await else {
                    return;
                };
                if send.write_all(&data).await.is_ok() {
                    let _ = send.finish();
                }
            });
        }
    });
    // DATAGRAM frames: each one echoed as it comes, counted for `DATAGRAMS <n>`.
    let datagrams = Arc::new(AtomicUsize::new(0));
    let (dgram_conn, count) = (conn.clone(), datagrams.clone());
    tokio::spawn(async move {
        while let Ok(data) = dgram_conn.read_datagram().await {
            count.fetch_add(1, Ordering::SeqCst);
            // One that does not fit in our packets (TooLarge) is not echoed.
            if let Err(SendDatagramError::ConnectionLost(_)) =
                dgram_conn.send_datagram_wait(data).await
            {
                break;
            }
        }
    });

    if let Some(done) = handshake_done {
        done.await; // true or false: resolves when the handshake ends either way
    }
    let handshake = observe::handshake(&conn).filter(|h| !h.handshaking);
    let Some(handshake) = handshake else {
        // e.g. no common ALPN: we closed it
        if let Some(e) = conn.close_reason() {
            report_close(&e);
        }
        return;
    };
    let alpn = handshake
        .protocol
        .as_ref()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_else(|| "None".into());
    say(&format!("CONNECTED {alpn}"));
    if handshake.resumed {
        say("RESUMED");
    }
    if handshake.early_data_accepted {
        say("EARLY_DATA accepted");
    }
    tokio::spawn(watch_peer_address(conn.clone()));

    let closed = conn.closed().await;
    let n = datagrams.load(Ordering::SeqCst);
    if n > 0 {
        say(&format!("DATAGRAMS {n}"));
    }
    report_close(&closed);
}

/// `MIGRATED <old> <new>` whenever the client's address changes (quinn
/// follows a client that migrated, but has no event for it).
async fn watch_peer_address(conn: quinn::Connection) {
    let mut peer = conn.remote_address();
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            _ = tokio::time::sleep(PEER_ADDRESS_POLL) => {}
        }
        let now = conn.remote_address();
        if now != peer {
            say(&format!("MIGRATED {peer} {now}"));
            peer = now;
        }
    }
}

/// What the first bytes of a bidi stream ask for.
#[derive(Debug, PartialEq)]
enum Command {
    /// Not a command (or not yet known): echo.
    Echo,
    /// Could still become a command: read more.
    Wait,
    Reset(u64),
    Stop(u64),
}

/// `RESET <code>\n` / `STOP <code>\n` at the start of a bidi stream.
fn parse_command(head: &[u8]) -> Command {
    const WORDS: [&[u8]; 2] = [b"RESET ", b"STOP "];
    const MAX_COMMAND: usize = 32;
    if !WORDS
        .iter()
        .any(|w| head.starts_with(w) || w.starts_with(head))
    {
        return Command::Echo;
    }
    let Some(end) = head.iter().position(|&b| b == b'\n') else {
        return if head.len() < MAX_COMMAND {
            Command::Wait
        } else {
            Command::Echo
        };
    };
    let line = String::from_utf8_lossy(&head[..end]);
    let code = line
        .split_once(' ')
        .and_then(|(_, c)| c.parse::<u64>().ok());
    match (line.split(' ').next(), code) {
        (Some("RESET"), Some(code)) => Command::Reset(code),
        (Some("STOP"), Some(code)) => Command::Stop(code),
        _ => Command::Echo,
    }
}

/// Echo each chunk on the same stream and answer FIN with FIN, unless the
/// stream starts with a command. Reports the client's RESET_STREAM and
/// STOP_SENDING as `STREAM_RESET <id> <code>` / `STOP_SENDING <id> <code>`.
async fn echo_bidi(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    conn: quinn::Connection,
) {
    let id = u64::from(send.id());
    let mut early = EarlyBytes::new(id, conn);
    let stopped = send.stopped();
    tokio::spawn(async move {
        if let Ok(Some(code)) = stopped.await {
            say(&format!("STOP_SENDING {id} {code}"));
        }
    });
    let mut head: Option<Vec<u8>> = Some(Vec::new()); // None once classified
    let mut echo = true;
    loop {
        let read = recv.read_chunk(usize::MAX, true).await;
        early.count(&read);
        match read {
            Ok(Some(chunk)) => {
                let Some(h) = head.as_mut() else {
                    if echo && send.write_chunk(chunk.bytes).await.is_err() {
                        echo = false;
                    }
                    continue;
                };
                h.extend_from_slice(&chunk.bytes);
                let command = parse_command(h);
                if command == Command::Wait {
                    continue;
                }
                let h = head.take().unwrap_or_default();
                match command {
                    Command::Reset(code) => {
                        echo = false;
                        let _ = send.reset(VarInt::from_u64(code).unwrap_or(VarInt::MAX));
                    }
                    Command::Stop(code) => {
                        let _ = recv.stop(VarInt::from_u64(code).unwrap_or(VarInt::MAX));
                        // Keep our side open until the connection ends, as aioquic does.
                        let _ = send.stopped().await;
                        return;
                    }
                    _ => {
                        if send.write_all(&h).await.is_err() {
                            echo = false;
                        }
                    }
                }
            }
            Ok(None) => {
                if let Some(h) = head.take() {
                    echo = echo && send.write_all(&h).await.is_ok();
                }
                if echo {
                    let _ = send.finish();
                }
                return;
            }
            Err(ReadError::Reset(code)) => {
                say(&format!("STREAM_RESET {id} {code}"));
                return;
            }
            Err(_) => return,
        }
    }
}

/// `EARLY_STREAM <id> <n>`: the first `n` bytes of a bidi stream were read
/// before the handshake completed, so they came as 0-RTT data. Printed when
/// the stream ends or its first byte after the handshake is read; nothing
/// for a stream that had none.
struct EarlyBytes {
    id: u64,
    /// None once reported (or known to be nothing).
    conn: Option<quinn::Connection>,
    bytes: usize,
}

impl EarlyBytes {
    fn new(id: u64, conn: quinn::Connection) -> Self {
        EarlyBytes {
            id,
            conn: Some(conn),
            bytes: 0,
        }
    }

    fn count(&mut self, read: &Result<Option<quinn::Chunk>, ReadError>) {
        let Some(conn) = &self.conn else {
            return;
        };
        let handshaking = observe::handshake(conn).is_some_and(|h| h.handshaking);
        match read {
            Ok(Some(chunk)) if handshaking => self.bytes += chunk.bytes.len(),
            Ok(Some(_)) => self.report(),
            // FIN, a reset or an error: the stream is done.
            _ => self.report(),
        }
    }

    fn report(&mut self) {
        if self.conn.take().is_some() && self.bytes > 0 {
            say(&format!("EARLY_STREAM {} {}", self.id, self.bytes));
        }
    }
}

/// `CLOSED <code> <reason>` for a close by either side, except idle timeouts.
fn report_close(e: &ConnectionError) {
    if let Some((code, reason)) = close_code(e) {
        say(&format!(
            "CLOSED {code} {}",
            reason.replace(['\r', '\n'], " ")
        ));
    }
}

/// (code, reason) of a CONNECTION_CLOSE sent or received; None for idle
/// timeouts, stateless resets and the like, which have no code.
fn close_code(e: &ConnectionError) -> Option<(u64, String)> {
    match e {
        ConnectionError::ApplicationClosed(c) => Some((
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        )),
        ConnectionError::ConnectionClosed(c) => Some((
            u64::from(c.error_code),
            String::from_utf8_lossy(&c.reason).into_owned(),
        )),
        ConnectionError::TransportError(t) => Some((u64::from(t.code), t.reason.clone())),
        _ => None,
    }
}

fn describe(e: &ConnectionError) -> String {
    match close_code(e) {
        Some((code, reason)) => format!("connection closed, code {code}, reason '{reason}'"),
        None => format!("connection closed: {e}"),
    }
}

// ---------------------------------------------------------------- client

struct Report {
    ok: bool,
    alpn: Option<String>,
    bidi: usize,
    uni: usize,
    bytes: usize,
    mbps: f64,
    key_update: bool,
    /// Keys of the optional flags, with their JSON values, before "error".
    extra: Vec<(&'static str, String)>,
    error: Option<String>,
}

/// A JSON string, or null.
fn json_str(v: &Option<String>) -> String {
    match v {
        None => "null".into(),
        Some(v) => {
            let mut out = String::from("\"");
            for c in v.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out + "\""
        }
    }
}

impl Report {
    fn json(&self) -> String {
        let extra: String = self
            .extra
            .iter()
            .map(|(k, v)| format!("\"{k}\": {v}, "))
            .collect();
        format!(
            "{{\"ok\": {}, \"alpn\": {}, \"bidi\": {}, \"uni\": {}, \"bytes\": {}, \"mbps\": {:.2}, \
             \"key_update\": {}, {extra}\"error\": {}}}",
            self.ok, json_str(&self.alpn), self.bidi, self.uni, self.bytes, self.mbps, self.key_update,
            json_str(&self.error)
        )
    }
}

/// What a timeout message reports.
#[derive(Default)]
struct Progress {
    connected: AtomicBool,
    echoes: AtomicUsize,
    /// Bytes of bidi echoes received so far (for --rebind).
    echoed_bytes: AtomicUsize,
}

/// SIZE deterministic bytes, different for each seed (splitmix64).
fn payload(seed: u64, size: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(size);
    out
}

async fn client(args: Args) -> ExitCode {
    let mut report = Report {
        ok: false,
        alpn: None,
        bidi: 0,
        uni: 0,
        bytes: 0,
        mbps: 0.0,
        key_update: false,
        extra: Vec::new(),
        error: None,
    };
    let progress = Arc::new(Progress::default());
    let budget = Duration::from_secs_f64(args.timeout.max(0.0));
    let mut endpoint = None;
    let outcome = tokio::time::timeout(
        budget.saturating_sub(CLOSE_GRACE),
        run_client(&args, &mut report, &mut endpoint, &progress),
    )
    .await;
    let conn = match outcome {
        Ok(Ok(conn)) => {
            conn.close(
                VarInt::from_u64(args.close_code).unwrap_or(VarInt::MAX),
                args.close_reason.as_bytes(),
            );
            report.ok = true;
            Some(conn)
        }
        Ok(Err((conn, e))) => {
            report.error = Some(e);
            conn
        }
        Err(_) => {
            let done = if progress.connected.load(Ordering::SeqCst) {
                "done"
            } else {
                "not done"
            };
            report.error = Some(format!(
                "timeout after {:?}s: handshake {done}, {} of {} echoes complete",
                args.timeout,
                progress.echoes.load(Ordering::SeqCst),
                args.streams + args.uni
            ));
            None
        }
    };
    if !report.ok {
        (report.bidi, report.uni, report.bytes, report.mbps) = (0, 0, 0, 0.0);
        if let Some(conn) = &conn {
            conn.close(0u32.into(), b"");
        }
    }
    if let Some(endpoint) = endpoint {
        if !report.ok {
            endpoint.close(0u32.into(), b""); // also covers a timed-out handshake
        }
        // Let the CONNECTION_CLOSE go out; quinn drains for 3 PTO: cap it.
        let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
    }
    drop(conn);
    say(&report.json());
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

type Failure = (Option<quinn::Connection>, String);

async fn run_client(
    args: &Args,
    report: &mut Report,
    endpoint_out: &mut Option<Endpoint>,
    progress: &Arc<Progress>,
) -> Result<quinn::Connection, Failure> {
    let fail = |e: String| (None, e);
    let port = args.port.unwrap_or_else(|| usage("client needs --port"));
    let server = args.addr(port).map_err(fail)?;

    let provider = crypto_provider(args.chacha20);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| fail(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = if args.insecure {
        Arc::new(NoVerify(provider.clone()))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        let mut pinned = Vec::new();
        match &args.cafile {
            Some(path) => {
                for cert in
                    CertificateDer::pem_file_iter(path).map_err(|e| fail(format!("{path}: {e}")))?
                {
                    let cert = cert.map_err(|e| fail(format!("{path}: {e}")))?;
                    roots
                        .add(cert.clone())
                        .map_err(|e| fail(format!("{path}: {e}")))?;
                    pinned.push(cert);
                }
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| {
            fail(format!(
                "{}: {e}",
                args.cafile.as_deref().unwrap_or("system CAs")
            ))
        })?;
        Arc::new(DirectTrust { webpki, pinned })
    };
    let mut tls = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![args
        .alpn
        .last()
        .map_or(DEFAULT_ALPN, |s| s.as_str())
        .as_bytes()
        .to_vec()];
    tls.enable_early_data = true; // as quinn's own default config
    let tls = QuicClientConfig::with_initial(Arc::new(tls), initial_suite())
        .map_err(|e| fail(e.to_string()))?;
    // Every connection of the run shares this rustls config, and with it
    // rustls' session cache: the tickets that --resume resumes with.
    let tls = observe::ObservedClient(Arc::new(tls));
    let mut config = quinn::ClientConfig::new(Arc::new(tls));
    config.transport_config(transport(Duration::from_secs(30)));
    if let Some(version) = args.version {
        // quinn can only start with a version it knows (v1, drafts 29..34).
        config.version(version);
    }

    let local: IpAddr = match (server.is_ipv4(), server.ip().is_loopback()) {
        (true, true) => Ipv4Addr::LOCALHOST.into(),
        (true, false) => Ipv4Addr::UNSPECIFIED.into(),
        (false, true) => Ipv6Addr::LOCALHOST.into(),
        (false, false) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let mut endpoint =
        Endpoint::client(SocketAddr::new(local, 0)).map_err(|e| fail(format!("bind: {e}")))?;
    endpoint.set_default_client_config(config.clone());
    *endpoint_out = Some(endpoint.clone());

    let name = args
        .server_name
        .clone()
        .unwrap_or_else(|| args.host.clone());
    if args.resume {
        first_connection(&endpoint, server, &name)
            .await
            .map_err(fail)?;
    }
    let connecting = endpoint
        .connect(server, &name)
        .map_err(|e| fail(format!("connect failed: {e}")))?;
    let started = Instant::now();
    // --early-data: with a ticket that allows it, the connection is usable
    // at once and exchange() sends its streams as 0-RTT data.
    let (mut attempt, zero_rtt) = if args.early_data {
        match connecting.into_0rtt() {
            Ok((conn, accepted)) => (Ok(conn), Some(accepted)),
            Err(connecting) => (connecting.await, None),
        }
    } else {
        (connecting.await, None)
    };
    if args.version.is_some() {
        // quinn does not retry after a Version Negotiation packet: it fails
        // the attempt with VersionMismatch. Start a new one with QUIC v1, as
        // RFC 9000 section 6.2 allows.
        let negotiated = matches!(attempt, Err(ConnectionError::VersionMismatch));
        if negotiated {
            config.version(1);
            attempt = endpoint
                .connect_with(config, server, &name)
                .map_err(|e| fail(format!("connect failed: {e}")))?
                .await;
        }
        let version = if negotiated {
            1
        } else {
            args.version.unwrap_or(1)
        };
        report.extra.push(("version", version.to_string()));
        report.extra.push(("vn", negotiated.to_string()));
    }
    let conn = attempt.map_err(|e| fail(format!("handshake failed: {}", describe(&e))))?;
    let alpn = |conn: &quinn::Connection| {
        observe::handshake(conn)
            .and_then(|h| h.protocol)
            .map(|p| String::from_utf8_lossy(&p).into_owned())
    };
    if zero_rtt.is_none() {
        progress.connected.store(true, Ordering::SeqCst);
        report.alpn = alpn(&conn);
    }

    // Measured from the end of the handshake, or from the start of a 0-RTT one.
    let started = if zero_rtt.is_none() {
        Instant::now()
    } else {
        started
    };
    if let Err(e) = exchange(args, &conn, &endpoint, report, progress).await {
        return Err((Some(conn), e));
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    report.mbps = report.bytes as f64 / secs / 1e6;
    if args.early_data {
        let outcome = match zero_rtt {
            // Resolves when the handshake completes (it has: the echoes came).
            Some(accepted) => {
                if accepted.await {
                    "accepted"
                } else {
                    "rejected"
                }
            }
            // No ticket that allows 0-RTT: the streams waited for the handshake.
            None => "none",
        };
        progress.connected.store(true, Ordering::SeqCst);
        report.alpn = alpn(&conn);
        report
            .extra
            .push(("early_data", json_str(&Some(outcome.into()))));
    }
    if args.resume {
        let resumed = observe::handshake(&conn).is_some_and(|h| h.resumed);
        report.extra.push(("resumed", resumed.to_string()));
    }
    if let Err(e) = datagrams(args, &conn, report).await {
        return Err((Some(conn), e));
    }
    if let Err(e) = specials(args, &conn, report).await {
        return Err((Some(conn), e));
    }
    if let Some(wait) = args.wait_idle {
        // Send nothing more; wait for the connection to end by itself.
        let waited = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs_f64(wait), conn.closed())
            .await
            .map_err(|_| {
                (
                    Some(conn.clone()),
                    format!("the connection was still open after --wait-idle {wait}s"),
                )
            })?;
        let ended = match ended {
            ConnectionError::TimedOut => "idle timeout".to_string(),
            e => describe(&e),
        };
        report.extra.push(("ended", json_str(&Some(ended))));
        report
            .extra
            .push(("ended_after_ms", waited.elapsed().as_millis().to_string()));
    }
    Ok(conn)
}

/// `--rebind`: once the first half of every stream is written (and while
/// it is still in flight), moves the endpoint to a new UDP socket (a new
/// local port) before the second halves are sent: an active migration,
/// which the server sees as packets from a new address, mid-transfer.
async fn rebind_midway(
    conn: &quinn::Connection,
    endpoint: &Endpoint,
    report: &mut Report,
) -> Result<(), String> {
    if let Some(e) = conn.close_reason() {
        return Err(describe(&e));
    }
    let old = endpoint
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    let socket = std::net::UdpSocket::bind(SocketAddr::new(old.ip(), 0))
        .map_err(|e| format!("--rebind: bind: {e}"))?;
    endpoint
        .rebind(socket)
        .map_err(|e| format!("--rebind: {e}"))?;
    let new = endpoint
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    report.extra.push(("rebind_from", old.port().to_string()));
    report.extra.push(("rebind_to", new.port().to_string()));
    Ok(())
}

/// `--resume`: a first connection, only for a session ticket. It is closed
/// (code 0, reason `resume`) as soon as rustls has stored one.
async fn first_connection(
    endpoint: &Endpoint,
    server: SocketAddr,
    name: &str,
) -> Result<(), String> {
    let conn = endpoint
        .connect(server, name)
        .map_err(|e| format!("connect failed: {e}"))?
        .await
        .map_err(|e| format!("first connection: handshake failed: {}", describe(&e)))?;
    while observe::handshake(&conn).map_or(0, |h| h.tickets) == 0 {
        if let Some(e) = conn.close_reason() {
            return Err(format!("first connection: {}", describe(&e)));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    conn.close(0u32.into(), b"resume");
    Ok(())
}

/// `--dgrams N`: the index (4 bytes, big-endian), then bytes seeded 2_000_000 + index.
fn dgram_payload(index: usize, size: usize) -> Vec<u8> {
    let mut out = (index as u32).to_be_bytes().to_vec();
    out.extend(payload(2_000_000 + index as u64, size - 4));
    out
}

/// `--dgrams N`: sends N DATAGRAM frames of `--dgram-size` bytes,
/// `--dgram-burst` at a time; after each burst, waits until every datagram
/// sent so far is back or none came for `DGRAM_QUIET`.
async fn datagrams(
    args: &Args,
    conn: &quinn::Connection,
    report: &mut Report,
) -> Result<(), String> {
    if args.dgrams == 0 {
        return Ok(());
    }
    match conn.max_datagram_size() {
        None => return Err("the server does not accept DATAGRAM frames".into()),
        Some(max) if args.dgram_size > max => {
            return Err(format!(
                "--dgram-size {}: the largest datagram that fits now is {max} bytes",
                args.dgram_size
            ))
        }
        Some(_) => {}
    }
    let sent: Vec<Vec<u8>> = (0..args.dgrams)
        .map(|i| dgram_payload(i, args.dgram_size))
        .collect();
    let burst = if args.dgram_burst == 0 {
        sent.len()
    } else {
        args.dgram_burst
    };
    let mut echoed = vec![false; sent.len()];
    let (mut count, mut dup, mut bad) = (0, 0, 0);
    for (round, chunk) in sent.chunks(burst).enumerate() {
        for data in chunk {
            conn.send_datagram_wait(data.clone().into())
                .await
                .map_err(|e| format!("send_datagram: {e}"))?;
        }
        let target = round * burst + chunk.len();
        while count < target {
            // quinn buffers what arrives meanwhile (DGRAM_BUFFER bytes).
            let data = match tokio::time::timeout(DGRAM_QUIET, conn.read_datagram()).await {
                Err(_) => break, // none for DGRAM_QUIET
                Ok(Err(e)) => return Err(describe(&e)),
                Ok(Ok(data)) => data,
            };
            let index = data
                .get(..4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
            match index {
                Some(i) if i < sent.len() && data[..] == sent[i][..] => {
                    if echoed[i] {
                        dup += 1;
                    } else {
                        echoed[i] = true;
                        count += 1;
                    }
                }
                _ => bad += 1,
            }
        }
    }
    for (key, n) in [
        ("dgrams_sent", sent.len()),
        ("dgrams_echoed", count),
        ("dgrams_dup", dup),
        ("dgrams_bad", bad),
    ] {
        report.extra.push((key, n.to_string()));
    }
    if dup > 0 || bad > 0 {
        return Err(format!(
            "datagram echoes: {dup} duplicated, {bad} not sent by us"
        ));
    }
    if count == 0 {
        return Err(format!("none of the {} datagrams came back", sent.len()));
    }
    Ok(())
}

/// `--reset-code`, `--stop-code`, `--ask-reset`, `--ask-stop`: one new bidi
/// stream each, in that order, after the echoes.
async fn specials(
    args: &Args,
    conn: &quinn::Connection,
    report: &mut Report,
) -> Result<(), String> {
    let code = |c: u64| VarInt::from_u64(c).unwrap_or(VarInt::MAX);
    let open = |data: Vec<u8>| async move {
        let (mut send, recv) = conn.open_bi().await.map_err(|e| describe(&e))?;
        send.write_all(&data)
            .await
            .map_err(|e| format!("stream {}: {e}", send.id()))?;
        Ok::<_, String>((send, recv))
    };
    if let Some(c) = args.reset_code {
        // Reset our side; wait until the peer ends its side (FIN or RESET_STREAM).
        let (mut send, mut recv) = open(b"x".to_vec()).await?;
        let _ = send.reset(code(c));
        match recv.read_to_end(usize::MAX).await {
            Ok(_) | Err(ReadToEndError::Read(ReadError::Reset(_))) => {}
            Err(e) => return Err(format!("reset stream {}: {e}", recv.id())),
        }
        report.extra.push(("reset_sent", c.to_string()));
    }
    if let Some(c) = args.stop_code {
        // STOP_SENDING; the peer must answer with RESET_STREAM (RFC 9000
        // section 3.5). quinn hides a stopped stream's RESET_STREAM, so count frames.
        let (_send, mut recv) = open(b"x".to_vec()).await?;
        let before = conn.stats().frame_rx.reset_stream;
        let _ = recv.stop(code(c));
        while conn.stats().frame_rx.reset_stream == before {
            if let Some(e) = conn.close_reason() {
                return Err(describe(&e));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        report.extra.push(("stop_sent", c.to_string()));
    }
    if let Some(c) = args.ask_reset {
        let (_send, mut recv) = open(format!("RESET {c}\n").into_bytes()).await?;
        match recv.read_to_end(usize::MAX).await {
            Err(ReadToEndError::Read(ReadError::Reset(got))) => {
                report.extra.push(("peer_reset", got.to_string()));
            }
            Ok(_) => {
                return Err(format!(
                    "stream {}: the peer finished it instead of resetting it",
                    recv.id()
                ))
            }
            Err(e) => return Err(format!("stream {}: {e}", recv.id())),
        }
    }
    if let Some(c) = args.ask_stop {
        let (send, _recv) = open(format!("STOP {c}\n").into_bytes()).await?;
        match send.stopped().await {
            Ok(Some(got)) => report.extra.push(("peer_stop", got.to_string())),
            Ok(None) => return Err(format!("stream {}: not stopped by the peer", send.id())),
            Err(e) => return Err(format!("stream {}: {e}", send.id())),
        }
    }
    Ok(())
}

/// Sends SIZE bytes + FIN on every stream and checks every echo.
async fn exchange(
    args: &Args,
    conn: &quinn::Connection,
    endpoint: &Endpoint,
    report: &mut Report,
    progress: &Arc<Progress>,
) -> Result<(), String> {
    let half = args.size / 2;
    // Each task yields nothing, or (the uni acceptor) every uni echo.
    let mut tasks: JoinSet<Result<Option<Vec<Vec<u8>>>, String>> = JoinSet::new();
    // Writers report their first half here, then wait for the gate: with
    // --key-update the keys are updated in between, with --rebind the
    // endpoint moves to a new socket.
    let (halfway_tx, mut halfway_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let (gate_tx, gate_rx) = watch::channel(!(args.key_update || args.rebind));

    // Open every stream first, in order: bidi payloads are seeded 0..,
    // uni payloads 1_000_000.. (same scheme as the aioquic client).
    let mut sent_uni: Vec<Vec<u8>> = Vec::new();
    for i in 0..args.streams + args.uni {
        let is_uni = i >= args.streams;
        let data = Arc::new(payload(
            if is_uni {
                1_000_000 + i as u64
            } else {
                i as u64
            },
            args.size,
        ));
        let (mut send, recv) = if is_uni {
            (conn.open_uni().await.map_err(|e| describe(&e))?, None)
        } else {
            let (s, r) = conn.open_bi().await.map_err(|e| describe(&e))?;
            (s, Some(r))
        };
        let id = send.id();
        let (halfway, mut gate, payload) = (halfway_tx.clone(), gate_rx.clone(), data.clone());
        tasks.spawn(async move {
            let result = send
                .write_all(&payload[..half])
                .await
                .map_err(|e| format!("stream {id}: {e}"));
            let _ = halfway.send(result.clone());
            result?;
            let _ = gate.wait_for(|open| *open).await;
            send.write_all(&payload[half..])
                .await
                .map_err(|e| format!("stream {id}: {e}"))?;
            send.finish().map_err(|e| format!("stream {id}: {e}"))?;
            Ok(None)
        });
        match recv {
            None => sent_uni.push(data.to_vec()),
            Some(mut recv) => {
                let progress = progress.clone();
                tasks.spawn(async move {
                    let mut got = Vec::with_capacity(data.len());
                    while let Some(chunk) = recv
                        .read_chunk(usize::MAX, true)
                        .await
                        .map_err(|e| format!("bidi stream {id}: {e}"))?
                    {
                        got.extend_from_slice(&chunk.bytes);
                        progress
                            .echoed_bytes
                            .fetch_add(chunk.bytes.len(), Ordering::SeqCst);
                    }
                    if got != *data {
                        let at = got.iter().zip(data.iter()).position(|(a, b)| a != b);
                        let at = at.unwrap_or(got.len().min(data.len()));
                        return Err(format!(
                            "bidi stream {id}: echoed {} of {} bytes, differs at byte {at}",
                            got.len(),
                            data.len()
                        ));
                    }
                    progress.echoes.fetch_add(1, Ordering::SeqCst);
                    Ok(None)
                });
            }
        }
    }
    drop(halfway_tx);
    // Uni echoes: one server-initiated uni stream per client uni stream.
    // They arrive only after our FINs, so accept them in the background.
    let (uni_conn, uni_count, uni_progress) = (conn.clone(), args.uni, progress.clone());
    let mut uni_tasks: JoinSet<Result<Vec<u8>, String>> = JoinSet::new();
    tasks.spawn(async move {
        let mut got = Vec::new();
        for _ in 0..uni_count {
            let mut recv = uni_conn.accept_uni().await.map_err(|e| describe(&e))?;
            let progress = uni_progress.clone();
            uni_tasks.spawn(async move {
                let id = recv.id();
                let data = recv
                    .read_to_end(usize::MAX)
                    .await
                    .map_err(|e| format!("uni stream {id}: {e}"))?;
                progress.echoes.fetch_add(1, Ordering::SeqCst);
                Ok(data)
            });
        }
        while let Some(joined) = uni_tasks.join_next().await {
            got.push(joined.map_err(|e| e.to_string())??);
        }
        Ok(Some(got))
    });

    if args.key_update || args.rebind {
        // Every first half is written.
        for _ in 0..args.streams + args.uni {
            halfway_rx.recv().await.expect("writers hold a sender")?;
        }
    }
    if args.key_update {
        // RFC 9001 §6 forbids a key update before the handshake is
        // confirmed, i.e. before HANDSHAKE_DONE reaches the client.
        while conn.stats().frame_rx.handshake_done == 0 {
            if let Some(e) = conn.close_reason() {
                return Err(describe(&e));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        conn.force_key_update();
        report.key_update = true;
    }
    if args.rebind {
        rebind_midway(conn, endpoint, report).await?;
    }
    let _ = gate_tx.send(true);

    let mut got_uni = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined.map_err(|e| e.to_string())? {
            Ok(Some(echoes)) => got_uni = echoes,
            Ok(None) => {}
            Err(e) => {
                // A failed stream usually means a closed connection: say so.
                return Err(match conn.close_reason() {
                    Some(c) => describe(&c),
                    None => e,
                });
            }
        }
    }
    sent_uni.sort();
    got_uni.sort();
    if got_uni != sent_uni {
        let mut lengths: Vec<usize> = got_uni.iter().map(Vec::len).collect();
        lengths.sort();
        return Err(format!(
            "uni echoes do not match what was sent: got lengths {lengths:?}"
        ));
    }
    report.bidi = args.streams;
    report.uni = args.uni;
    report.bytes = args.size * (args.streams + args.uni);
    Ok(())
}
