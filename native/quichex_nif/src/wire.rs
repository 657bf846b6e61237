//! The bytes a peer controls, in plain Rust (no Erlang terms): varints,
//! connection IDs, packet headers, splitting GRO buffers and coalesced
//! datagrams into packets, and the stateless packets (Version Negotiation,
//! Retry) built from a peer's IDs and token.
//!
//! The NIFs in `packet.rs` and `driver.rs` call these functions, and so do
//! the fuzz targets in `fuzz/` (a separate crate that links this one), so
//! what is fuzzed is the code that runs.

/// Longest Retry token we send (ours are 25 to 45 bytes).
pub const MAX_RETRY_TOKEN_LEN: usize = 512;

/// Size of the buffer a Version Negotiation or Retry packet is built in.
pub const STATELESS_PACKET_LEN: usize = 1350;

/// Reads a QUIC variable-length integer at `pos`: `(value, bytes)`.
pub fn read_varint(buf: &[u8], pos: usize) -> Option<(u64, usize)> {
    let first = *buf.get(pos)?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(pos..pos.checked_add(len)?)?;
    let mut v = u64::from(first & 0x3f);
    for b in &bytes[1..] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

/// A connection ID of 1..=20 bytes (`quiche::MAX_CONN_ID_LEN`).
pub fn conn_id(bytes: &[u8]) -> Option<quiche::ConnectionId<'static>> {
    if bytes.is_empty() || bytes.len() > quiche::MAX_CONN_ID_LEN {
        return None;
    }
    Some(quiche::ConnectionId::from_vec(bytes.to_vec()))
}

/// Like `conn_id`, but an empty ID is allowed (a client may choose one).
pub fn conn_id_or_empty(bytes: &[u8]) -> Option<quiche::ConnectionId<'static>> {
    if bytes.is_empty() {
        return Some(quiche::ConnectionId::from_vec(Vec::new()));
    }
    conn_id(bytes)
}

/// Parses a packet header out of a copy of `data` (quiche parses in place).
/// `dcid_len` is the length of our own connection IDs, which short headers
/// do not carry; the caller bounds it by `quiche::MAX_CONN_ID_LEN`.
pub fn parse_header(data: &[u8], dcid_len: usize) -> quiche::Result<quiche::Header<'static>> {
    let mut buf = data.to_vec();
    quiche::Header::from_slice(&mut buf, dcid_len)
}

/// Splits a GRO buffer into its datagrams: every one but the last has
/// `segment_size` bytes; 0 means the buffer is a single datagram.
pub fn datagrams(bytes: &[u8], segment_size: usize) -> std::slice::Chunks<'_, u8> {
    let seg = if segment_size == 0 {
        bytes.len().max(1)
    } else {
        segment_size
    };
    bytes.chunks(seg)
}

/// The packets of a (possibly coalesced) datagram, in order: they are never
/// empty and add up to the whole datagram.
pub fn packets(datagram: &[u8]) -> Packets<'_> {
    Packets { rest: datagram }
}

/// Iterator returned by [`packets`].
pub struct Packets<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Packets<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let (packet, tail) = self.rest.split_at(first_packet_len(self.rest));
        self.rest = tail;
        Some(packet)
    }
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
            pos = pos
                .checked_add(n)?
                .checked_add(usize::try_from(token_len).ok()?)?;
        }
        3 => return None, // Retry: no length field.
        _ => {}
    }
    let (len, n) = read_varint(buf, pos)?;
    pos.checked_add(n)?.checked_add(usize::try_from(len).ok()?)
}

/// A Version Negotiation packet answering a client's `scid`/`dcid`, written
/// into `out`; returns its length.
pub fn negotiate_version(
    scid: &quiche::ConnectionId,
    dcid: &quiche::ConnectionId,
    out: &mut [u8; STATELESS_PACKET_LEN],
) -> quiche::Result<usize> {
    quiche::negotiate_version(scid, dcid, out)
}

/// A Retry packet carrying `token` (at most `MAX_RETRY_TOKEN_LEN` bytes,
/// checked by the caller), telling the client to use `new_scid`, written
/// into `out`; returns its length.
pub fn retry(
    scid: &quiche::ConnectionId,
    dcid: &quiche::ConnectionId,
    new_scid: &quiche::ConnectionId,
    token: &[u8],
    version: u32,
    out: &mut [u8; STATELESS_PACKET_LEN],
) -> quiche::Result<usize> {
    quiche::retry(scid, dcid, new_scid, token, version, out)
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
        let split: Vec<&[u8]> = packets(&d).collect();
        assert_eq!(split, vec![&d[..first], &d[first..]]);
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
        assert_eq!(packets(&[]).count(), 0);
    }

    #[test]
    fn huge_token_length_does_not_overflow() {
        // Initial whose token length is the largest varint.
        let mut d = vec![0xc0, 0, 0, 0, 1, 0, 0];
        d.extend_from_slice(&[0xff; 8]);
        d.push(0x01);
        assert_eq!(first_packet_len(&d), d.len());
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
        assert_eq!(read_varint(&[0x25], usize::MAX), None);
    }

    #[test]
    fn gro_buffers_split_into_segments() {
        let d = [1u8; 10];
        let lens: Vec<usize> = datagrams(&d, 4).map(<[u8]>::len).collect();
        assert_eq!(lens, vec![4, 4, 2]);
        assert_eq!(datagrams(&d, 0).count(), 1);
        assert_eq!(datagrams(&[], 0).count(), 0);
    }

    #[test]
    fn connection_ids_are_bounded() {
        assert!(conn_id(&[]).is_none());
        assert!(conn_id(&[0; 21]).is_none());
        assert_eq!(conn_id(&[7; 20]).map(|c| c.len()), Some(20));
        assert_eq!(conn_id_or_empty(&[]).map(|c| c.len()), Some(0));
        assert!(conn_id_or_empty(&[0; 21]).is_none());
    }
}
