//! Packet parsing and stateless packets: header parsing for the listener,
//! splitting coalesced datagrams for the connection, Version Negotiation and
//! Retry packets.

use rustler::{Binary, Encoder, Env, Term};

use crate::atoms;
use crate::error::{Error, Result};
use crate::util::{bytes_term, cid_or_empty};

fn type_atom(ty: quiche::Type) -> rustler::Atom {
    match ty {
        quiche::Type::Initial => atoms::initial(),
        quiche::Type::Retry => atoms::retry(),
        quiche::Type::Handshake => atoms::handshake(),
        quiche::Type::ZeroRTT => atoms::zero_rtt(),
        quiche::Type::Short => atoms::short(),
        quiche::Type::VersionNegotiation => atoms::version_negotiation(),
    }
}

/// Parses a packet header: `{type, version, dcid, scid, token | nil}`.
/// `dcid_len` is the length of our own connection IDs (short headers do
/// not carry it).
#[rustler::nif]
fn packet_header<'a>(env: Env<'a>, data: Binary, dcid_len: usize) -> Result<Term<'a>> {
    if dcid_len > quiche::MAX_CONN_ID_LEN {
        return Err(Error::BadArg("dcid_len"));
    }
    let mut buf = data.as_slice().to_vec();
    let hdr = quiche::Header::from_slice(&mut buf, dcid_len)?;
    let token = hdr.token.as_ref().map(|t| bytes_term(env, t));
    Ok((
        type_atom(hdr.ty),
        hdr.version,
        bytes_term(env, hdr.dcid.as_ref()),
        bytes_term(env, hdr.scid.as_ref()),
        token,
    )
        .encode(env))
}

/// A Version Negotiation packet answering a client's `scid`/`dcid`.
#[rustler::nif]
fn packet_negotiate_version<'a>(env: Env<'a>, scid: Binary, dcid: Binary) -> Result<Term<'a>> {
    let mut out = [0u8; 1350];
    let n = quiche::negotiate_version(&cid_or_empty(&scid)?, &cid_or_empty(&dcid)?, &mut out)?;
    Ok(bytes_term(env, &out[..n]))
}

/// A Retry packet carrying `token`, telling the client to use `new_scid`.
#[rustler::nif]
fn packet_retry<'a>(
    env: Env<'a>,
    scid: Binary,
    dcid: Binary,
    new_scid: Binary,
    token: Binary,
    version: u32,
) -> Result<Term<'a>> {
    if token.len() > 512 {
        return Err(Error::BadArg("token"));
    }
    let mut out = [0u8; 1350];
    let n = quiche::retry(
        &cid_or_empty(&scid)?,
        &cid_or_empty(&dcid)?,
        &cid_or_empty(&new_scid)?,
        token.as_slice(),
        version,
        &mut out,
    )?;
    Ok(bytes_term(env, &out[..n]))
}

/// Whether quiche speaks this QUIC version.
#[rustler::nif]
fn packet_version_supported(version: u32) -> bool {
    quiche::version_is_supported(version)
}

/// Reads a QUIC variable-length integer at `pos`: `(value, bytes)`.
fn read_varint(buf: &[u8], pos: usize) -> Option<(u64, usize)> {
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
            let (token_len, n) = read_varint(buf, pos)?;
            pos += n + usize::try_from(token_len).ok()?;
        }
        3 => return None, // Retry: no length field.
        _ => {}
    }
    let (len, n) = read_varint(buf, pos)?;
    pos.checked_add(n)?.checked_add(usize::try_from(len).ok()?)
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
        assert_eq!(read_varint(&[0x25], 0), Some((37, 1)));
        assert_eq!(read_varint(&[0x7b, 0xbd], 0), Some((15293, 2)));
        assert_eq!(
            read_varint(&[0x9d, 0x7f, 0x3e, 0x7d], 0),
            Some((494878333, 4))
        );
        assert_eq!(read_varint(&[0x9d, 0x7f], 0), None);
    }
}
