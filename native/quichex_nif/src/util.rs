//! Conversions between Erlang terms and Rust values shared by every resource:
//! socket addresses, binaries, connection IDs, results, and the protocol
//! limits named once here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use rustler::types::tuple::get_tuple;
use rustler::{Binary, Encoder, Env, Term};

use crate::error::{Error, Result};

/// Largest value a QUIC variable-length integer can hold (2^62 - 1).
pub const MAX_VARINT: u64 = (1 << 62) - 1;

/// Decodes `{{a, b, c, d}, port}` or `{{a, b, c, d, e, f, g, h}, port}`.
pub fn decode_addr(term: Term) -> Result<SocketAddr> {
    let parts = get_tuple(term).map_err(|_| Error::BadArg("address"))?;
    if parts.len() != 2 {
        return Err(Error::BadArg("address"));
    }
    let port: u16 = parts[1].decode().map_err(|_| Error::BadArg("port"))?;
    let ip = get_tuple(parts[0]).map_err(|_| Error::BadArg("ip"))?;
    let ip = match ip.len() {
        4 => {
            let mut o = [0u8; 4];
            for (slot, t) in o.iter_mut().zip(ip.iter()) {
                *slot = t.decode().map_err(|_| Error::BadArg("ip"))?;
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        8 => {
            let mut s = [0u16; 8];
            for (slot, t) in s.iter_mut().zip(ip.iter()) {
                *slot = t.decode().map_err(|_| Error::BadArg("ip"))?;
            }
            IpAddr::V6(Ipv6Addr::from(s))
        }
        _ => return Err(Error::BadArg("ip")),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Encodes a socket address as `{ip_tuple, port}`, the shape `:inet` uses.
pub fn encode_addr<'a>(env: Env<'a>, addr: &SocketAddr) -> Term<'a> {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            (o[0], o[1], o[2], o[3]).encode(env)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let items: Vec<Term> = s.iter().map(|x| x.encode(env)).collect();
            rustler::types::tuple::make_tuple(env, &items)
        }
    };
    (ip, addr.port()).encode(env)
}

/// A fresh binary term holding a copy of `bytes`.
pub fn bytes_term<'a>(env: Env<'a>, bytes: &[u8]) -> Term<'a> {
    let mut bin = rustler::NewBinary::new(env, bytes.len());
    bin.as_mut_slice().copy_from_slice(bytes);
    Binary::from(bin).encode(env)
}

/// A connection ID from a binary of 1..=20 bytes (`quiche::MAX_CONN_ID_LEN`).
pub fn cid(bytes: &Binary) -> Result<quiche::ConnectionId<'static>> {
    crate::wire::conn_id(bytes.as_slice()).ok_or(Error::BadArg("connection id"))
}

/// Like `cid`, but an empty ID is allowed (a client may choose one).
pub fn cid_or_empty(bytes: &Binary) -> Result<quiche::ConnectionId<'static>> {
    crate::wire::conn_id_or_empty(bytes.as_slice()).ok_or(Error::BadArg("connection id"))
}

/// Checks a value that goes on the wire as a varint (error codes, ids).
pub fn varint(value: u64, what: &'static str) -> Result<u64> {
    if value > MAX_VARINT {
        return Err(Error::BadArg(what));
    }
    Ok(value)
}

/// Encodes `Ok(())` as `:ok` and `Err(e)` as `{:error, e}`.
pub fn unit_result<'a>(env: Env<'a>, r: Result<()>) -> Term<'a> {
    match r {
        Ok(()) => crate::atoms::ok().encode(env),
        Err(e) => (crate::atoms::error(), e).encode(env),
    }
}

/// Rounds a duration up to whole milliseconds (timers never fire early).
pub fn ceil_millis(d: std::time::Duration) -> u64 {
    let ms = d.as_millis();
    let rounded = if d.as_nanos().is_multiple_of(1_000_000) {
        ms
    } else {
        ms + 1
    };
    u64::try_from(rounded).unwrap_or(u64::MAX)
}

/// A duration in whole microseconds, saturating.
pub fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ceil_millis_rounds_up() {
        assert_eq!(ceil_millis(Duration::from_micros(0)), 0);
        assert_eq!(ceil_millis(Duration::from_micros(1)), 1);
        assert_eq!(ceil_millis(Duration::from_micros(1000)), 1);
        assert_eq!(ceil_millis(Duration::from_micros(1001)), 2);
    }

    #[test]
    fn varints_are_bounded() {
        assert_eq!(varint(MAX_VARINT, "x").ok(), Some(MAX_VARINT));
        assert!(varint(MAX_VARINT + 1, "x").is_err());
    }
}
