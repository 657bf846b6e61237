//! Writes the seed corpus under `corpus/<target>/`: real packets from a
//! quiche handshake, the stateless packets, varints and a session ticket.
//! Run once after `cargo afl build --release --features afl` as
//! `target/release/seeds`; the output is committed.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).expect("corpus dir");
    fs::write(dir.join(name), bytes).expect("seed");
}

fn prefixed(first: u8, rest: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    v.extend_from_slice(rest);
    v
}

fn flush(conn: &mut quiche::Connection) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1350];
    while let Ok((n, _)) = conn.send(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

fn main() {
    let client_addr = SocketAddr::from(([127, 0, 0, 1], 40000));
    let server_addr = SocketAddr::from(([127, 0, 0, 1], 4433));
    let mut ccfg = quichex_fuzz::config(false);
    let mut scfg = quichex_fuzz::config(true);
    let ccid = quiche::ConnectionId::from_ref(&[0xc1; 16]);
    let scid = quiche::ConnectionId::from_ref(&[0x5e; 16]);
    let mut client = quiche::connect(
        Some("localhost"),
        &ccid,
        client_addr,
        server_addr,
        &mut ccfg,
    )
    .unwrap();
    let mut server = quiche::accept(&scid, None, server_addr, client_addr, &mut scfg).unwrap();

    let mut client_flights = Vec::new();
    let mut server_flights = Vec::new();
    for _ in 0..10 {
        let c = flush(&mut client);
        for p in &c {
            let _ = server.recv(
                &mut p.clone(),
                quiche::RecvInfo {
                    from: client_addr,
                    to: server_addr,
                },
            );
        }
        let s = flush(&mut server);
        for p in &s {
            let _ = client.recv(
                &mut p.clone(),
                quiche::RecvInfo {
                    from: server_addr,
                    to: client_addr,
                },
            );
        }
        client_flights.extend(c);
        server_flights.extend(s);
        if client.is_established() && server.is_established() && client.session().is_some() {
            break;
        }
    }
    assert!(client.is_established(), "handshake");
    // Some application data both ways, so short header packets are in.
    client.stream_send(0, b"hello", true).unwrap();
    let short = flush(&mut client);
    for p in &short {
        let _ = server.recv(
            &mut p.clone(),
            quiche::RecvInfo {
                from: client_addr,
                to: server_addr,
            },
        );
    }
    client_flights.extend(short.iter().cloned());

    let initial = &client_flights[0];
    write("header", "client_initial", &prefixed(16, initial));
    write(
        "header",
        "server_first_flight",
        &prefixed(16, &server_flights[0]),
    );
    write("header", "short", &prefixed(16, &short[0]));
    write(
        "header",
        "coalesced",
        &prefixed(
            1,
            &[
                0xe0, 0, 0, 0, 1, 1, 0xaa, 1, 0xbb, 0x03, 1, 2, 3, 0x40, 9, 9, 9, 9,
            ],
        ),
    );
    let mut out = [0u8; 1350];
    let n = quiche::negotiate_version(&ccid, &scid, &mut out).unwrap();
    write("header", "version_negotiation", &prefixed(0, &out[..n]));
    let n = quiche::retry(
        &ccid,
        &scid,
        &scid,
        b"token-token-token",
        quiche::PROTOCOL_VERSION,
        &mut out,
    )
    .unwrap();
    write("header", "retry", &prefixed(0, &out[..n]));

    for (name, v) in [
        ("1", &[0x25][..]),
        ("2", &[0x7b, 0xbd][..]),
        ("4", &[0x9d, 0x7f, 0x3e, 0x7d][..]),
        ("8", &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c][..]),
    ] {
        write("varint", name, v);
    }

    let mut fields = quiche::PROTOCOL_VERSION.to_be_bytes().to_vec();
    for cid in [&[0xc1u8; 8][..], &[0xd1; 8][..], &[0x5e; 16][..]] {
        fields.push(cid.len() as u8);
        fields.extend_from_slice(cid);
    }
    fields.extend_from_slice(&[0x70; 41]);
    write("retry", "fields", &fields);

    write("recv", "client_initial", &prefixed(0, initial));
    write(
        "recv",
        "server_first_flight",
        &prefixed(1, &server_flights.concat()),
    );
    write("recv", "short", &prefixed(0, &short[0]));
    // Two Initials in one GRO buffer (segment size 150 * 8 = 1200).
    if initial.len() == 1200 {
        write(
            "recv",
            "gro",
            &prefixed(150 << 1, &[initial.clone(), initial.clone()].concat()),
        );
    }

    let session = client.session().expect("a session ticket");
    write("session", "ticket", session);
}
