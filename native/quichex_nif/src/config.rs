//! `Quichex.Config` to `quiche::Config`.
//!
//! Elixir validates options first (and raises `ArgumentError`); this module
//! validates them again, because a NIF must never trust its arguments, and
//! applies them to a fresh `quiche::Config` held in a resource.

use std::sync::Mutex;

use rustler::{Atom, Encoder, Env, ResourceArc, Term};

use crate::error::{Error, Result};
use crate::util::{bytes_term, MAX_VARINT};

/// The quiche version this crate is pinned to (checked by a unit test).
pub const QUICHE_VERSION: &str = "0.30.0";

type U64Setter = fn(&mut quiche::Config, u64);
type BoolSetter = fn(&mut quiche::Config, bool);

/// Integer options: name, smallest and largest accepted value, setter.
const U64_OPTIONS: &[(&str, u64, u64, U64Setter)] = &[
    ("max_idle_timeout", 0, MAX_VARINT, |c, v| {
        c.set_max_idle_timeout(v)
    }),
    ("initial_max_data", 0, MAX_VARINT, |c, v| {
        c.set_initial_max_data(v)
    }),
    (
        "initial_max_stream_data_bidi_local",
        0,
        MAX_VARINT,
        |c, v| c.set_initial_max_stream_data_bidi_local(v),
    ),
    (
        "initial_max_stream_data_bidi_remote",
        0,
        MAX_VARINT,
        |c, v| c.set_initial_max_stream_data_bidi_remote(v),
    ),
    ("initial_max_stream_data_uni", 0, MAX_VARINT, |c, v| {
        c.set_initial_max_stream_data_uni(v)
    }),
    ("initial_max_streams_bidi", 0, 1 << 60, |c, v| {
        c.set_initial_max_streams_bidi(v)
    }),
    ("initial_max_streams_uni", 0, 1 << 60, |c, v| {
        c.set_initial_max_streams_uni(v)
    }),
    ("max_recv_udp_payload_size", 1200, 65527, |c, v| {
        c.set_max_recv_udp_payload_size(v as usize)
    }),
    ("max_send_udp_payload_size", 1200, 65527, |c, v| {
        c.set_max_send_udp_payload_size(v as usize)
    }),
    ("ack_delay_exponent", 0, 20, |c, v| {
        c.set_ack_delay_exponent(v)
    }),
    ("max_ack_delay", 0, (1 << 14) - 1, |c, v| {
        c.set_max_ack_delay(v)
    }),
    ("active_connection_id_limit", 2, MAX_VARINT, |c, v| {
        c.set_active_connection_id_limit(v)
    }),
    ("max_pacing_rate", 1, u64::MAX, |c, v| {
        c.set_max_pacing_rate(v)
    }),
    ("max_connection_window", 1, MAX_VARINT, |c, v| {
        c.set_max_connection_window(v)
    }),
    ("max_stream_window", 1, MAX_VARINT, |c, v| {
        c.set_max_stream_window(v)
    }),
    ("max_amplification_factor", 1, 3, |c, v| {
        c.set_max_amplification_factor(v as usize)
    }),
    ("initial_congestion_window_packets", 1, 100_000, |c, v| {
        c.set_initial_congestion_window_packets(v as usize)
    }),
];

/// Boolean options.
const BOOL_OPTIONS: &[(&str, BoolSetter)] = &[
    ("disable_active_migration", |c, v| {
        c.set_disable_active_migration(v)
    }),
    ("enable_hystart", |c, v| c.enable_hystart(v)),
    ("enable_pacing", |c, v| c.enable_pacing(v)),
    ("verify_peer", |c, v| c.verify_peer(v)),
    ("grease", |c, v| c.grease(v)),
    ("discover_pmtu", |c, v| c.discover_pmtu(v)),
    ("enable_early_data", |c, v| {
        if v {
            c.enable_early_data()
        }
    }),
];

