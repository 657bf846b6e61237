//! quiche_baseline: the raw-quiche (no BEAM) baseline that the Quichex
//! benchmarks compare against.
//!
//! Two roles, run as two processes on 127.0.0.1:
//!
//!   quiche_baseline server --port 0 --cert PEM --key PEM
//!       --mode echo|sink|reply_close|dgram_echo
//!       [--cc cubic|bbr2] [--max-conns N] [--gso] [--gro] [--max-seconds S]
//!   quiche_baseline client --port P --scenario S [--cc cubic|bbr2]
//!       [--size BYTES] [--rounds N] [--concurrency N] [--streams N]
//!       [--seconds S] [--window N] [--gso] [--gro] [--timeout S]
//!
//! The server prints `LISTENING <port>` and serves until its stdin reaches
//! EOF (or it is killed, or --max-seconds, default 86400, elapse). The client
//! runs one scenario and prints one JSON line.
//!
//! I/O is plain UDP sockets driven by ppoll(2): one recvmsg(2) per datagram
//! and one send per packet, unless --gso (send batches of up to
//! `send_quantum()` bytes with a UDP_SEGMENT control message) or --gro
//! (receive coalesced datagrams with UDP_GRO) is given. Like quiche's own
//! examples, packets are sent as soon as quiche produces them (the pacing
//! release time in `SendInfo::at` is not honoured).

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

const MAX_DATAGRAM_SIZE: usize = 1350;
const ALPN: &[u8] = b"quichex-bench";
const SOCK_BUF_BYTES: libc::c_int = 4 * 1024 * 1024;
/// Receive buffer: one datagram, or one GRO batch.
const RECV_BUF_LEN: usize = 65536;
/// Largest GSO batch payload (kernel limit is 64 KiB minus headers).
const GSO_MAX_BYTES: usize = 65000;
/// Kernel's UDP_MAX_SEGMENTS is 64 on older kernels.
const GSO_MAX_SEGMENTS: usize = 64;
/// Datagrams read per socket per loop iteration (bounds the read loop).
const RECV_BATCH: usize = 1024;
/// Packets generated per connection per flush call (bounds the send loop).
const SEND_BATCH: usize = 4096;
/// Echo server: stop reading a stream while this much is waiting to go back.
const ECHO_BUFFER_LIMIT: usize = 1 << 20;
/// Write chunk for bulk/streams.
const CHUNK: usize = 64 * 1024;
/// Period of the fixed data pattern.
const PATTERN_PERIOD: usize = 251;
/// The reply of the reply_close server mode.
const REPLY: [u8; 64] = [0xa5; 64];
/// DATAGRAM receive and send queue lengths (the dgram scenario; Quichex's
/// `dgram_recv_queue_len` / `dgram_send_queue_len` defaults).
const DGRAM_QUEUE_LEN: usize = 1000;

// Linux UDP socket options (not exported by libc for glibc targets).
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

type Res<T> = Result<T, String>;

// ---------------------------------------------------------------------------
// Argument parsing
// ---------------------------------------------------------------------------

struct Args {
    opts: HashMap<String, String>,
    flags: Vec<String>,
}

impl Args {
    fn parse(raw: &[String]) -> Res<Args> {
        const FLAGS: &[&str] = &["--gso", "--gro"];
        let mut opts = HashMap::new();
        let mut flags = Vec::new();
        let mut i = 0;
        while i < raw.len() {
            let a = &raw[i];
            if !a.starts_with("--") {
                return Err(format!("unexpected argument {a}"));
            }
            if FLAGS.contains(&a.as_str()) {
                flags.push(a.clone());
                i += 1;
                continue;
            }
            let v = raw.get(i + 1).ok_or_else(|| format!("{a} needs a value"))?;
            opts.insert(a[2..].to_string(), v.clone());
            i += 2;
        }
        Ok(Args { opts, flags })
    }

    fn str(&self, k: &str) -> Option<&str> {
        self.opts.get(k).map(|s| s.as_str())
    }

    fn num(&self, k: &str, default: u64) -> Res<u64> {
        match self.opts.get(k) {
            None => Ok(default),
            Some(v) => v
                .replace('_', "")
                .parse::<u64>()
                .map_err(|_| format!("--{k}: bad number {v}")),
        }
    }

    fn flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }
}

fn parse_cc(s: Option<&str>) -> Res<(quiche::CongestionControlAlgorithm, &'static str)> {
    match s.unwrap_or("cubic") {
        "cubic" => Ok((quiche::CongestionControlAlgorithm::CUBIC, "cubic")),
        "bbr2" | "bbr" | "bbr2_gcongestion" => {
            Ok((quiche::CongestionControlAlgorithm::Bbr2Gcongestion, "bbr2"))
        }
        other => Err(format!("unknown --cc {other}")),
    }
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

fn make_config(
    cc: quiche::CongestionControlAlgorithm,
    cert_key: Option<(&str, &str)>,
) -> Res<quiche::Config> {
    let mut c =
        quiche::Config::new(quiche::PROTOCOL_VERSION).map_err(|e| format!("config: {e:?}"))?;
    if let Some((cert, key)) = cert_key {
        c.load_cert_chain_from_pem_file(cert)
            .map_err(|e| format!("cert {cert}: {e:?}"))?;
        c.load_priv_key_from_pem_file(key)
            .map_err(|e| format!("key {key}: {e:?}"))?;
    }
    c.set_application_protos(&[ALPN])
        .map_err(|e| format!("alpn: {e:?}"))?;
    c.verify_peer(false);
    c.set_max_idle_timeout(30_000);
    c.set_initial_max_data(10_000_000);
    c.set_initial_max_stream_data_bidi_local(1_000_000);
    c.set_initial_max_stream_data_bidi_remote(1_000_000);
    c.set_initial_max_stream_data_uni(1_000_000);
    c.set_initial_max_streams_bidi(2_000);
    c.set_initial_max_streams_uni(100);
    c.set_max_send_udp_payload_size(MAX_DATAGRAM_SIZE);
    // max_recv_udp_payload_size: quiche default (65527).
    c.set_cc_algorithm(cc);
    c.enable_pacing(true);
    Ok(c)
}

/// DATAGRAM frames (RFC 9221), for the dgram scenario only: the other
/// scenarios run without them, as the Elixir benchmark's do.
fn enable_dgram(c: &mut quiche::Config) {
    c.enable_dgram(true, DGRAM_QUEUE_LEN, DGRAM_QUEUE_LEN);
}

fn rand_bytes(buf: &mut [u8]) -> Res<()> {
    let mut off = 0;
    for _ in 0..64 {
        if off == buf.len() {
            return Ok(());
        }
        let r = unsafe {
            libc::getrandom(
                buf[off..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - off,
                0,
            )
        };
        if r > 0 {
            off += r as usize;
        }
    }
    if off == buf.len() {
        Ok(())
    } else {
        Err("getrandom failed".into())
    }
}

fn new_cid() -> Res<quiche::ConnectionId<'static>> {
    let mut b = [0u8; quiche::MAX_CONN_ID_LEN];
    rand_bytes(&mut b)?;
    Ok(quiche::ConnectionId::from_vec(b.to_vec()))
}

fn setsockopt_int(
    fd: i32,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Bind a nonblocking UDP socket on 127.0.0.1 with 4 MiB buffers requested.
fn bind_udp(port: u16, gro: bool) -> Res<UdpSocket> {
    bind_udp_on(Ipv4Addr::LOCALHOST, port, gro)
}

/// `bind_udp` on another loopback address (all of 127.0.0.0/8 is local on
/// Linux): each has its own ~28,000 ephemeral ports.
fn bind_udp_on(ip: Ipv4Addr, port: u16, gro: bool) -> Res<UdpSocket> {
    let s = UdpSocket::bind(SocketAddr::from((ip, port))).map_err(|e| format!("bind: {e}"))?;
    let fd = s.as_raw_fd();
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCK_BUF_BYTES)
        .map_err(|e| format!("SO_RCVBUF: {e}"))?;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, SOCK_BUF_BYTES)
        .map_err(|e| format!("SO_SNDBUF: {e}"))?;
    if gro {
        setsockopt_int(fd, SOL_UDP, UDP_GRO, 1).map_err(|e| format!("UDP_GRO: {e}"))?;
    }
    s.set_nonblocking(true)
        .map_err(|e| format!("nonblocking: {e}"))?;
    Ok(s)
}

