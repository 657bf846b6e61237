//! Network paths and connection IDs: probing and migrating (clients), path
//! events, per-path statistics, issuing and retiring our connection IDs.

use rustler::{Atom, Binary, Encoder, Env, NifMap, ResourceArc, Term};

use crate::atoms;
use crate::connection::{ConnInner, ConnResource};
use crate::error::{Error, Result};
use crate::util::{bytes_term, cid, decode_addr, encode_addr, micros};

/// A stateless reset token from its 16 bytes.
pub fn reset_token(token: &Binary) -> Result<u128> {
    let bytes: [u8; 16] = token
        .as_slice()
        .try_into()
        .map_err(|_| Error::BadArg("reset token"))?;
    Ok(u128::from_be_bytes(bytes))
}

/// Path events since the last poll: `{kind, local, peer}` for `:new`,
/// `:validated`, `:failed`, `:closed` and `:peer_migrated`;
/// `{:reused_cid, seq, {old_local, old_peer}, {local, peer}}`.
pub fn take_events<'a>(env: Env<'a>, inner: &mut ConnInner) -> Vec<Term<'a>> {
    let mut out = Vec::new();
    while let Some(event) = inner.conn.path_event_next() {
        let pair =
            |kind: Atom, l, p| (kind, encode_addr(env, &l), encode_addr(env, &p)).encode(env);
        let term = match event {
            quiche::PathEvent::New(l, p) => pair(atoms::new(), l, p),
            quiche::PathEvent::Validated(l, p) => pair(atoms::validated(), l, p),
            quiche::PathEvent::FailedValidation(l, p) => pair(atoms::failed(), l, p),
            quiche::PathEvent::Closed(l, p) => pair(atoms::closed(), l, p),
            quiche::PathEvent::PeerMigrated(l, p) => pair(atoms::peer_migrated(), l, p),
            quiche::PathEvent::ReusedSourceConnectionId(seq, (ol, op), (l, p)) => (
                atoms::reused_cid(),
                seq,
                (encode_addr(env, &ol), encode_addr(env, &op)),
                (encode_addr(env, &l), encode_addr(env, &p)),
            )
                .encode(env),
            // PMTU changes and anything newer: nothing to report.
            _ => continue,
        };
        out.push(term);
    }
    out
}

/// Our connection IDs the peer retired since the last poll.
pub fn take_retired<'a>(env: Env<'a>, inner: &mut ConnInner) -> Vec<Term<'a>> {
    let mut out = Vec::new();
    while let Some(cid) = inner.conn.retired_scid_next() {
        out.push(bytes_term(env, cid.as_ref()));
    }
    out
}

/// Offers the peer more of our connection IDs: `[{cid, reset_token}]`.
/// With `retire`, quiche asks the peer to retire older ones when the limit
/// is reached (a rotation). Returns the sequence numbers.
#[rustler::nif]
fn connection_new_scids(
    conn: ResourceArc<ConnResource>,
    cids: Vec<(Binary, Binary)>,
    retire: bool,
) -> Result<Vec<u64>> {
    let cids = cids
        .iter()
        .map(|(c, t)| Ok((cid(c)?, reset_token(t)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut guard = conn.lock()?;
    let mut seqs = Vec::with_capacity(cids.len());
    for (c, token) in cids {
        seqs.push(guard.conn.new_scid(&c, token, retire)?);
    }
    Ok(seqs)
}

/// Starts validating the path `local` -> `peer` (a client's new local
/// address): returns the sequence number of the peer's connection ID it
/// uses; `:out_of_identifiers` when the peer gave no spare one.
#[rustler::nif]
fn connection_probe_path(conn: ResourceArc<ConnResource>, local: Term, peer: Term) -> Result<u64> {
    let local = decode_addr(local)?;
    let peer = decode_addr(peer)?;
    Ok(conn.lock()?.conn.probe_path(local, peer)?)
}

/// Makes `local` -> `peer` the active path (clients only).
#[rustler::nif]
fn connection_migrate(conn: ResourceArc<ConnResource>, local: Term, peer: Term) -> Result<u64> {
    let local = decode_addr(local)?;
    let peer = decode_addr(peer)?;
    Ok(conn.lock()?.conn.migrate(local, peer)?)
}

#[derive(NifMap)]
struct Path<'a> {
    local: Term<'a>,
    peer: Term<'a>,
    active: bool,
    validation: Atom,
    rtt: u64,
    min_rtt: Option<u64>,
    rttvar: u64,
    cwnd: usize,
    pmtu: usize,
    delivery_rate: u64,
    packets_sent: usize,
    packets_received: usize,
    packets_lost: usize,
    packets_retransmitted: usize,
    bytes_sent: u64,
    bytes_received: u64,
    bytes_lost: u64,
}

/// Every path quiche knows, with its statistics.
#[rustler::nif]
fn connection_paths<'a>(env: Env<'a>, conn: ResourceArc<ConnResource>) -> Result<Vec<Path<'a>>> {
    let guard = conn.lock()?;
    Ok(guard
        .conn
        .path_stats()
        .map(|p| Path {
            local: encode_addr(env, &p.local_addr),
            peer: encode_addr(env, &p.peer_addr),
            active: p.active,
            // quiche does not export PathState; its Debug names are stable.
            validation: match format!("{:?}", p.validation_state).as_str() {
                "Failed" => atoms::failed(),
                "Validated" => atoms::validated(),
                "Validating" | "ValidatingMTU" => atoms::validating(),
                _ => atoms::unknown(),
            },
            rtt: micros(p.rtt),
            min_rtt: p.min_rtt.map(micros),
            rttvar: micros(p.rttvar),
            cwnd: p.cwnd,
            pmtu: p.pmtu,
            delivery_rate: p.delivery_rate,
            packets_sent: p.sent,
            packets_received: p.recv,
            packets_lost: p.lost,
            packets_retransmitted: p.retrans,
            bytes_sent: p.sent_bytes,
            bytes_received: p.recv_bytes,
            bytes_lost: p.lost_bytes,
        })
        .collect())
}
