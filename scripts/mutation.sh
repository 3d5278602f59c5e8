#!/usr/bin/env bash
# Mutation testing of the core with mutmut (https://mutmut.readthedocs.io): it plants one-line bugs
# (an operator, a constant, a dropped argument), runs the tests that reach the mutated function, and
# counts the bugs no test notices. Slow (minutes per module, hours for everything): not part of CI.
#
#   scripts/mutation.sh                                  # every file of [tool.mutmut] only_mutate
#   scripts/mutation.sh src/vitlens/train/schedule.py src/vitlens/data/subset.py   # just these
#
# It works on a COPY of the repository (mutmut rewrites the files it mutates; people and CI keep
# using the real tree) and writes, in the real tree:
#   benchmarks/mutation.json            killed, survived, timeout, score, modules, date, commit
#   benchmarks/mutation-survivors.txt   the diff of every surviving mutant
# Survivors reviewed as equivalent (listed in benchmarks/equivalent/*.txt with the reason) are
# reported apart: "score" counts them against the suite, "score_without_equivalent" does not.
# MUTATION_SUMMARY_ONLY=1 with MUTATION_WORKDIR=DIR only rewrites the two files from the run in DIR.
# Environment: PYTHON (default .venv/bin/python), MUTATION_WORKDIR (default a fresh temp dir),
# MUTATION_JOBS (parallel mutants, default 1: the machine may be shared), MUTATION_TESTS (a
# space-separated test selection in place of pytest_add_cli_args_test_selection), MUTATION_MUTANTS
# (space-separated globs of mutant names, e.g. 'vitlens.train.harness.x_param_groups__mutmut_*':
# only those are run; the others are reported as "not checked"), MUTATION_SAMPLE=N with
# MUTATION_SEED=S (default 0): run a seeded uniform random sample of N of all the mutants instead
# (a full run is ~hours on 2 cores; the score of a sample comes with its 95% interval).
# While writing tests, scripts/mutation_check.sh reruns chosen mutants against the current tests
# in minutes, reusing the workdir of an earlier run (MUTATION_BASE=that MUTATION_WORKDIR).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
JOBS=${MUTATION_JOBS:-1}
WORK=${MUTATION_WORKDIR:-$(mktemp -d /tmp/vitlens-mutation.XXXXXX)}
OUT_JSON=$REPO/benchmarks/mutation.json
OUT_SURVIVORS=$REPO/benchmarks/mutation-survivors.txt

"$PY" -c "import mutmut" 2>/dev/null || { echo "mutmut is not installed: $PY -m pip install mutmut" >&2; exit 1; }

if [ -n "${MUTATION_SUMMARY_ONLY:-}" ]; then  # re-summarise an earlier (or interrupted) run in $WORK
    [ -d "$WORK/mutants" ] || { echo "no mutmut run in $WORK" >&2; exit 1; }
    cd "$WORK"
    elapsed=0
else
# 1. a copy of the tree as it is now (uncommitted edits included), without venv, git and run outputs
mkdir -p "$WORK"
tar -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude=./mutants \
    --exclude='__pycache__' --exclude=.pytest_cache -cf - . | tar -C "$WORK" -xf -
# tests/conftest.py finds the real data beside the repository root; mutmut runs tests in WORK/mutants
[ -e "$REPO/../shared" ] && ln -sfn "$(cd "$REPO/.." && pwd)/shared" "$WORK/shared"

# 2. files on the command line / MUTATION_TESTS replace the lists (in the copy's pyproject only)
"$PY" - "$WORK/pyproject.toml" "${MUTATION_TESTS:-}" "$@" <<'EOF'
import json, re, sys
path, tests, files = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
text = open(path).read()
for key, new in (("only_mutate", files), ("pytest_add_cli_args_test_selection", tests)):
    if new:
        text, n = re.subn(key + r" = \[[^\]]*\]", lambda _: f"{key} = {json.dumps(new)}", text, count=1)
        assert n == 1, f"no {key} list in [tool.mutmut]"
open(path, "w").write(text)
EOF

# 3. run mutmut in the copy; the editable install's src/ stays on sys.path but mutmut puts
#    mutants/src in front of it, so the tests import the mutated code.
cd "$WORK"
export PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
start=$(date +%s)
set -f  # MUTATION_MUTANTS holds globs for mutmut, not for the shell
if [ -n "${MUTATION_SAMPLE:-}" ]; then
    # generate every mutant and the test statistics without running any mutant (a filter that
    # matches nothing makes mutmut stop after those two steps), then draw the sample by name
    "$PY" -m mutmut run --max-children "$JOBS" "vitlens_no_such_mutant" >/dev/null 2>&1 || true
    "$PY" - "$MUTATION_SAMPLE" "${MUTATION_SEED:-0}" > mutation-sample.txt <<'EOF2'
import json, pathlib, random, sys
n, seed = int(sys.argv[1]), int(sys.argv[2])
names = sorted(k for meta in pathlib.Path("mutants").rglob("*.meta")
               for k in json.load(open(meta))["exit_code_by_key"])
