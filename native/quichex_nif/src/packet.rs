//! Packet NIFs for the listener: header parsing, Version Negotiation and
//! Retry packets. The byte-level work is in `wire.rs`.

use rustler::{Binary, Encoder, Env, Term};

use crate::atoms;
use crate::error::{Error, Result};
use crate::util::{bytes_term, cid_or_empty};
use crate::wire;

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
    let hdr = wire::parse_header(data.as_slice(), dcid_len)?;
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
    let mut out = [0u8; wire::STATELESS_PACKET_LEN];
    let n = wire::negotiate_version(&cid_or_empty(&scid)?, &cid_or_empty(&dcid)?, &mut out)?;
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
    if token.len() > wire::MAX_RETRY_TOKEN_LEN {
        return Err(Error::BadArg("token"));
    }
    let mut out = [0u8; wire::STATELESS_PACKET_LEN];
    let n = wire::retry(
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
