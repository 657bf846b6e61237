//! AFL++ entry point of the `recv` target; see `quichex_fuzz::recv`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        quichex_fuzz::recv(data);
    });
}
