//! AFL++ entry point of the `retry` target; see `quichex_fuzz::retry`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        quichex_fuzz::retry(data);
    });
}
