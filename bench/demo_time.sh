#!/usr/bin/env bash
# Wall time and peak memory of the whole demo (`make demo`).
#
#     bash bench/demo_time.sh [WORKDIR]        # default WORKDIR: a fresh temporary directory
#
# Two memory figures, because the demo is a tree of processes (run_demo.py starts one process per step):
# - "max RSS (largest single process)": /usr/bin/time -v's "Maximum resident set size". The kernel reports the
#   largest RSS of any one process in the tree, NOT the sum of processes alive at the same time;
# - "peak RSS (sum over the process tree)": the largest sum of VmRSS over the demo's process tree, sampled every
#   0.2 s from /proc (short spikes between samples can be missed).
#
# `make demo` would install the virtual environment first when .venv/.installed is missing or stale; this script runs
# the demo's own command instead (`.venv/bin/python experiments/demo/run_demo.py`, what `make demo` runs) with a fresh
# --workdir. It refuses to start when a piece of the demo is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for f in experiments/demo/run_demo.py sft_run.py reward_run.py ppo_run.py \
         experiments/demo/collect.yaml experiments/demo/sft.yaml experiments/demo/reward.yaml \
         experiments/demo/ppo.yaml experiments/demo/eval.yaml; do
  [[ -f "$f" ]] || missing+=("$f")
done
if (( ${#missing[@]} )); then
  echo "demo_time: the demo is not complete yet; missing: ${missing[*]}" >&2
  echo "demo_time: run this script again once they exist" >&2
  exit 2
fi
[[ -x /usr/bin/time ]] || { echo "demo_time: /usr/bin/time not found (apt-get install time)" >&2; exit 2; }

workdir="${1:-$(mktemp -d /tmp/retroformer-demo-XXXXXX)}"
log="$workdir/demo_time.log"
mkdir -p "$workdir"

# `make demo` is `.venv/bin/python experiments/demo/run_demo.py` after the install check; run that command directly with
# a fresh --workdir, so that nothing is resumed from an earlier demo and nothing is installed.
cmd=(.venv/bin/python experiments/demo/run_demo.py)
if grep -q -- "--workdir" experiments/demo/run_demo.py; then
  cmd+=(--workdir "$workdir/runs")
fi

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(free -g | awk '/Mem:/{print $2}') GiB RAM"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "command: ${cmd[*]}"

/usr/bin/time -v -o "$workdir/time.txt" "${cmd[@]}" >"$log" 2>&1 &
timer=$!

# Sample the summed RSS of every descendant of the timer process.
.venv/bin/python - "$timer" >"$workdir/tree_rss.txt" <<'EOF'
import os, sys, time

root = int(sys.argv[1])


def children(pid):
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


peak = 0
while os.path.exists(f"/proc/{root}"):
    todo, total = [root], 0
    while todo:
        pid = todo.pop()
        total += rss_kib(pid)
        todo += children(pid)
    peak = max(peak, total)
    time.sleep(0.2)
print(peak)
EOF

wait "$timer" || { echo "demo_time: the demo failed; see $log" >&2; tail -20 "$log" >&2; exit 1; }
wall=$(grep "Elapsed (wall clock)" "$workdir/time.txt" | awk '{print $NF}')
maxrss=$(grep "Maximum resident set size" "$workdir/time.txt" | awk '{print $NF}')
tree=$(cat "$workdir/tree_rss.txt")
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wall time: $wall"
echo "max RSS (largest single process): $((maxrss / 1024)) MiB"
echo "peak RSS (sum over the process tree, 0.2 s samples): $((tree / 1024)) MiB"
echo "full /usr/bin/time report: $workdir/time.txt; demo output: $log"
