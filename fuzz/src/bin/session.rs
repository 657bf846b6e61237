//! AFL++ entry point of the `session` target; see `quichex_fuzz::session`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        quichex_fuzz::session(data);
    });
}
