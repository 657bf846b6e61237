//! AFL++ entry point of the `varint` target; see `quichex_fuzz::varint`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        quichex_fuzz::varint(data);
    });
}
