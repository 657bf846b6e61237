#!/usr/bin/env bash
# Runs every test executable of the NIF crate's `cargo test --release`
# (the unit tests next to the code and tests/quiche_patches.rs, the
# regression tests of the vendored quiche patches) under valgrind's memcheck.
# Fails on any memory error and on any leak (definite, indirect or possible;
# the one suppression, in quichex.supp, is a documented false positive of
# Rust std).
#
#   native/valgrind/run.sh            (from the repository root; `make valgrind`)
#
# The executables are the ones `cargo test --release --locked` builds (the
# code that ships, built once for `make test` too). Tests run one at a time
# (--test-threads=1), so a report points at one test.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
crate="$here/../quichex_nif"
supp="$here/quichex.supp"
logs="$(realpath -m "${VALGRIND_LOG_DIR:-$here/../../_build/valgrind}")"
mkdir -p "$logs"

command -v valgrind >/dev/null || { echo "valgrind not found (Debian: apt-get install valgrind)"; exit 1; }

cd "$crate"
echo "==> cargo test --release --locked --no-run"
exes=$(cargo test --release --locked --no-run --message-format=json \
  | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | sort -u)
[ -n "$exes" ] || { echo "no test executables found"; exit 1; }

status=0
for exe in $exes; do
  name="$(basename "$exe")"
  log="$logs/$name.log"
  echo "==> valgrind $name (log: $log)"
  start=$(date +%s)
  if valgrind --leak-check=full --show-leak-kinds=definite,indirect,possible \
      --errors-for-leak-kinds=definite,indirect,possible --error-exitcode=1 \
      --suppressions="$supp" --log-file="$log" \
      "$exe" --test-threads=1 2>&1 | tail -n 3; then
    result=ok
  else
    result=FAILED
    status=1
  fi
  secs=$(( $(date +%s) - start ))
  errors=$(grep -o 'ERROR SUMMARY: [0-9]* errors' "$log" | tail -1)
  echo "    $result in ${secs}s: $errors"
  grep -E "definitely lost:|indirectly lost:|possibly lost:|still reachable:|suppressed:|no leaks are possible" "$log" | sed 's/^==[0-9]*==/   /'
done
exit $status