/// TLS file options, in the order they must be applied (the key is checked
/// against the certificate, so the chain goes first).
const FILE_OPTIONS: &[&str] = &[
    "load_cert_chain_from_pem_file",
    "load_priv_key_from_pem_file",
    "load_verify_locations_from_file",
    "load_verify_locations_from_directory",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cc {
    Reno,
    Cubic,
    /// quiche 0.30's only BBR: BBRv2 from its gcongestion branch (`:bbr`
    /// and `:bbr2` both choose it).
    Bbr2,
}

/// How much a qlog records (quiche's `QlogLevel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QlogLevel {
    Core,
    Base,
    Extra,
}

/// One validated option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    U64(&'static str, u64),
    Bool(&'static str, bool),
    ApplicationProtos(Vec<Vec<u8>>),
    CcAlgorithm(Cc),
    Dgram(bool, usize, usize),
    File(&'static str, String),
    TicketKey(Vec<u8>),
    /// Append TLS secrets (NSS key log format) to this file.
    Keylog(String),
    /// Write one qlog file per connection into this directory.
    Qlog(String, QlogLevel),
}

impl Setting {
    fn order(&self) -> usize {
        match self {
            Setting::File(name, _) => 1 + FILE_OPTIONS.iter().position(|n| n == name).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Setting::U64(n, _) | Setting::Bool(n, _) | Setting::File(n, _) => n,
            Setting::ApplicationProtos(_) => "application_protos",
            Setting::CcAlgorithm(_) => "cc_algorithm",
            Setting::Dgram(..) => "enable_dgram",
            Setting::TicketKey(_) => "ticket_key",
            Setting::Keylog(_) => "keylog_file",
            Setting::Qlog(..) => "qlog_dir",
        }
    }
}

pub fn u64_setting(name: &str, v: u64) -> Result<Setting> {
    match U64_OPTIONS.iter().find(|(n, ..)| *n == name) {
        Some((n, min, max, _)) if v >= *min && v <= *max => Ok(Setting::U64(n, v)),
        _ => Err(Error::InvalidOption(name.to_string())),
    }
}

pub fn protos_setting(protos: Vec<Vec<u8>>) -> Result<Setting> {
    if protos.is_empty() || protos.iter().any(|p| p.is_empty() || p.len() > 255) {
        return Err(Error::InvalidOption("application_protos".into()));
    }
    Ok(Setting::ApplicationProtos(protos))
}

pub fn dgram_setting(enabled: bool, recv: u64, send: u64) -> Result<Setting> {
    let bad = || Error::InvalidOption("enable_dgram".into());
    let recv = usize::try_from(recv).map_err(|_| bad())?;
    let send = usize::try_from(send).map_err(|_| bad())?;
    if recv == 0 || send == 0 || recv > 1_000_000 || send > 1_000_000 {
        return Err(bad());
    }
    Ok(Setting::Dgram(enabled, recv, send))
}

pub fn ticket_key_setting(key: Vec<u8>) -> Result<Setting> {
    // BoringSSL's SSL_CTX_set_tlsext_ticket_keys takes exactly 48 bytes.
    if key.len() != 48 {
        return Err(Error::InvalidOption("ticket_key".into()));
    }
    Ok(Setting::TicketKey(key))
}

/// Applies validated settings to a new `quiche::Config`.
pub fn build(mut settings: Vec<Setting>) -> Result<quiche::Config> {
    let mut cfg = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
    settings.sort_by_key(Setting::order);
    for s in &settings {
        apply(&mut cfg, s)?;
    }
    Ok(cfg)
}

fn apply(cfg: &mut quiche::Config, s: &Setting) -> Result<()> {
    match s {
        Setting::U64(name, v) => {
            if let Some((.., set)) = U64_OPTIONS.iter().find(|(n, ..)| n == name) {
                set(cfg, *v);
            }
        }
        Setting::Bool(name, v) => {
            if let Some((_, set)) = BOOL_OPTIONS.iter().find(|(n, _)| n == name) {
                set(cfg, *v);
            }
        }
        Setting::ApplicationProtos(protos) => {
            let refs: Vec<&[u8]> = protos.iter().map(Vec::as_slice).collect();
            cfg.set_application_protos(&refs)
                .map_err(|_| Error::InvalidOption("application_protos".into()))?;
        }
        Setting::CcAlgorithm(cc) => cfg.set_cc_algorithm(match cc {
            Cc::Reno => quiche::CongestionControlAlgorithm::Reno,
            Cc::Cubic => quiche::CongestionControlAlgorithm::CUBIC,
            Cc::Bbr2 => quiche::CongestionControlAlgorithm::Bbr2Gcongestion,
        }),
        Setting::Dgram(enabled, recv, send) => cfg.enable_dgram(*enabled, *recv, *send),
        Setting::File(name, path) => load_file(cfg, name, path)?,
        Setting::TicketKey(key) => cfg
            .set_ticket_key(key)
            .map_err(|_| Error::InvalidOption("ticket_key".into()))?,
        // The file is opened per connection; the config only has to keep
        // the TLS secrets around.
        Setting::Keylog(_) => cfg.log_keys(),
        // Opened per connection.
        Setting::Qlog(..) => {}
    }
    Ok(())
}

fn load_file(cfg: &mut quiche::Config, name: &'static str, path: &str) -> Result<()> {
    let fail = || Error::TlsFile {
        what: name,
        path: path.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(|_| fail())?;
    let res = match name {
        "load_verify_locations_from_directory" if meta.is_dir() => {
            cfg.load_verify_locations_from_directory(path)
        }
        "load_verify_locations_from_directory" => return Err(fail()),
        _ if !meta.is_file() => return Err(fail()),
        "load_cert_chain_from_pem_file" => cfg.load_cert_chain_from_pem_file(path),
        "load_priv_key_from_pem_file" => cfg.load_priv_key_from_pem_file(path),
        _ => cfg.load_verify_locations_from_file(path),
    };
    res.map_err(|_| fail())
}

// ---------------------------------------------------------------------------
// Term decoding

fn decode_setting(key: Term, value: Term) -> Result<Setting> {
    let name = key
        .atom_to_string()
        .map_err(|_| Error::BadArg("option name"))?;
    let invalid = || Error::InvalidOption(name.clone());

    if U64_OPTIONS.iter().any(|(n, ..)| *n == name) {
        let v: u64 = value.decode().map_err(|_| invalid())?;
        return u64_setting(&name, v);
    }
    if let Some((n, _)) = BOOL_OPTIONS.iter().find(|(n, _)| *n == name) {
        let v: bool = value.decode().map_err(|_| invalid())?;
        return Ok(Setting::Bool(n, v));
    }
    if let Some(n) = FILE_OPTIONS.iter().find(|n| **n == name) {
        return Ok(Setting::File(n, path_value(value).ok_or_else(invalid)?));
    }
    match name.as_str() {
        "application_protos" => {
            let list: Vec<rustler::Binary> = value.decode().map_err(|_| invalid())?;
            protos_setting(list.iter().map(|b| b.as_slice().to_vec()).collect())
        }
        "cc_algorithm" => {
            let atom: Atom = value.decode().map_err(|_| invalid())?;
            match atom.to_term(value.get_env()).atom_to_string().as_deref() {
                Ok("reno") => Ok(Setting::CcAlgorithm(Cc::Reno)),
                Ok("cubic") => Ok(Setting::CcAlgorithm(Cc::Cubic)),
                Ok("bbr") | Ok("bbr2") => Ok(Setting::CcAlgorithm(Cc::Bbr2)),
                _ => Err(invalid()),
            }
        }
        "keylog_file" => Ok(Setting::Keylog(path_value(value).ok_or_else(invalid)?)),
        "qlog_dir" => {
            let (dir, level): (Term, Atom) = value.decode().map_err(|_| invalid())?;
            let dir = path_value(dir).ok_or_else(invalid)?;
            let level = match level.to_term(value.get_env()).atom_to_string().as_deref() {
                Ok("core") => QlogLevel::Core,
                Ok("base") => QlogLevel::Base,
                Ok("extra") => QlogLevel::Extra,
                _ => return Err(invalid()),
            };
            Ok(Setting::Qlog(dir, level))
        }
        "enable_dgram" => {
            let (enabled, recv, send): (bool, u64, u64) = value.decode().map_err(|_| invalid())?;
            dgram_setting(enabled, recv, send)
        }
        "ticket_key" => {
            let key: rustler::Binary = value.decode().map_err(|_| invalid())?;
            ticket_key_setting(key.as_slice().to_vec())
        }
        _ => Err(invalid()),
    }
}

/// A non-empty path without NUL bytes.
fn path_value(value: Term) -> Option<String> {
    let path: String = value.decode().ok()?;
    (!path.is_empty() && !path.contains('\0')).then_some(path)
}

fn decode_settings(opts: Term) -> Result<Vec<Setting>> {
    let list: Vec<(Term, Term)> = opts.decode().map_err(|_| Error::BadArg("options"))?;
    list.into_iter()
        .map(|(k, v)| decode_setting(k, v))
        .collect()
}

fn encode_setting<'a>(env: Env<'a>, s: &Setting) -> Term<'a> {
    let key = Atom::from_str(env, s.name()).unwrap_or_else(|_| crate::atoms::error());
    let value = match s {
        Setting::U64(_, v) => v.encode(env),
        Setting::Bool(_, v) => v.encode(env),
        Setting::ApplicationProtos(protos) => {
            let bins: Vec<Term> = protos.iter().map(|p| bytes_term(env, p)).collect();
            bins.encode(env)
        }
        Setting::CcAlgorithm(cc) => match cc {
            Cc::Reno => crate::atoms::reno().encode(env),
            Cc::Cubic => crate::atoms::cubic().encode(env),
            Cc::Bbr2 => crate::atoms::bbr2().encode(env),
        },
        Setting::Dgram(e, r, s) => (*e, *r, *s).encode(env),
        Setting::File(_, path) | Setting::Keylog(path) => path.encode(env),
        Setting::TicketKey(key) => bytes_term(env, key),
        Setting::Qlog(dir, level) => {
            let level = match level {
                QlogLevel::Core => crate::atoms::core(),
                QlogLevel::Base => crate::atoms::base(),
                QlogLevel::Extra => crate::atoms::extra(),
            };
            (dir.as_str(), level).encode(env)
        }
    };
    (key, value).encode(env)
}

