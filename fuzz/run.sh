#!/usr/bin/env bash
# Fuzzes each target with AFL++ (through the `afl` crate, stable Rust) for
# FUZZ_SECONDS seconds, starting from the committed corpus in corpus/<target>.
# Fails if any target found a crash. Findings stay in fuzz/out/<target>.
#
#   fuzz/run.sh [target...]      (default: every target; `make fuzz`)
#   FUZZ_SECONDS=600 fuzz/run.sh recv
set -euo pipefail

cd "$(dirname "$0")"
all_targets="header varint retry recv session"
targets="${*:-$all_targets}"
seconds="${FUZZ_SECONDS:-60}"

command -v cargo-afl >/dev/null || {
  echo "cargo-afl not found: cargo install cargo-afl --locked (builds AFL++; needs a C compiler and make)"
  exit 1
}

echo "==> cargo afl build --release (fuzz/)"
cargo afl build --release --locked --features afl --quiet
# The committed corpus must pass before fuzzing from it (same build flags,
# so nothing is rebuilt).
echo "==> cargo afl test --release (replays corpus/)"
cargo afl test --release --locked --quiet

# Shared machine, no UI, crash reporting as configured by the system.
export AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_QUIET=1
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1

status=0
for t in $targets; do
  out="out/$t"
  rm -rf "$out"
  mkdir -p out
  echo "==> afl-fuzz $t for ${seconds}s"
  cargo afl fuzz -i "corpus/$t" -o "$out" -V "$seconds" -- "target/release/$t" >"out/$t.log" 2>&1 || {
    echo "afl-fuzz failed to run $t:"; tail -n 20 "out/$t.log"; status=1; continue; }
  stats="$out/default/fuzzer_stats"
  get() { grep "^$1 " "$stats" | cut -d: -f2 | tr -d ' '; }
  crashes=$(find "$out/default/crashes" -name 'id:*' | wc -l)
  hangs=$(find "$out/default/hangs" -name 'id:*' | wc -l)
  echo "    $(get execs_done) execs ($(get execs_per_sec)/s), corpus $(get corpus_count), edges $(get edges_found)/$(get total_edges) ($(get bitmap_cvg)), crashes $crashes, hangs $hangs"
  if [ "$crashes" -gt 0 ]; then
    echo "    CRASHES in $out/default/crashes (replay: fuzz/target/release/$t < FILE)"
    status=1
  fi
done
exit $status