assert names, "mutmut generated no mutants"
print("\n".join(random.Random(seed).sample(names, min(n, len(names)))))
print(len(names), file=open("mutation-population.txt", "w"))
EOF2
    MUTATION_MUTANTS=$(tr '\n' ' ' < mutation-sample.txt)
fi
# shellcheck disable=SC2086
"$PY" -m mutmut run --max-children "$JOBS" ${MUTATION_MUTANTS:-} || echo "mutmut run exited with $? (results so far are kept)" >&2
elapsed=$(( $(date +%s) - start ))
set +f
fi

# 4. summarise: counts per status and per module, the score, the survivors' diffs
COMMIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$REPO" status --porcelain -- src 2>/dev/null | head -1)
REPO="$REPO" "$PY" - "$OUT_JSON" "$OUT_SURVIVORS" "$COMMIT" "${DIRTY:+dirty}" "$elapsed" <<'EOF'
import collections, datetime, glob, json, os, subprocess, sys
out_json, out_surv, commit, dirty, elapsed = sys.argv[1:6]
res = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"],
                     capture_output=True, text=True, check=True).stdout
status = {}
for line in res.splitlines():
    if ":" in line:
        name, st = line.rsplit(":", 1)
        status[name.strip()] = st.strip()
counts = collections.Counter(status.values())
per_module = collections.defaultdict(collections.Counter)
for name, st in status.items():
    per_module[name.split(".x_")[0].split(".xǁ")[0]][st] += 1
killed, survived, timeout = counts["killed"], counts["survived"], counts["timeout"]
# a mutant no selected test even reaches ("no tests") is a bug nothing would notice: it counts
# against the score like a survivor
tested = killed + survived + timeout + counts["suspicious"] + counts["no tests"]
score = round(100 * (killed + timeout) / tested, 1) if tested else None
interval = None
if tested:  # Wilson 95% interval: the score of a random sample estimates the score of all mutants
    p, z = (killed + timeout) / tested, 1.96
    centre, half = (p + z * z / (2 * tested)), z * (p * (1 - p) / tested + z * z / (4 * tested ** 2)) ** 0.5
    interval = [round(100 * (centre - half) / (1 + z * z / tested), 1),
                round(100 * (centre + half) / (1 + z * z / tested), 1)]
# survivors reviewed and listed as equivalent (the mutant cannot change behaviour) in
# benchmarks/equivalent/*.txt, one "<mutant name>  # <reason>" per line: the classic mutation score
# leaves them out of the denominator; both scores are reported
equivalent = {}
for listing in sorted(glob.glob(os.path.join(os.environ["REPO"], "benchmarks", "equivalent", "*.txt"))):
    for line in open(listing):
        name, _, reason = line.partition("#")
        if name.strip():
            equivalent[name.strip()] = reason.strip()
equivalent_survivors = sorted(n for n, st in status.items() if st == "survived" and n in equivalent)
score_equivalent = None
if tested - len(equivalent_survivors) > 0:
    score_equivalent = round(100 * (killed + timeout) / (tested - len(equivalent_survivors)), 1)
sample = None
if os.path.exists("mutation-sample.txt") and os.environ.get("MUTATION_SAMPLE"):
    sample = {"size": int(os.environ["MUTATION_SAMPLE"]), "seed": int(os.environ.get("MUTATION_SEED", "0")),
              "population": int(open("mutation-population.txt").read())}
summary = {
    "tool": "mutmut", "killed": killed, "survived": survived, "timeout": timeout,
    "other": {k: v for k, v in counts.items() if k not in ("killed", "survived", "timeout")},
    "score": score,
    "score_formula": "100 * (killed + timeout) / (killed + survived + timeout + suspicious + no tests)",
    "score_95_interval": interval,
    "equivalent_survivors": len(equivalent_survivors),
    "score_without_equivalent": score_equivalent,
    "sample": sample,
    "modules": {m: dict(c) for m, c in sorted(per_module.items())},
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": commit + ("+uncommitted" if dirty else ""),
    "wall_seconds": int(elapsed),
}
json.dump(summary, open(out_json, "w"), indent=2)
with open(out_surv, "w") as f:
    f.write(f"# mutmut survivors, {summary['date']}, commit {summary['commit']}\n")
    for name, st in sorted(status.items()):
        if st in ("survived", "no tests"):
            diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name],
                                  capture_output=True, text=True).stdout
            why = f", equivalent: {equivalent[name]}" if st == "survived" and name in equivalent else ""
            f.write(f"\n## {name} ({st}{why})\n{diff}\n")
print(json.dumps({k: summary[k] for k in ("killed", "survived", "timeout", "score", "score_95_interval",
                                          "equivalent_survivors", "score_without_equivalent", "commit")}))
EOF
echo "mutation run in $WORK: $OUT_JSON, $OUT_SURVIVORS"