// ---------------------------------------------------------------------------
// Resource and NIFs

pub struct ConfigResource {
    pub config: Mutex<quiche::Config>,
    pub settings: Vec<Setting>,
}

impl ConfigResource {
    /// The key log file, if TLS secrets are to be logged.
    pub fn keylog(&self) -> Option<&str> {
        self.settings.iter().find_map(|s| match s {
            Setting::Keylog(path) => Some(path.as_str()),
            _ => None,
        })
    }

    /// The qlog directory and level, if connections write qlogs.
    pub fn qlog(&self) -> Option<(&str, QlogLevel)> {
        self.settings.iter().find_map(|s| match s {
            Setting::Qlog(dir, level) => Some((dir.as_str(), *level)),
            _ => None,
        })
    }
}

#[rustler::resource_impl]
impl rustler::Resource for ConfigResource {}

/// Builds a `quiche::Config` from `[{name, value}]`. Runs on a dirty I/O
/// scheduler because it may read certificate and key files.
#[rustler::nif(schedule = "DirtyIo")]
fn config_build(opts: Term) -> Result<ResourceArc<ConfigResource>> {
    let settings = decode_settings(opts)?;
    let config = build(settings.clone())?;
    Ok(ResourceArc::new(ConfigResource {
        config: Mutex::new(config),
        settings,
    }))
}

