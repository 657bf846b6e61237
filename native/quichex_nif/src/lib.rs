//! quichex_nif: a sans-IO NIF over cloudflare quiche.
//!
//! quiche never touches a socket here: Elixir feeds datagrams in and takes
//! datagrams out. Each file holds one resource or concern.

mod atoms;
mod config;
mod connection;
mod driver;
mod error;
mod logs;
mod packet;
mod paths;
mod stream;
mod util;
pub mod wire;

rustler::init!("Elixir.Quichex.Native");