fn ppoll(fds: &mut [libc::pollfd], timeout: Duration) -> Res<()> {
    let timeout = timeout.min(Duration::from_secs(1));
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    let r = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(format!("ppoll: {e}"));
        }
    }
    Ok(())
}

fn wait_writable(fd: i32) {
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    }];
    let _ = ppoll(&mut p, Duration::from_millis(50));
}

fn sockaddr_from(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn sockaddr_to(a: &SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match a {
        SocketAddr::V4(v4) => {
            let sin =
                unsafe { &mut *(ss as *mut libc::sockaddr_storage as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            };
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(v6) => {
            let sin6 =
                unsafe { &mut *(ss as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: v6.ip().octets(),
            };
            sin6.sin6_flowinfo = v6.flowinfo();
            sin6.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// One recvmsg(2). Returns None when the socket would block, else
/// (bytes, sender, GRO segment size if the kernel coalesced datagrams).
fn recv_dgram(fd: i32, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr, usize)>> {
    for _ in 0..16 {
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut cbuf = [0u64; 8];
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = &mut ss as *mut libc::sockaddr_storage as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(None),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        let n = n as usize;
        let mut seg = n;
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                    if v > 0 {
                        seg = v as usize;
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let from = match sockaddr_from(&ss) {
            Some(a) => a,
            None => continue,
        };
        return Ok(Some((n, from, seg.max(1))));
    }
    Ok(None)
}

/// Send one datagram, or a GSO batch when `seg` is Some. `to` is None on
/// connected sockets. Waits (bounded) for buffer space on EAGAIN; a datagram
/// that still cannot go out is dropped (quiche recovers it as a loss).
fn send_dgram(fd: i32, buf: &[u8], to: Option<&SocketAddr>, seg: Option<usize>) -> Res<()> {
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let namelen = to.map(|a| sockaddr_to(a, &mut ss)).unwrap_or(0);
    for _ in 0..100 {
        let mut iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut cbuf = [0u64; 4];
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        if to.is_some() {
            msg.msg_name = &mut ss as *mut libc::sockaddr_storage as *mut libc::c_void;
            msg.msg_namelen = namelen;
        }
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(seg) = seg {
            unsafe {
                msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
                msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as _;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg as u16);
            }
        }
        let r = unsafe { libc::sendmsg(fd, &msg, 0) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => wait_writable(fd),
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::ConnectionRefused => {
                return Err("connection refused (is the server running?)".into())
            }
            _ => return Err(format!("sendmsg: {e}")),
        }
    }
    Ok(())
}

/// Generate and send this connection's packets. Returns true if the send
/// loop stopped at its bound with more possibly pending.
fn flush_conn(
    conn: &mut quiche::Connection,
    fd: i32,
    connected: bool,
    out: &mut [u8],
    gso: bool,
) -> Res<bool> {
    if !gso {
        for _ in 0..SEND_BATCH {
            match conn.send(&mut out[..MAX_DATAGRAM_SIZE]) {
                Ok((n, info)) => {
                    let to = if connected { None } else { Some(&info.to) };
                    send_dgram(fd, &out[..n], to, None)?;
                }
                Err(quiche::Error::Done) => return Ok(false),
                Err(e) => {
                    let _ = conn.close(false, 0x1, b"send failed");
                    return Err(format!("quiche send: {e:?}"));
                }
            }
        }
        return Ok(true);
    }

    // GSO: batch equal-sized packets (the last may be shorter) to one peer,
    // up to send_quantum() bytes.
    let mut packets = 0;
    let mut carry: Option<(usize, SocketAddr)> = None; // packet already at out[0..n]
    while packets < SEND_BATCH {
        let quantum = conn.send_quantum().clamp(MAX_DATAGRAM_SIZE, GSO_MAX_BYTES);
        let mut total = 0;
        let mut seg = 0;
        let mut count = 0;
        let mut dest: Option<SocketAddr> = None;
        let mut done = false;
        if let Some((n, to)) = carry.take() {
            total = n;
            seg = n;
            count = 1;
            dest = Some(to);
        }
        while total + MAX_DATAGRAM_SIZE <= quantum.max(MAX_DATAGRAM_SIZE)
            && count < GSO_MAX_SEGMENTS
        {
            match conn.send(&mut out[total..total + MAX_DATAGRAM_SIZE]) {
                Ok((n, info)) => {
                    packets += 1;
                    if count == 0 {
                        seg = n;
                        dest = Some(info.to);
                        total = n;
                        count = 1;
                        continue;
                    }
                    if Some(info.to) != dest || n > seg {
                        // Can't join this batch: send the batch, then carry
                        // the new packet over to the next one.
                        let to = if connected { None } else { dest.as_ref() };
                        let segsz = if count > 1 { Some(seg) } else { None };
                        send_dgram(fd, &out[..total], to, segsz)?;
                        out.copy_within(total..total + n, 0);
                        carry = Some((n, info.to));
                        count = 0;
                        break;
                    }
                    total += n;
                    count += 1;
                    if n < seg {
                        break; // a short packet ends a GSO batch
                    }
                }
                Err(quiche::Error::Done) => {
                    done = true;
                    break;
                }
                Err(e) => {
                    let _ = conn.close(false, 0x1, b"send failed");
                    return Err(format!("quiche send: {e:?}"));
                }
            }
        }
        if count > 0 {
            let to = if connected { None } else { dest.as_ref() };
            let segsz = if count > 1 { Some(seg) } else { None };
            send_dgram(fd, &out[..total], to, segsz)?;
        }
        if done {
            return Ok(false);
        }
    }
    if let Some((n, to)) = carry {
        let to = if connected { None } else { Some(&to) };
        send_dgram(fd, &out[..n], to, None)?;
    }
    Ok(true)
}

fn pattern() -> Vec<u8> {
    (0..CHUNK + PATTERN_PERIOD)
        .map(|i| (i % PATTERN_PERIOD) as u8)
        .collect()
}

fn json_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o
}

fn stdin_fd_event(fd0: &libc::pollfd) -> bool {
    fd0.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// Read what stdin has. Returns (eof, bytes read).
fn read_stdin(acc: &mut Vec<u8>) -> bool {
    let mut b = [0u8; 4096];
    let r = unsafe { libc::read(0, b.as_mut_ptr() as *mut libc::c_void, b.len()) };
    if r == 0 {
        return true;
    }
    if r < 0 {
        let e = io::Error::last_os_error();
        return !matches!(
            e.kind(),
            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
        );
    }
    if acc.len() < 1 << 16 {
        acc.extend_from_slice(&b[..r as usize]);
    }
    false
}

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let role = raw.first().cloned().unwrap_or_default();
    let args = match Args::parse(raw.get(1..).unwrap_or(&[])) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            usage();
        }
    };
    match role.as_str() {
        "server" => {
            if let Err(e) = server::run(&args) {
                eprintln!("server error: {e}");
                std::process::exit(1);
            }
        }
        "client" => client::run(&args),
        "proxy" => {
            if let Err(e) = proxy::run(&args) {
                eprintln!("proxy error: {e}");
                std::process::exit(1);
            }
        }
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage:\n  quiche_baseline server --port 0 --cert PEM --key PEM --mode echo|sink|reply_close|dgram_echo [--cc cubic|bbr2] [--max-conns N] [--gso] [--gro]\n  quiche_baseline client --port P --scenario bulk|rtt|rtt_streams|rtt_close|handshakes|streams|idle|dgram [--cc cubic|bbr2] [--size B] [--rounds N] [--concurrency N] [--streams N] [--seconds S] [--window N] [--gso] [--gro] [--timeout S] [--bind-ip 127.x.y.z]\n  quiche_baseline proxy --upstream PORT [--loss-permille N] [--seed N]"
    );
    std::process::exit(2);
}

// ---------------------------------------------------------------------------
// Proxy: a lossy UDP relay on loopback, the same for both sides of a scenario
// ---------------------------------------------------------------------------

mod proxy {
    use super::*;
    use std::net::{SocketAddr, UdpSocket};
    use std::sync::{Arc, Mutex};

    /// xorshift64: the same drop pattern for the same seed, cheap per packet.
    struct Dice(u64);

    impl Dice {
        fn drop(&mut self, permille: u64) -> bool {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % 1000 < permille
        }
    }

    /// Relays datagrams between one client (the first address that sends to
    /// it) and the upstream port, dropping `--loss-permille` of them each
    /// way. Prints `LISTENING <port>`; exits when stdin closes.
    pub fn run(args: &Args) -> Res<()> {
        let upstream: SocketAddr = format!("127.0.0.1:{}", args.num("upstream", 0)?)
            .parse()
            .map_err(|e| format!("--upstream: {e}"))?;
        let permille = args.num("loss-permille", 10)?.min(1000);
        let seed = args.num("seed", 0x9e37_79b9_7f4a_7c15)?.max(1);
        let front = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let back = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        back.connect(upstream).map_err(|e| e.to_string())?;
        let port = front.local_addr().map_err(|e| e.to_string())?.port();
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));

        let (f1, b1, c1) = (front.try_clone(), back.try_clone(), client.clone());
        let (f1, b1) = (
            f1.map_err(|e| e.to_string())?,
            b1.map_err(|e| e.to_string())?,
        );
        std::thread::spawn(move || {
            let mut dice = Dice(seed);
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = f1.recv_from(&mut buf) {
                if let Ok(mut c) = c1.lock() {
                    *c = Some(from);
                }
                if !dice.drop(permille) {
                    let _ = b1.send(&buf[..n]);
                }
            }
        });
        std::thread::spawn(move || {
            let mut dice = Dice(seed.rotate_left(32) | 1);
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = back.recv(&mut buf) {
                let to = client.lock().ok().and_then(|c| *c);
                if let Some(to) = to {
                    if !dice.drop(permille) {
                        let _ = front.send_to(&buf[..n], to);
                    }
                }
            }
        });

        println!("LISTENING {port}");
        let mut acc = Vec::new();
        while !read_stdin(&mut acc) {
            acc.clear();
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

mod server {
    use super::*;

    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Echo,
        Sink,
        /// Reads a request to its FIN, then writes a 64-byte reply and the
        /// FIN in two stream_send calls (the FIN alone, with no data).
        ReplyClose,
        /// Sends every DATAGRAM back (dgram_recv, then dgram_send); one
        /// that does not fit in the full send queue is dropped.
        DgramEcho,
    }

    #[derive(Default)]
    struct SStream {
        /// Bytes to write back (echo), "ok" once the FIN arrived (sink), or
        /// the reply once the FIN arrived (reply_close).
        pending: Vec<u8>,
        off: usize,
        fin_recv: bool,
    }

    struct SConn {
        conn: quiche::Connection,
        keys: Vec<quiche::ConnectionId<'static>>,
        streams: HashMap<u64, SStream>,
        dirty: bool,
    }

    pub fn run(args: &Args) -> Res<()> {
        let port = args.num("port", 0)? as u16;
        let cert = args.str("cert").ok_or("--cert required")?;
        let key = args.str("key").ok_or("--key required")?;
        let mode = match args.str("mode").unwrap_or("echo") {
            "echo" => Mode::Echo,
            "sink" => Mode::Sink,
            "reply_close" => Mode::ReplyClose,
            "dgram_echo" => Mode::DgramEcho,
            m => return Err(format!("unknown --mode {m}")),
        };
        let (cc, _) = parse_cc(args.str("cc"))?;
        let max_conns = args.num("max-conns", 100_000)? as usize;
        let max_life = Duration::from_secs(args.num("max-seconds", 86_400)?);
        let gso = args.flag("--gso");
        let gro = args.flag("--gro");

        let mut config = make_config(cc, Some((cert, key)))?;
        config.set_max_idle_timeout(args.num("idle-timeout-ms", 30_000)?);
        if mode == Mode::DgramEcho {
            enable_dgram(&mut config);
        }
        let sock = bind_udp(port, gro)?;
        let fd = sock.as_raw_fd();
        let local = sock.local_addr().map_err(|e| e.to_string())?;

        {
            let mut so = io::stdout().lock();
            writeln!(so, "LISTENING {}", local.port()).ok();
            so.flush().ok();
        }

        let mut buf = vec![0u8; RECV_BUF_LEN];
        let mut out = vec![0u8; RECV_BUF_LEN];
        let mut sbuf = vec![0u8; RECV_BUF_LEN];
        let mut stdin_acc = Vec::new();

        let mut slots: Vec<Option<SConn>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut live = 0usize;
        let mut map: HashMap<quiche::ConnectionId<'static>, usize> = HashMap::new();
        let mut dirty: Vec<usize> = Vec::new();
        let mut more_to_send = false;

        let started = Instant::now();
        let mut last_sweep = Instant::now();

        while started.elapsed() < max_life {
            // Earliest quiche timer.
            let mut timeout = Duration::from_millis(100);
            if more_to_send {
                timeout = Duration::ZERO;
            }
            for c in slots.iter().flatten() {
                if let Some(t) = c.conn.timeout() {
                    timeout = timeout.min(t);
                }
            }
            let mut pfd = [
                libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: 0,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            ppoll(&mut pfd, timeout)?;

            if stdin_fd_event(&pfd[1]) && read_stdin(&mut stdin_acc) {
                // stdin closed: the owner is gone.
                std::process::exit(0);
            }
            stdin_acc.clear();

            if pfd[0].revents & libc::POLLIN != 0 {
                for _ in 0..RECV_BATCH {
                    let (n, from, seg) = match recv_dgram(fd, &mut buf) {
                        Ok(Some(v)) => v,
                        Ok(None) => break,
                        Err(e) => {
                            eprintln!("recv: {e}");
                            break;
                        }
                    };
                    let mut off = 0;
                    while off < n {
                        let end = (off + seg).min(n);
                        handle_datagram(
                            &mut buf[off..end],
                            from,
                            local,
                            fd,
                            &mut config,
                            mode,
                            max_conns,
                            &mut slots,
                            &mut free,
                            &mut live,
                            &mut map,
                            &mut dirty,
                            &mut sbuf,
                            &mut out,
                        );
                        off = end;
                    }
                }
            }

            // Timers.
            for (i, s) in slots.iter_mut().enumerate() {
                if let Some(c) = s {
                    if c.conn.timeout() == Some(Duration::ZERO) {
                        c.conn.on_timeout();
                        if !c.dirty {
                            c.dirty = true;
                            dirty.push(i);
                        }
                    }
                }
            }

            // Safety sweep: retry every stream with pending output, in case
            // a writable notification was missed.
            if last_sweep.elapsed() >= Duration::from_millis(100) {
                last_sweep = Instant::now();
                for (i, s) in slots.iter_mut().enumerate() {
                    if let Some(c) = s {
                        if c.streams.is_empty() {
                            continue;
                        }
                        let ids: Vec<u64> = c.streams.keys().copied().collect();
                        for id in ids {
                            write_stream(c, id, mode);
                            if mode == Mode::Echo {
                                read_stream(c, id, mode, &mut sbuf);
                            }
                        }
                        if !c.dirty {
                            c.dirty = true;
                            dirty.push(i);
                        }
                    }
                }
            }

            // Flush.
            more_to_send = false;
            let list = std::mem::take(&mut dirty);
            for i in list {
                let Some(c) = slots[i].as_mut() else { continue };
                c.dirty = false;
                match flush_conn(&mut c.conn, fd, false, &mut out, gso) {
                    Ok(true) => {
                        more_to_send = true;
                        c.dirty = true;
                        dirty.push(i);
                    }
                    Ok(false) => {}
                    Err(e) => eprintln!("flush: {e}"),
                }
                if c.conn.is_closed() {
                    let c = slots[i].take().unwrap();
                    for k in &c.keys {
                        if map.get(k) == Some(&i) {
                            map.remove(k);
                        }
                    }
                    free.push(i);
                    live -= 1;
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_datagram(
        pkt: &mut [u8],
        from: SocketAddr,
        local: SocketAddr,
        fd: i32,
        config: &mut quiche::Config,
        mode: Mode,
        max_conns: usize,
        slots: &mut Vec<Option<SConn>>,
        free: &mut Vec<usize>,
        live: &mut usize,
        map: &mut HashMap<quiche::ConnectionId<'static>, usize>,
        dirty: &mut Vec<usize>,
        sbuf: &mut [u8],
        out: &mut [u8],
    ) {
        let hdr = match quiche::Header::from_slice(pkt, quiche::MAX_CONN_ID_LEN) {
            Ok(h) => h,
            Err(_) => return,
        };
        let idx = match map.get(&hdr.dcid) {
            Some(&i) => i,
            None => {
                if hdr.ty != quiche::Type::Initial {
                    return;
                }
                if !quiche::version_is_supported(hdr.version) {
                    if let Ok(n) = quiche::negotiate_version(&hdr.scid, &hdr.dcid, out) {
                        let _ = send_dgram(fd, &out[..n], Some(&from), None);
                    }
                    return;
                }
                if *live >= max_conns {
                    return;
                }
                let scid = match new_cid() {
                    Ok(c) => c,
                    Err(_) => return,
                };
                let conn = match quiche::accept(&scid, None, local, from, config) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("accept: {e:?}");
                        return;
                    }
                };
                let odcid: quiche::ConnectionId<'static> = hdr.dcid.to_vec().into();
                let c = SConn {
                    conn,
                    keys: vec![scid.clone(), odcid.clone()],
                    streams: HashMap::new(),
                    dirty: false,
                };
                let i = match free.pop() {
                    Some(i) => {
                        slots[i] = Some(c);
                        i
                    }
                    None => {
                        slots.push(Some(c));
                        slots.len() - 1
                    }
                };
                *live += 1;
                map.insert(scid, i);
                map.insert(odcid, i);
                i
            }
        };
        let Some(c) = slots[idx].as_mut() else { return };
        let info = quiche::RecvInfo { from, to: local };
        if c.conn.recv(pkt, info).is_err() {
            // quiche closes the connection itself on fatal errors; flush below.
        }
        if c.conn.is_established() || c.conn.is_in_early_data() {
            if mode == Mode::DgramEcho {
                echo_dgrams(c, sbuf);
            }
            for id in c.conn.readable() {
                read_stream(c, id, mode, sbuf);
            }
            if !c.streams.is_empty() {
                for id in c.conn.writable() {
                    if c.streams.contains_key(&id) {
                        write_stream(c, id, mode);
                        if mode == Mode::Echo {
                            read_stream(c, id, mode, sbuf);
                        }
                    }
                }
            }
        }
        if !c.dirty {
            c.dirty = true;
            dirty.push(idx);
        }
    }

    /// Every received DATAGRAM goes straight back. When quiche's send queue
    /// is full (Done) the echo is dropped, as the Quichex handler's
    /// `{:error, :queue_full}` is.
    fn echo_dgrams(c: &mut SConn, sbuf: &mut [u8]) {
        while let Ok(n) = c.conn.dgram_recv(sbuf) {
            let _ = c.conn.dgram_send(&sbuf[..n]);
        }
    }

    fn read_stream(c: &mut SConn, id: u64, mode: Mode, sbuf: &mut [u8]) {
        for _ in 0..4096 {
            if let Some(st) = c.streams.get(&id) {
                if st.fin_recv || st.pending.len() - st.off >= ECHO_BUFFER_LIMIT {
                    break;
                }
            }
            match c.conn.stream_recv(id, sbuf) {
                Ok((n, fin)) => {
                    let st = c.streams.entry(id).or_default();
                    if mode == Mode::Echo {
                        st.pending.extend_from_slice(&sbuf[..n]);
                    }
                    if fin {
                        st.fin_recv = true;
                        match mode {
                            Mode::Sink => st.pending.extend_from_slice(b"ok"),
                            Mode::ReplyClose => st.pending.extend_from_slice(&REPLY),
                            Mode::Echo | Mode::DgramEcho => {}
                        }
                        break;
                    }
                }
                Err(quiche::Error::Done) => break,
                Err(_) => {
                    c.streams.remove(&id);
                    return;
                }
            }
        }
        write_stream(c, id, mode);
    }

    fn write_stream(c: &mut SConn, id: u64, mode: Mode) {
        let Some(st) = c.streams.get_mut(&id) else {
            return;
        };
        if st.off == st.pending.len() && !st.fin_recv {
            return;
        }
        // reply_close writes the FIN in a call of its own, after the data.
        let fin_with_data = st.fin_recv && mode != Mode::ReplyClose;
        let sent = if st.off < st.pending.len() || fin_with_data {
            c.conn.stream_send(id, &st.pending[st.off..], fin_with_data)
        } else {
            Ok(0)
        };
        match sent {
            Ok(w) => {
                st.off += w;
                if st.off == st.pending.len() {
                    if st.fin_recv {
                        if !fin_with_data
                            && c.conn.stream_send(id, b"", true) == Err(quiche::Error::Done)
                        {
                            return; // retried when writable, or by the sweep
                        }
                        c.streams.remove(&id);
                    } else {
                        st.pending.clear();
                        st.off = 0;
                    }
                } else if st.off >= 65536 && st.off * 2 >= st.pending.len() {
                    st.pending.drain(..st.off);
                    st.off = 0;
                }
            }
            Err(quiche::Error::Done) => {}
            Err(_) => {
                c.streams.remove(&id);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

mod client {
    use super::*;

    struct Endpoint {
        sock: UdpSocket,
        local: SocketAddr,
        peer: SocketAddr,
        conn: quiche::Connection,
    }

    struct Ctx {
        config: quiche::Config,
        peer: SocketAddr,
        /// The loopback address client sockets bind to (`--bind-ip`).
        bind_ip: Ipv4Addr,
        deadline: Instant,
        gso: bool,
        gro: bool,
        buf: Vec<u8>,
        out: Vec<u8>,
    }

    impl Ctx {
        fn check_deadline(&self) -> Res<()> {
            if Instant::now() >= self.deadline {
                Err("deadline exceeded".into())
            } else {
                Ok(())
            }
        }

        /// New socket + connection; sends the first flight.
        fn start(&mut self) -> Res<Endpoint> {
            let sock = bind_udp_on(self.bind_ip, 0, self.gro)?;
            sock.connect(self.peer)
                .map_err(|e| format!("connect: {e}"))?;
            let local = sock.local_addr().map_err(|e| e.to_string())?;
            let scid = new_cid()?;
            let conn =
                quiche::connect(Some("localhost"), &scid, local, self.peer, &mut self.config)
                    .map_err(|e| format!("quiche connect: {e:?}"))?;
            let mut ep = Endpoint {
                sock,
                local,
                peer: self.peer,
                conn,
            };
            self.flush(&mut ep)?;
            Ok(ep)
        }

        fn flush(&mut self, ep: &mut Endpoint) -> Res<()> {
            for _ in 0..1000 {
                if !flush_conn(
                    &mut ep.conn,
                    ep.sock.as_raw_fd(),
                    true,
                    &mut self.out,
                    self.gso,
                )? {
                    return Ok(());
                }
            }
            Ok(())
        }

        /// Feed every queued datagram of this endpoint to quiche.
        fn recv_all(&mut self, ep: &mut Endpoint) -> Res<()> {
            for _ in 0..RECV_BATCH {
                match recv_dgram(ep.sock.as_raw_fd(), &mut self.buf) {
                    Ok(Some((n, _from, seg))) => {
                        let info = quiche::RecvInfo {
                            from: ep.peer,
                            to: ep.local,
                        };
                        let mut off = 0;
                        while off < n {
                            let end = (off + seg).min(n);
                            let _ = ep.conn.recv(&mut self.buf[off..end], info);
                            off = end;
                        }
                    }
                    Ok(None) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        return Err("connection refused (is the server running?)".into())
                    }
                    Err(e) => return Err(format!("recv: {e}")),
                }
            }
            Ok(())
        }

        /// Wait for datagrams or the earliest timer of `eps` (and optionally
        /// stdin), process them, and return the indices of touched endpoints
        /// plus whether stdin has an event.
        fn wait(&mut self, eps: &mut [Endpoint], watch_stdin: bool) -> Res<(Vec<usize>, bool)> {
            self.wait_at_most(eps, watch_stdin, Duration::MAX)
        }

        /// `wait`, returning after `cap` at the latest.
        fn wait_at_most(
            &mut self,
            eps: &mut [Endpoint],
            watch_stdin: bool,
            cap: Duration,
        ) -> Res<(Vec<usize>, bool)> {
            self.check_deadline()?;
            let mut timeout = self.deadline.saturating_duration_since(Instant::now());
            timeout = timeout.min(cap);
            for ep in eps.iter() {
                if let Some(t) = ep.conn.timeout() {
                    timeout = timeout.min(t);
                }
            }
            let mut pfds: Vec<libc::pollfd> = eps
                .iter()
                .map(|ep| libc::pollfd {
                    fd: ep.sock.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            if watch_stdin {
                pfds.push(libc::pollfd {
                    fd: 0,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            ppoll(&mut pfds, timeout)?;
            let mut touched = Vec::new();
            for (i, ep) in eps.iter_mut().enumerate() {
                let mut t = false;
                if pfds[i].revents != 0 {
                    self.recv_all(ep)?;
                    t = true;
                }
                if ep.conn.timeout() == Some(Duration::ZERO) {
                    ep.conn.on_timeout();
                    t = true;
                }
                if t {
                    touched.push(i);
                }
            }
            let stdin_ev = watch_stdin && stdin_fd_event(&pfds[eps.len()]);
            Ok((touched, stdin_ev))
        }

        fn wait1(&mut self, ep: &mut Endpoint) -> Res<()> {
            self.wait(std::slice::from_mut(ep), false).map(|_| ())
        }

        /// Connect and complete the handshake.
        fn connect(&mut self) -> Res<Endpoint> {
            let mut ep = self.start()?;
            loop {
                if ep.conn.is_established() {
                    self.flush(&mut ep)?;
                    return Ok(ep);
                }
                if ep.conn.is_closed() {
                    return Err(format!("handshake failed: {:?}", ep.conn.peer_error()));
                }
                self.wait1(&mut ep)?;
                self.flush(&mut ep)?;
            }
        }

        fn close(&mut self, ep: &mut Endpoint) {
            let _ = ep.conn.close(true, 0, b"");
            let _ = self.flush(ep);
        }
    }

    fn alive(ep: &Endpoint) -> Res<()> {
        if ep.conn.is_closed() {
            Err(format!(
                "connection closed (peer_error={:?} local_error={:?} timed_out={})",
                ep.conn.peer_error(),
                ep.conn.local_error(),
                ep.conn.is_timed_out()
            ))
        } else {
            Ok(())
        }
    }

    pub fn run(args: &Args) {
        let scenario = args.str("scenario").unwrap_or("").to_string();
        let res = run_inner(args, &scenario);
        let mut so = io::stdout().lock();
        match res {
            Ok(json) => {
                writeln!(so, "{json}").ok();
                so.flush().ok();
                drop(so);
                std::process::exit(0);
            }
            Err(e) => {
                writeln!(
                    so,
                    "{{\"scenario\":\"{}\",\"error\":\"{}\"}}",
                    json_escape(&scenario),
                    json_escape(&e)
                )
                .ok();
                so.flush().ok();
                drop(so);
                std::process::exit(1);
            }
        }
    }

    fn run_inner(args: &Args, scenario: &str) -> Res<String> {
        let port = args.num("port", 0)?;
        if port == 0 || port > 65535 {
            return Err("--port required".into());
        }
        let (cc, cc_name) = parse_cc(args.str("cc"))?;
        let default_timeout = if scenario == "bulk" { 300 } else { 120 };
        let timeout = Duration::from_secs(args.num("timeout", default_timeout)?);
        let mut ctx = Ctx {
            config: make_config(cc, None)?,
            peer: SocketAddr::from((Ipv4Addr::LOCALHOST, port as u16)),
            bind_ip: match args.str("bind-ip") {
                None => Ipv4Addr::LOCALHOST,
                Some(ip) => match ip.parse::<Ipv4Addr>() {
                    Ok(ip) if ip.is_loopback() => ip,
                    _ => return Err(format!("--bind-ip: {ip} is not a loopback address")),
                },
            },
            deadline: Instant::now() + timeout,
            gso: args.flag("--gso"),
            gro: args.flag("--gro"),
            buf: vec![0u8; RECV_BUF_LEN],
            out: vec![0u8; RECV_BUF_LEN],
        };
        if let Some(ms) = args.str("idle-timeout-ms") {
            let ms = ms
                .parse::<u64>()
                .map_err(|_| format!("--idle-timeout-ms: {ms}"))?;
            ctx.config.set_max_idle_timeout(ms);
        }
        if scenario == "dgram" {
            enable_dgram(&mut ctx.config);
        }
        let extra = format!("\"cc\":\"{cc_name}\",\"gso\":{}", ctx.gso);
        match scenario {
            "bulk" => bulk(&mut ctx, args.num("size", 1 << 30)?, &extra),
            "rtt" | "rtt_streams" | "rtt_close" => {
                rtt(&mut ctx, scenario, args.num("rounds", 10_000)?, &extra)
            }
            "handshakes" => handshakes(
                &mut ctx,
                args.num("rounds", 1000)?,
                args.num("concurrency", 1)?.max(1),
                &extra,
            ),
            "streams" => streams(
                &mut ctx,
                args.num("streams", 1000)?,
                args.num("size", 1 << 20)?,
                &extra,
            ),
            "idle" => idle(&mut ctx, args.num("concurrency", 1000)?, &extra),
            "dgram" => dgram(
                &mut ctx,
                args.num("seconds", 5)?,
                args.num("size", 1200)? as usize,
                args.num("window", 256)?.max(1),
                &extra,
            ),
            "" => Err("--scenario required".into()),
            s => Err(format!("unknown scenario {s}")),
        }
    }

    /// Read everything available on a stream; returns (bytes, fin).
    fn drain_stream(
        ep: &mut Endpoint,
        id: u64,
        buf: &mut [u8],
        keep: Option<&mut Vec<u8>>,
    ) -> Res<(usize, bool)> {
        let mut total = 0;
        let mut fin_seen = false;
        let mut keep = keep;
        for _ in 0..100_000 {
            match ep.conn.stream_recv(id, buf) {
                Ok((n, fin)) => {
                    total += n;
                    if let Some(k) = keep.as_deref_mut() {
                        k.extend_from_slice(&buf[..n]);
                    }
                    if fin {
                        fin_seen = true;
                        break;
                    }
                }
                Err(quiche::Error::Done) => break,
                Err(e) => return Err(format!("stream_recv {id}: {e:?}")),
            }
        }
        Ok((total, fin_seen))
    }

    fn bulk(ctx: &mut Ctx, size: u64, extra: &str) -> Res<String> {
        let pat = pattern();
        let mut ep = ctx.connect()?;
        let id = 0u64;
        let start = Instant::now();
        let mut sent = 0u64;
        let mut fin_sent = false;
        let mut resp = Vec::new();
        let mut rbuf = vec![0u8; RECV_BUF_LEN];
        let mut done = false;
        while !done {
            alive(&ep)?;
            // Write as much as flow/congestion control accepts.
            for _ in 0..10_000 {
                if fin_sent {
                    break;
                }
                let rem = size - sent;
                let n = rem.min(CHUNK as u64) as usize;
                let off = (sent % PATTERN_PERIOD as u64) as usize;
                let fin = rem == n as u64;
                match ep.conn.stream_send(id, &pat[off..off + n], fin) {
                    Ok(w) => {
                        sent += w as u64;
                        if fin && w == n {
                            fin_sent = true;
                        }
                        if w < n {
                            break;
                        }
                    }
                    Err(quiche::Error::Done) => break,
                    Err(e) => return Err(format!("stream_send: {e:?}")),
                }
            }
            ctx.flush(&mut ep)?;
            ctx.wait1(&mut ep)?;
            let (_, fin) = drain_stream(&mut ep, id, &mut rbuf, Some(&mut resp))?;
            if fin {
                done = true;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        if resp != b"ok" {
            return Err(format!(
                "unexpected response {:?}",
                String::from_utf8_lossy(&resp)
            ));
        }
        ctx.close(&mut ep);
        Ok(format!(
            "{{\"scenario\":\"bulk\",\"bytes\":{size},\"seconds\":{secs:.6},\"mb_per_s\":{:.3},{extra}}}",
            size as f64 / secs / 1e6
        ))
    }

    /// `rtt`: 64-byte echoes on one stream. `rtt_streams` and `rtt_close`:
    /// a new stream per round, the request with FIN, until the reply's FIN
    /// (the server's mode decides how it writes that FIN: with the data for
    /// echo, alone for reply_close).
    fn rtt(ctx: &mut Ctx, name: &str, rounds: u64, extra: &str) -> Res<String> {
        let new_stream_each = name != "rtt";
        let mut ep = ctx.connect()?;
        let msg = [0x5au8; 64];
        let mut rbuf = vec![0u8; RECV_BUF_LEN];
        let mut samples: Vec<f64> = Vec::with_capacity(rounds as usize);
        for r in 0..rounds {
            let id = if new_stream_each { 4 * r } else { 0 };
            let t0 = Instant::now();
            // Send (retry while the peer's stream limit is exhausted).
            loop {
                alive(&ep)?;
                match ep.conn.stream_send(id, &msg, new_stream_each) {
                    Ok(64) => break,
                    Ok(w) => return Err(format!("short write {w}")),
                    Err(quiche::Error::StreamLimit) | Err(quiche::Error::Done) => {
                        ctx.flush(&mut ep)?;
                        ctx.wait1(&mut ep)?;
                    }
                    Err(e) => return Err(format!("stream_send: {e:?}")),
                }
            }
            ctx.flush(&mut ep)?;
            let mut got = 0usize;
            let mut fin = false;
            loop {
                alive(&ep)?;
                ctx.wait1(&mut ep)?;
                let (n, f) = drain_stream(&mut ep, id, &mut rbuf, None)?;
                got += n;
                fin |= f;
                ctx.flush(&mut ep)?;
                if got >= 64 && (fin || !new_stream_each) {
                    break;
                }
            }
            if got != 64 {
                return Err(format!("round {r}: got {got} bytes back"));
            }
            samples.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        ctx.close(&mut ep);
        samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = samples.len().max(1);
        let pct = |p: f64| -> f64 {
            if samples.is_empty() {
                return 0.0;
            }
            let k = ((p / 100.0) * n as f64).ceil() as usize;
            samples[k.clamp(1, n) - 1]
        };
        let mean = samples.iter().sum::<f64>() / n as f64;
        Ok(format!(
            "{{\"scenario\":\"{name}\",\"rounds\":{rounds},\"p50_us\":{:.1},\"p99_us\":{:.1},\"mean_us\":{:.1},\"min_us\":{:.1},\"max_us\":{:.1},{extra}}}",
            pct(50.0),
            pct(99.0),
            mean,
            samples.first().copied().unwrap_or(0.0),
            samples.last().copied().unwrap_or(0.0),
        ))
    }

    fn handshakes(ctx: &mut Ctx, rounds: u64, concurrency: u64, extra: &str) -> Res<String> {
        let start = Instant::now();
        if concurrency <= 1 {
            for _ in 0..rounds {
                let mut ep = ctx.connect()?;
                ctx.close(&mut ep);
            }
        } else {
            let mut pool: Vec<Endpoint> = Vec::new();
            let mut started = 0u64;
            let mut done = 0u64;
            while done < rounds {
                while (pool.len() as u64) < concurrency && started < rounds {
                    pool.push(ctx.start()?);
                    started += 1;
                }
                let (touched, _) = ctx.wait(&mut pool, false)?;
                let mut finished = Vec::new();
                for i in touched {
                    let ep = &mut pool[i];
                    if ep.conn.is_established() {
                        ctx.flush(ep)?;
                        ctx.close(ep);
                        finished.push(i);
                    } else {
                        alive(ep)?;
                        ctx.flush(ep)?;
                    }
                }
                finished.sort_unstable();
                for i in finished.into_iter().rev() {
                    pool.swap_remove(i);
                    done += 1;
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(format!(
            "{{\"scenario\":\"handshakes\",\"count\":{rounds},\"concurrency\":{concurrency},\"seconds\":{secs:.6},\"per_s\":{:.1},{extra}}}",
            rounds as f64 / secs
        ))
    }

    struct TxStream {
        sent: u64,
        fin_sent: bool,
        resp: Vec<u8>,
        resp_fin: bool,
    }

    fn streams(ctx: &mut Ctx, nstreams: u64, size: u64, extra: &str) -> Res<String> {
        if nstreams == 0 {
            return Err("--streams must be > 0".into());
        }
        let pat = pattern();
        let mut ep = ctx.connect()?;
        let mut st: Vec<TxStream> = (0..nstreams)
            .map(|_| TxStream {
                sent: 0,
                fin_sent: false,
                resp: Vec::new(),
                resp_fin: false,
            })
            .collect();
        let mut next_open = 0usize; // streams [0, next_open) have been written to
        let mut finished = 0u64;
        let mut rbuf = vec![0u8; RECV_BUF_LEN];
        let mut last_sweep = Instant::now();
        let start = Instant::now();
        let per_visit = (CHUNK as u64).min(size.max(1));

        // Write one chunk to stream i; returns false when the connection has
        // no send capacity left (stop the pass).
        let write_one = |ep: &mut Endpoint, s: &mut TxStream, i: usize| -> Res<bool> {
            if s.fin_sent {
                return Ok(true);
            }
            let id = 4 * i as u64;
            let rem = size - s.sent;
            let n = rem.min(per_visit) as usize;
            let off = (s.sent % PATTERN_PERIOD as u64) as usize;
            let fin = rem == n as u64;
            match ep.conn.stream_send(id, &pat[off..off + n], fin) {
                Ok(w) => {
                    s.sent += w as u64;
                    if fin && w == n {
                        s.fin_sent = true;
                    }
                    Ok(w == n)
                }
                Err(quiche::Error::Done) | Err(quiche::Error::StreamLimit) => Ok(false),
                Err(e) => Err(format!("stream_send {id}: {e:?}")),
            }
        };

        while finished < nstreams {
            alive(&ep)?;
            // 1. Opened streams that quiche reports writable (round-robin order).
            for id in ep.conn.writable() {
                let i = (id / 4) as usize;
                if id % 4 != 0 || i >= next_open {
                    continue;
                }
                if !write_one(&mut ep, &mut st[i], i)? {
                    break;
                }
            }
            // 2. Open further streams while there is capacity.
            while next_open < st.len() {
                let i = next_open;
                let before = st[i].sent;
                let ok = write_one(&mut ep, &mut st[i], i)?;
                if st[i].sent > before || st[i].fin_sent {
                    next_open += 1;
                }
                if !ok {
                    break;
                }
            }
            // 3. Occasional full sweep, in case a writable event was missed.
            if last_sweep.elapsed() >= Duration::from_millis(100) {
                last_sweep = Instant::now();
                for i in 0..next_open {
                    if !write_one(&mut ep, &mut st[i], i)? {
                        break;
                    }
                }
            }
            ctx.flush(&mut ep)?;
            ctx.wait1(&mut ep)?;
            for id in ep.conn.readable() {
                let i = (id / 4) as usize;
                if id % 4 != 0 || i >= st.len() {
                    continue;
                }
                let s = &mut st[i];
                let (_, fin) = drain_stream(&mut ep, id, &mut rbuf, Some(&mut s.resp))?;
                if fin && !s.resp_fin {
                    s.resp_fin = true;
                    if s.resp != b"ok" {
                        return Err(format!("stream {id}: unexpected response"));
                    }
                    finished += 1;
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        ctx.close(&mut ep);
        let bytes = nstreams * size;
        Ok(format!(
            "{{\"scenario\":\"streams\",\"streams\":{nstreams},\"size\":{size},\"bytes\":{bytes},\"seconds\":{secs:.6},\"mb_per_s\":{:.3},{extra}}}",
            bytes as f64 / secs / 1e6
        ))
    }

    /// Pings every established idle connection once per PING_PERIOD (the
    /// idle scenario runs with a 10-minute idle timeout: a client polls
    /// 10,000 sockets, so every wake-up costs), a
    /// tenth of them every tenth of the period, so the server never gets
    /// one burst of thousands of packets (which a socket buffer drops).
    struct Pinger {
        next: usize,
        last: Instant,
    }

    const PING_PERIOD: Duration = Duration::from_secs(240);

    impl Pinger {
        fn new() -> Pinger {
            Pinger {
                next: 0,
                last: Instant::now(),
            }
        }

        fn tick(&mut self, ctx: &mut Ctx, eps: &mut [Endpoint], est: &[bool]) -> Res<()> {
            if self.last.elapsed() < PING_PERIOD / 10 || eps.is_empty() {
                return Ok(());
            }
            self.last = Instant::now();
            let share = eps.len().div_ceil(10);
            for _ in 0..share {
                let i = self.next % eps.len();
                self.next = self.next.wrapping_add(1);
                if est[i] {
                    let _ = eps[i].conn.send_ack_eliciting();
                    ctx.flush(&mut eps[i])?;
                }
            }
            Ok(())
        }
    }

    fn idle(ctx: &mut Ctx, n: u64, extra: &str) -> Res<String> {
        const IN_FLIGHT: u64 = 64; // handshakes in flight while opening
        let mut eps: Vec<Endpoint> = Vec::new();
        let mut est: Vec<bool> = Vec::new();
        let mut n_est = 0u64;
        let mut retried = 0u64;
        let mut pinger = Pinger::new();
        while n_est < n {
            while (eps.len() as u64) < n && (eps.len() as u64 - n_est) < IN_FLIGHT {
                eps.push(ctx.start()?);
                est.push(false);
            }
            // Opening many takes longer than the idle timeout: keep the
            // first ones alive.
            pinger.tick(ctx, &mut eps, &est)?;
            let (touched, _) = ctx.wait(&mut eps, false)?;
            for i in touched {
                if eps[i].conn.is_closed() {
                    // A handshake that failed (its packets dropped by a
                    // full socket buffer on a busy machine; or our side
                    // finished but the server's handshake timer ran out
                    // before our last flight arrived) is tried again: the
                    // scenario measures connections held, not lost.
                    if est[i] {
                        est[i] = false;
                        n_est -= 1;
                    }
                    retried += 1;
                    if retried > n / 10 + 100 {
                        alive(&eps[i])?;
                    }
                    eps[i] = ctx.start()?;
                    continue;
                }
                alive(&eps[i])?;
                ctx.flush(&mut eps[i])?;
                if !est[i] && eps[i].conn.is_established() {
                    est[i] = true;
                    n_est += 1;
                }
            }
        }
        {
            let mut so = io::stdout().lock();
            writeln!(so, "IDLE_READY").ok();
            so.flush().ok();
        }
        let ready = Instant::now();
        let hold = Duration::from_secs(2);
        let mut stdin_done = false;
        let mut acc = Vec::new();
        while !(stdin_done && ready.elapsed() >= hold) {
            let (touched, stdin_ev) = ctx.wait(&mut eps, !stdin_done)?;
            if stdin_ev && (read_stdin(&mut acc) || acc.windows(4).any(|w| w == b"done")) {
                stdin_done = true;
            }
            // Keep-alive, in case the owner holds us longer than the idle timeout.
            pinger.tick(ctx, &mut eps, &est)?;
            for i in touched {
                alive(&eps[i])?;
                ctx.flush(&mut eps[i])?;
            }
        }
        for ep in eps.iter() {
            alive(ep)?;
        }
        for ep in eps.iter_mut() {
            ctx.close(ep);
        }
        Ok(format!(
            "{{\"scenario\":\"idle\",\"connections\":{n},{extra}}}"
        ))
    }

    /// `dgram`: DATAGRAMs of `size` bytes, each numbered in its first 8
    /// bytes, sent for `seconds` to a dgram_echo server, counting the echoes.
    /// At most `window` numbers are in flight past the highest one echoed
    /// (so a loss does not shrink the window for good); when the window
    /// stays full for DGRAM_STALL, what is in flight counts as lost. When
    /// quiche's send queue is full (Done), sending waits for the network.
    /// After `seconds`, echoes are collected until none came for
    /// DGRAM_QUIET (at most DGRAM_DRAIN). The rate is echoes per second up
    /// to the last echo; loss is the fraction sent but never echoed.
    fn dgram(ctx: &mut Ctx, seconds: u64, size: usize, window: u64, extra: &str) -> Res<String> {
        const DGRAM_STALL: Duration = Duration::from_millis(50);
        const DGRAM_QUIET: Duration = Duration::from_millis(200);
        const DGRAM_DRAIN: Duration = Duration::from_secs(2);
        if size < 8 {
            return Err("--size must be at least 8".into());
        }
        let mut ep = ctx.connect()?;
        match ep.conn.dgram_max_writable_len() {
            Some(max) if max >= size => {}
            other => return Err(format!("datagrams of {size} B do not fit (max {other:?})")),
        }
        let mut payload = vec![0xa5u8; size];
        let mut rbuf = vec![0u8; RECV_BUF_LEN];
        let (mut next, mut sent, mut echoed, mut reordered) = (0u64, 0u64, 0u64, 0u64);
        // Numbers below `acked` are echoed or given up on.
        let mut acked = 0u64;
        // One past the highest number echoed.
        let mut highest = 0u64;
        let start = Instant::now();
        let send_end = start + Duration::from_secs(seconds);
        let mut last_echo = start;
        let mut last_progress = start;
        loop {
            alive(&ep)?;
            let now = Instant::now();
            let sending = now < send_end;
            if sending {
                while next - acked < window {
                    payload[..8].copy_from_slice(&next.to_be_bytes());
                    match ep.conn.dgram_send(&payload) {
                        Ok(()) => {
                            next += 1;
                            sent += 1;
                        }
                        Err(quiche::Error::Done) => break,
                        Err(e) => return Err(format!("dgram_send: {e:?}")),
                    }
                }
                if next - acked >= window && now.duration_since(last_progress) >= DGRAM_STALL {
                    acked = next;
                    last_progress = now;
                }
            } else if echoed == sent
                || now.duration_since(last_echo) >= DGRAM_QUIET
                || now.duration_since(send_end) >= DGRAM_DRAIN
            {
                break;
            }
            ctx.flush(&mut ep)?;
            let cap = if sending {
                send_end.saturating_duration_since(now).min(DGRAM_STALL)
            } else {
                DGRAM_QUIET
            };
            ctx.wait_at_most(std::slice::from_mut(&mut ep), false, cap)?;
            while let Ok(n) = ep.conn.dgram_recv(&mut rbuf) {
                if n < 8 {
                    return Err(format!("short echo of {n} bytes"));
                }
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&rbuf[..8]);
                let seq = u64::from_be_bytes(seq);
                echoed += 1;
                // An echo numbered below one that came before it.
                if seq < highest {
                    reordered += 1;
                }
                highest = highest.max(seq + 1);
                acked = acked.max(seq + 1);
                last_echo = Instant::now();
                last_progress = last_echo;
            }
        }
        let secs = last_echo.duration_since(start).as_secs_f64().max(1e-9);
        let stats = ep.conn.stats();
        ctx.close(&mut ep);
        let loss = if sent == 0 {
            0.0
        } else {
            (sent - echoed) as f64 / sent as f64
        };
        Ok(format!(
            "{{\"scenario\":\"dgram\",\"size\":{size},\"window\":{window},\"send_seconds\":{seconds},\"seconds\":{secs:.6},\"sent\":{sent},\"echoed\":{echoed},\"per_s\":{:.1},\"loss_pct\":{:.3},\"reordered\":{reordered},\"dgrams_sent\":{},\"dgrams_received\":{},\"packets_sent\":{},\"packets_lost\":{},{extra}}}",
            echoed as f64 / secs,
            loss * 100.0,
            stats.dgram_sent,
            stats.dgram_recv,
            stats.sent,
            stats.lost,
        ))
    }
}
