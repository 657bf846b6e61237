//! The NIF's error type. Every failure reaches Elixir as the `reason` of an
//! `{:error, reason}` tuple: a bare atom or a tagged tuple.

use rustler::{Encoder, Env, Term};

use crate::atoms;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error returned by quiche.
    #[error("quiche: {0}")]
    Quiche(#[from] quiche::Error),
    /// An argument had the wrong shape or range; the string names it.
    #[error("bad argument: {0}")]
    BadArg(&'static str),
    /// A config option had a bad value: `{:invalid_option, name}`.
    #[error("invalid option {0}")]
    InvalidOption(String),
    /// A TLS file could not be loaded: `{:tls_file, option, path}`.
    #[error("cannot load {what} from {path}")]
    TlsFile { what: &'static str, path: String },
    /// A mutex was poisoned by an earlier panic.
    #[error("lock poisoned")]
    Poisoned,
}

pub type Result<T> = std::result::Result<T, Error>;

/// The atom name and the optional payload a `quiche::Error` maps to.
pub fn quiche_error_parts(e: &quiche::Error) -> (&'static str, Option<u64>) {
    use quiche::Error as Q;
    match e {
        Q::Done => ("done", None),
        Q::BufferTooShort => ("buffer_too_short", None),
        Q::UnknownVersion => ("unknown_version", None),
        Q::InvalidFrame => ("invalid_frame", None),
        Q::InvalidPacket => ("invalid_packet", None),
        Q::InvalidState => ("invalid_state", None),
        Q::InvalidStreamState(id) => ("invalid_stream_state", Some(*id)),
        Q::InvalidTransportParam => ("invalid_transport_param", None),
        Q::CryptoFail => ("crypto_fail", None),
        Q::TlsFail => ("tls_fail", None),
        Q::FlowControl => ("flow_control", None),
        Q::StreamLimit => ("stream_limit", None),
        Q::StreamStopped(code) => ("stream_stopped", Some(*code)),
        Q::StreamReset(code) => ("stream_reset", Some(*code)),
        Q::FinalSize => ("final_size", None),
        Q::CongestionControl => ("congestion_control", None),
        Q::IdLimit => ("id_limit", None),
        Q::OutOfIdentifiers => ("out_of_identifiers", None),
        Q::KeyUpdate => ("key_update", None),
        Q::CryptoBufferExceeded => ("crypto_buffer_exceeded", None),
        Q::InvalidAckRange => ("invalid_ack_range", None),
        Q::OptimisticAckDetected => ("optimistic_ack_detected", None),
        Q::InvalidDcidInitialization => ("invalid_dcid_initialization", None),
    }
}

/// Encodes a quiche error as `:name` or `{:name, value}`.
pub fn encode_quiche_error<'a>(env: Env<'a>, e: &quiche::Error) -> Term<'a> {
    let (name, payload) = quiche_error_parts(e);
    let atom = match rustler::Atom::from_str(env, name) {
        Ok(atom) => atom,
        Err(_) => atoms::error(),
    };
    match payload {
        Some(v) => (atom, v).encode(env),
        None => atom.encode(env),
    }
}

impl Encoder for Error {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        match self {
            Error::Quiche(e) => encode_quiche_error(env, e),
            Error::BadArg(what) => (atoms::badarg(), *what).encode(env),
            Error::InvalidOption(name) => {
                (atoms::invalid_option(), atom_or_string(env, name)).encode(env)
            }
            Error::TlsFile { what, path } => {
                (atoms::tls_file(), atom_or_string(env, what), path.as_str()).encode(env)
            }
            Error::Poisoned => atoms::lock_poisoned().encode(env),
        }
    }
}

/// Option names are atoms in Elixir; they come from our own tables or from
/// an atom the caller passed, so the atom already exists.
fn atom_or_string<'a>(env: Env<'a>, name: &str) -> Term<'a> {
    match rustler::Atom::from_str(env, name) {
        Ok(atom) => atom.encode(env),
        Err(_) => name.encode(env),
    }
}

impl<T> From<std::sync::PoisonError<T>> for Error {
    fn from(_: std::sync::PoisonError<T>) -> Self {
        Error::Poisoned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_quiche_error_has_a_distinct_name() {
        use quiche::Error as Q;
        let all = [
            Q::Done,
            Q::BufferTooShort,
            Q::UnknownVersion,
            Q::InvalidFrame,
            Q::InvalidPacket,
            Q::InvalidState,
            Q::InvalidStreamState(4),
            Q::InvalidTransportParam,
            Q::CryptoFail,
            Q::TlsFail,
            Q::FlowControl,
            Q::StreamLimit,
            Q::StreamStopped(7),
            Q::StreamReset(9),
            Q::FinalSize,
            Q::CongestionControl,
            Q::IdLimit,
            Q::OutOfIdentifiers,
            Q::KeyUpdate,
            Q::CryptoBufferExceeded,
            Q::InvalidAckRange,
            Q::OptimisticAckDetected,
            Q::InvalidDcidInitialization,
        ];
        let names: std::collections::HashSet<_> =
            all.iter().map(|e| quiche_error_parts(e).0).collect();
        assert_eq!(names.len(), all.len());
    }

    #[test]
    fn payload_variants_carry_their_value() {
        assert_eq!(
            quiche_error_parts(&quiche::Error::StreamReset(42)),
            ("stream_reset", Some(42))
        );
        assert_eq!(
            quiche_error_parts(&quiche::Error::StreamStopped(3)),
            ("stream_stopped", Some(3))
        );
        assert_eq!(
            quiche_error_parts(&quiche::Error::InvalidStreamState(8)),
            ("invalid_stream_state", Some(8))
        );
        assert_eq!(quiche_error_parts(&quiche::Error::Done), ("done", None));
    }
}
