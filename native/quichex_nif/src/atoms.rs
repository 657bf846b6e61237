//! The NIF's fixed atoms. quiche error names are made from
//! `error::quiche_error_parts` when encoded; map keys come from the
//! `NifMap` field names.

rustler::atoms! {
    ok,
    error,
    // our own error reasons
    badarg,
    invalid_option,
    tls_file,
    lock_poisoned,
    finished,
    stopped,
    reset,
    // config option values
    reno,
    cubic,
    bbr2,
    // packet header types
    initial,
    retry,
    handshake,
    zero_rtt,
    short,
    version_negotiation,
    // qlog levels
    core,
    base,
    extra,
    // path events and states
    new,
    validated,
    failed,
    closed,
    peer_migrated,
    reused_cid,
    unknown,
    validating,
    // stream commands
    read,
    write,
    detach,
}