/// Returns the settings a built config holds, decoded back from Rust values.
#[rustler::nif]
fn config_describe(env: Env, config: ResourceArc<ConfigResource>) -> Term {
    let items: Vec<Term> = config
        .settings
        .iter()
        .map(|s| encode_setting(env, s))
        .collect();
    items.encode(env)
}

#[rustler::nif]
fn quiche_version() -> &'static str {
    QUICHE_VERSION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_version_matches_cargo_toml() {
        let toml = include_str!("../Cargo.toml");
        assert!(toml.contains(&format!("quiche = {{ version = \"={QUICHE_VERSION}\"")));
    }

    #[test]
    fn every_option_applies_to_a_quiche_config() {
        let mut settings: Vec<Setting> = U64_OPTIONS
            .iter()
            .map(|(n, min, ..)| u64_setting(n, *min).unwrap())
            .collect();
        settings.extend(BOOL_OPTIONS.iter().map(|(n, _)| Setting::Bool(n, true)));
        settings.push(protos_setting(vec![b"h3".to_vec(), b"echo".to_vec()]).unwrap());
        settings.push(Setting::CcAlgorithm(Cc::Bbr2));
        settings.push(dgram_setting(true, 10, 10).unwrap());
        settings.push(ticket_key_setting(vec![7; 48]).unwrap());
        assert!(build(settings).is_ok());
    }

    #[test]
    fn integer_ranges_are_enforced() {
        assert!(u64_setting("ack_delay_exponent", 20).is_ok());
        assert!(u64_setting("ack_delay_exponent", 21).is_err());
        assert!(u64_setting("max_ack_delay", 1 << 14).is_err());
        assert!(u64_setting("active_connection_id_limit", 1).is_err());
        assert!(u64_setting("max_recv_udp_payload_size", 1199).is_err());
        assert!(u64_setting("max_idle_timeout", MAX_VARINT + 1).is_err());
        assert!(u64_setting("initial_max_streams_bidi", (1 << 60) + 1).is_err());
        assert!(u64_setting("no_such_option", 1).is_err());
    }

    #[test]
    fn alpn_is_validated() {
        assert!(protos_setting(vec![]).is_err());
        assert!(protos_setting(vec![vec![]]).is_err());
        assert!(protos_setting(vec![vec![b'a'; 256]]).is_err());
        assert!(protos_setting(vec![vec![b'a'; 255]]).is_ok());
    }

    #[test]
    fn ticket_key_and_dgram_are_validated() {
        assert!(ticket_key_setting(vec![0; 47]).is_err());
        assert!(dgram_setting(true, 0, 10).is_err());
        assert!(dgram_setting(true, 10, u64::MAX).is_err());
    }

    #[test]
    fn missing_tls_files_are_reported_by_option() {
        let s = Setting::File(
            "load_cert_chain_from_pem_file",
            "/nonexistent/cert.pem".into(),
        );
        match build(vec![s]) {
            Err(Error::TlsFile { what, path }) => {
                assert_eq!(what, "load_cert_chain_from_pem_file");
                assert_eq!(path, "/nonexistent/cert.pem");
            }
            Err(other) => panic!("expected TlsFile, got {other:?}"),
            Ok(_) => panic!("a missing file was accepted"),
        }
    }

    #[test]
    fn garbage_pem_is_reported() {
        let dir = std::env::temp_dir().join(format!("quichex-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("garbage.pem");
        std::fs::write(&path, b"not a certificate").unwrap();
        let s = Setting::File("load_cert_chain_from_pem_file", path.display().to_string());
        assert!(matches!(build(vec![s]), Err(Error::TlsFile { .. })));
        let s = Setting::File(
            "load_verify_locations_from_directory",
            path.display().to_string(),
        );
        assert!(matches!(build(vec![s]), Err(Error::TlsFile { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_apply_after_other_options_cert_before_key() {
        let mut s = [
            Setting::File("load_priv_key_from_pem_file", "k".into()),
            Setting::Bool("grease", true),
            Setting::File("load_cert_chain_from_pem_file", "c".into()),
        ];
        s.sort_by_key(Setting::order);
        assert_eq!(s[0].name(), "grease");
        assert_eq!(s[1].name(), "load_cert_chain_from_pem_file");
        assert_eq!(s[2].name(), "load_priv_key_from_pem_file");
    }
}
