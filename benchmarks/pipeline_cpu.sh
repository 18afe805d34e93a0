#!/usr/bin/env bash
# The whole embedded-default pipeline from a fresh clone, timed: what a new user sees.
#
#   bash benchmarks/pipeline_cpu.sh            # clone this checkout's HEAD into a temp folder, `make run`
#   CORES=2 KEEP=1 bash benchmarks/pipeline_cpu.sh
#
# The venv is reused from this checkout when present (VENV=path to override; VENV= to build a fresh one:
# then the time includes installing torch and friends). Prints the wall time of `make run` and each
# rule's time from Snakemake's benchmark files.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cores="${CORES:-2}"
venv="${VENV-$here/.venv}"
work="$(mktemp -d)"
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
echo "work folder: $work"

git clone -q "$here" "$work/repo"
cd "$work/repo"
if [ -n "$venv" ] && [ -x "$venv/bin/python" ]; then
    ln -s "$venv" .venv
    touch .venv/.setup-done
    # The reused venv's editable install points at the original checkout: run the clone's code instead.
    export PYTHONPATH="$work/repo${PYTHONPATH:+:$PYTHONPATH}"
fi
start=$(date +%s)
make run CORES="$cores" > "$work/run.log" 2>&1 || { tail -50 "$work/run.log"; exit 1; }
end=$(date +%s)
echo "make run (cores=$cores): $((end - start)) s wall"
echo "per rule (s, from logs/*/benchmarks):"
for f in $(find logs -name '*.tsv' | sort); do
    printf '  %-45s %s\n' "${f#logs/}" "$(awk 'NR==2 {print $1}' "$f")"
done
test -s results/synthetic/report.html && echo "report: results/synthetic/report.html ($(du -h results/synthetic/report.html | cut -f1))"
