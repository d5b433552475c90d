#!/usr/bin/env bash
# Runs the property tests of every decoder (the `fuzz` test modules next to each one: handles,
# the built-in transport's wire, the control service, the bootstrap of `tcpxshim serve`, the
# test plan, /proc/net/tcp) long, in an optimised build, one target at a time: CASES cases per
# property (default 1000000; `cargo test` runs 4096). Prints each target's cases, seconds and
# result, and exits non-zero if one failed. A failure's input is saved under
# proptest-regressions/ and replayed by every later run, `cargo test` included.
#
#   bash scripts/fuzz.sh [CASES]
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-1000000}
export PROPTEST_CASES=$cases
# The `fuzz` profile: release without link-time optimisation (faster to build).
cargo test --profile fuzz --no-run -q --lib --bin tcpxshim 2>/dev/null || cargo test --profile fuzz --no-run --lib --bin tcpxshim

targets() { # KIND: the property tests of the lib or the command (plain regression tests excluded)
  cargo test --profile fuzz -q "$@" -- --list 2>/dev/null | sed -n 's/^\(.*::fuzz::[a-z0-9_]*\): test$/\1/p' | grep -v '::regression_'
}

printf '%-62s %9s %7s  %s\n' target cases seconds result
fails=0
n=0
all_start=$(date +%s%N)
for kind in --lib "--bin tcpxshim"; do
  # shellcheck disable=SC2086
  for t in $(targets $kind); do
    start=$(date +%s%N)
    # shellcheck disable=SC2086
    if out=$(cargo test --profile fuzz -q $kind -- --exact "$t" 2>&1); then
      result=ok
    else
      result=FAILED
      fails=$((fails + 1))
    fi
    ms=$((($(date +%s%N) - start) / 1000000))
    n=$((n + 1))
    printf '%-62s %9s %5d.%d  %s\n' "$t" "$cases" $((ms / 1000)) $((ms % 1000 / 100)) "$result"
    if [ "$result" = FAILED ]; then
      echo "$out" | grep -E 'minimal failing input|Test failed|panicked' | head -5 | sed 's/^/    /'
    fi
  done
done
total=$((($(date +%s%N) - all_start) / 1000000000))
printf 'fuzz: %d targets, %s cases each, %d s in all, %d failed\n' "$n" "$cases" "$total" "$fails"
[ "$fails" -eq 0 ]
