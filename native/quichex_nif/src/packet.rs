//! Stateless packet helpers for the listener: header parsing, Version
//! Negotiation and Retry packets.

use rustler::{Binary, Encoder, Env, Term};

use crate::atoms;
use crate::config::bytes_term;
use crate::error::{Error, Result};

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

fn cid(b: &Binary) -> Result<quiche::ConnectionId<'static>> {
    if b.len() > quiche::MAX_CONN_ID_LEN {
        return Err(Error::BadArg("connection id"));
    }
    Ok(quiche::ConnectionId::from_vec(b.as_slice().to_vec()))
}

/// A Version Negotiation packet answering a client's `scid`/`dcid`.
#[rustler::nif]
fn packet_negotiate_version<'a>(env: Env<'a>, scid: Binary, dcid: Binary) -> Result<Term<'a>> {
    let mut out = [0u8; 1350];
    let n = quiche::negotiate_version(&cid(&scid)?, &cid(&dcid)?, &mut out)?;
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
        &cid(&scid)?,
        &cid(&dcid)?,
        &cid(&new_scid)?,
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
