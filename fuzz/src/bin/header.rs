//! AFL++ entry point of the `header` target; see `quichex_fuzz::header`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        quichex_fuzz::header(data);
    });
}
