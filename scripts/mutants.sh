#!/usr/bin/env bash
# Hand-made mutants of the shim's TCPX-facing code: each breaks one TCPX quirk or interface fact
# (docs/fidelity.md) on purpose, and the tests must fail. Rebuilds once per mutant, so it is not
# part of CI. Arguments: [--list] [--timeout S] [MUTANT_ID ...]. Exits non-zero if a must-kill
# mutant survives (1) or a pattern no longer matches the source (2).
set -euo pipefail
cd "$(dirname "$0")/.."
# Files a mutant edits, saved so that even a killed helper leaves the tree as it was.
files=(src/stack/shim.rs src/stack/handle.rs src/stack/objects.rs src/plugin/mod.rs src/export/mod.rs build.rs)
backup=$(mktemp -d)
for f in "${files[@]}"; do cp "$f" "$backup/$(echo "$f" | tr / _)"; done
restore() {
  for f in "${files[@]}"; do
    b="$backup/$(echo "$f" | tr / _)"
    cmp -s "$b" "$f" || cp "$b" "$f"
  done
  rm -rf "$backup"
}
trap restore EXIT
python3 scripts/mutants.py "$@"
