//! Replays the committed corpus (and anything AFL++ found and was copied
//! there) through every target, without AFL: `cargo test` here.

use std::fs;
use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut n = 0;
    for entry in fs::read_dir(&dir).expect("corpus dir") {
        let path = entry.expect("entry").path();
        let data = fs::read(&path).expect("seed");
        run(&data);
        n += 1;
    }
    assert!(n > 0, "no seeds in {}", dir.display());
}

#[test]
fn header() {
    replay("header", quichex_fuzz::header);
}

#[test]
fn varint() {
    replay("varint", quichex_fuzz::varint);
}

#[test]
fn retry() {
    replay("retry", quichex_fuzz::retry);
}

#[test]
fn recv() {
    replay("recv", quichex_fuzz::recv);
}

#[test]
fn session() {
    replay("session", quichex_fuzz::session);
}
