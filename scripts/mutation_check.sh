#!/usr/bin/env bash
# Check chosen mutants against the tests as they are NOW, fast, by reusing a prepared mutmut
# workdir (mutants generated and test statistics collected once by scripts/mutation.sh or by
# `mutmut run` with a filter that matches nothing). For the loop "read a survivor, write a test,
# see it killed" while working on tests; the score of record is scripts/mutation.sh's.
#
#   MUTATION_BASE=/tmp/mutbase MUTATION_WORKDIR=/tmp/mut_me scripts/mutation_check.sh \
#       'vitlens.data.device_loader.x_random_erasing__mutmut_*'          # every mutant of a function
#   MUTATION_SAMPLE=40 MUTATION_SEED=1 ... scripts/mutation_check.sh vitlens.data.device_loader
#                                         # a seeded sample of 40 of the mutants under that prefix
#
# The first call copies MUTATION_BASE to MUTATION_WORKDIR; every call copies src/ and tests/ of
# this tree into it (mutmut regenerates the mutants of changed source files and collects the
# statistics of new tests), runs the chosen mutants and prints the diff of each survivor.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
BASE=${MUTATION_BASE:?set MUTATION_BASE to a prepared mutmut workdir (it holds mutants/)}
WORK=${MUTATION_WORKDIR:?set MUTATION_WORKDIR to your own scratch directory}
[ $# -ge 1 ] || { echo "usage: $0 MUTANT_GLOB_OR_PREFIX..." >&2; exit 2; }
[ -f "$BASE/mutants/mutmut-stats.json" ] || { echo "$BASE has no mutants/mutmut-stats.json (not prepared, or still being prepared): wait, or prepare it (see the header)" >&2; exit 1; }

[ -d "$WORK/mutants" ] || cp -a "$BASE" "$WORK"
# tar keeps modification times, so only files edited since the base look changed to mutmut
tar -C "$REPO" --exclude='__pycache__' -cf - src tests pyproject.toml | tar -C "$WORK" -xf -
cd "$WORK"
export PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

set -f
if [ -n "${MUTATION_SAMPLE:-}" ]; then  # the arguments are name prefixes: draw a sample under them
    names=$("$PY" - "$MUTATION_SAMPLE" "${MUTATION_SEED:-0}" "$@" <<'EOF'
import json, pathlib, random, sys
n, seed, prefixes = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
names = sorted(k for meta in pathlib.Path("mutants").rglob("*.meta")
               for k in json.load(open(meta))["exit_code_by_key"] if k.startswith(tuple(prefixes)))
assert names, f"no mutant name starts with {prefixes}"
print(" ".join(random.Random(seed).sample(names, min(n, len(names)))))
EOF
)
else
    names="$*"
fi
# shellcheck disable=SC2086
"$PY" -m mutmut run --max-children "${MUTATION_JOBS:-1}" $names > mutmut-run.log 2>&1 || true
"$PY" - $names <<'EOF'
import fnmatch, json, pathlib, subprocess, sys
from mutmut.stats import status_by_exit_code
want = sys.argv[1:]
codes = {k: v for meta in pathlib.Path("mutants").rglob("*.meta")
         for k, v in json.load(open(meta))["exit_code_by_key"].items()
         if any(fnmatch.fnmatchcase(k, w) for w in want)}
counts = {}
for name, code in sorted(codes.items()):
    st = status_by_exit_code[code]
    counts[st] = counts.get(st, 0) + 1
    if st not in ("killed", "timeout"):
        print(f"## {name} ({st})")
        print(subprocess.run([sys.executable, "-m", "mutmut", "show", name], capture_output=True, text=True).stdout)
print("counts:", counts)
EOF
