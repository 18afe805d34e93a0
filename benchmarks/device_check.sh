#!/usr/bin/env bash
# The first lent GPU's check: the tiny workflow end to end on CUDA, then every benchmark's full preset,
# in at most 8 minutes on one GPU; one JSON of figures, the device name and pass/fail per target.
#
#   bash benchmarks/device_check.sh                        # CUDA; writes results/bench/device_check.json
#   bash benchmarks/device_check.sh --out FILE.json
#   bash benchmarks/device_check.sh --dry-run              # CPU, tiny sizes: checks the plumbing and the JSON
#
# Each step runs under its own `timeout`, so one failure or hang does not lose the rest; its log lands
# next to the JSON (device_check_logs/). Without a CUDA device it refuses (exit 2) unless --dry-run.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$here/results/bench/device_check.json"
dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --out) out="$2"; shift ;;
        *) echo "usage: $0 [--dry-run] [--out FILE.json]" >&2; exit 2 ;;
    esac
    shift
done
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
if [ "$dry" = 0 ] && ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "device_check: no CUDA device is visible to torch; this check needs one GPU (--dry-run runs the" \
         "plumbing on CPU with tiny sizes)" >&2
    exit 2
fi
out="$(realpath -m "$out")"
logs="$(dirname "$out")/device_check_logs"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$logs"
rm -f "$logs"/*.jsonl "$logs"/*.log "$logs"/*.status
cd "$here"

if [ "$dry" = 1 ]; then
    device=cpu
    # seconds per step; the CPU smoke sizes
    t_wf=0; t_pc=120; t_intr=120; t_rank=120; t_ex=240
    pc_args=(--small --threads 1 --steps 2 --warmup 1 --rounds 1 --batch 4 --check-batch 2)
    intr_args=(--small --threads 1 --steps 2 --warmup 1 --rounds 1 --batch 4 --check-batch 2)
    rank_args=(--small --threads 1 --batch 2 --naive-images 1 --repeats 1)
    ex_args=(--full --threads 1 --images 8 --batch 4 --img-size 32 --model vit_tiny_patch16_224)
else
    device=cuda
    # 8 minutes in all: the tiny workflow, then the four full presets (compile time included)
    t_wf=150; t_pc=75; t_intr=75; t_rank=75; t_ex=90
    pc_args=(--full --device cuda)
    intr_args=(--full --device cuda)
    rank_args=(--full --device cuda)
    ex_args=(--full --device cuda)
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its log and exit status
    local name="$1" limit="$2"; shift 2
    local start=$SECONDS
    if [ "$limit" = 0 ]; then
        echo "skipped" > "$logs/$name.status"; echo "== $name: skipped"; return
    fi
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$logs/$name.log" 2>&1
    local rc=$?
    echo "$rc $((SECONDS - start))" > "$logs/$name.status"
    echo "   exit $rc after $((SECONDS - start)) s"
}

# The tiny workflow end to end on CUDA (config/tiny.yaml with every device set to cuda).
"$py" - "$here/config/tiny.yaml" "$work/tiny_cuda.yaml" <<'PY'
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
for method in ("prompt_cam", "intr"):
    config[method].setdefault("train", {})["device"] = "cuda"
config.setdefault("extract", {})["device"] = "cuda"
yaml.safe_dump(config, open(sys.argv[2], "w"))
PY
step workflow "$t_wf" "$py" -m snakemake --snakefile "$here/Snakefile" --directory "$work/workflow" \
    --configfile "$work/tiny_cuda.yaml" --cores 4 --resources gpu=1
step train_prompt_cam "$t_pc" "$py" benchmarks/train_throughput.py "${pc_args[@]}" --json-out "$logs/train_prompt_cam.jsonl"
step train_intr "$t_intr" "$py" benchmarks/intr_throughput.py "${intr_args[@]}" --json-out "$logs/train_intr.jsonl"
step head_ranking "$t_rank" "$py" benchmarks/head_ranking.py "${rank_args[@]}" --json-out "$logs/head_ranking.jsonl"
step extract "$t_ex" "$py" benchmarks/extract_throughput.py "${ex_args[@]}" --json-out "$logs/extract.jsonl"

# One JSON: the device, each step's exit status, time and figures, and pass/fail per target.
"$py" - "$logs" "$out" "$device" "$dry" <<'PY'
import json, sys, time
from pathlib import Path
import torch
logs, out, device, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"

def status(name):
    text = (logs / f"{name}.status").read_text().split() if (logs / f"{name}.status").exists() else ["missing"]
    if text[0] == "skipped" or text[0] == "missing":
        return {"status": text[0]}
    rc, seconds = int(text[0]), int(text[1])
    return {"status": "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed"), "exit": rc,
            "seconds": seconds, "log": str(logs / f"{name}.log")}

def figures(name):
    path = logs / f"{name}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else None

def target(value, goal):
    return {"value": value, "goal": goal, "pass": None if value is None else bool(value >= goal)}

steps = {name: status(name) for name in ("workflow", "train_prompt_cam", "train_intr", "head_ranking", "extract")}
pc, intr, rank, ex = (figures(n) for n in ("train_prompt_cam", "train_intr", "head_ranking", "extract"))
for name, fig in zip(("train_prompt_cam", "train_intr", "head_ranking", "extract"), (pc, intr, rank, ex)):
    steps[name]["figures"] = fig
rows = {r["mode"]: r for r in rank["rows"]} if rank else {}
# Head ranking is judged against both this run's plain loop and the official loop's 0.31 s/image.
speedup = lambda mode: min(rows[mode]["speedup"], rows[mode]["speedup_vs_official"]) if mode in rows else None
targets = {
    "prompt_cam_train_img_s": target(pc["paths"][-1]["img_s"] if pc else None, 2300.0),
    "head_ranking_single_speedup": target(speedup("single"), 30.0),
    "head_ranking_batch_speedup": target(speedup("batch"), 500.0),
    "extract_img_s": target(ex["marginal_img_s"] if ex else None, 3000.0),
    "intr_train_img_s_512px": target(intr["paths"][-1]["img_s"] if intr else None, 537.0),
    "workflow_end_to_end": {"pass": steps["workflow"]["status"] == "ok"}
    if steps["workflow"]["status"] != "skipped" else {"pass": None},
}
report = {"device": device, "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() and not dry
          else "cpu (dry run)", "dry_run": dry, "torch": torch.__version__, "cuda": torch.version.cuda,
          "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "targets": targets, "steps": steps,
          "all_pass": all(t["pass"] for t in targets.values()) if not dry else None}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=1) + "\n")
print(f"device_check: {report['device_name']}: " + ", ".join(
    f"{k} {'PASS' if t['pass'] else 'FAIL' if t['pass'] is False else '-'}" for k, t in targets.items()))
print(f"device_check: figures in {out}")
PY
