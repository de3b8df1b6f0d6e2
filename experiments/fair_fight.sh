#!/usr/bin/env bash
# The whole comparison of issue 24, resumable, in the background of a 2-core machine: one command per session.
#
#   experiments/fair_fight.sh start      # (re)start from wherever it stopped: two processes at nice 19
#   experiments/fair_fight.sh pause      # SIGSTOP them (a benchmark needs the cores), `resume` to go on
#   experiments/fair_fight.sh status     # the step running, the grid table so far, the last log lines
#   experiments/fair_fight.sh stop
#   experiments/fair_fight.sh fight-rows # the rows step 3 trains, comma-separated (for a GPU run of them, docs/GPU.md)
#
# Steps, each resumable (finished runs are skipped, an interrupted one resumes from its last epoch checkpoint,
# two processes take turns through the lock files of experiments/accuracy.py):
#   1. grid: budget 4, IF 100, seed 0, validation only, every method (process A in grid order, B reversed);
#   2. grid-table --write-tuned: each method's chosen point into experiments/methods.toml (stops here if a point
#      failed: the log names it);
#   3. run: budget 20, IF 100, seeds 0-2, the fight's rows (accuracy.py FIGHT) with their tuned settings
#      -> experiments/results/tuned/;
#   4. run: budget 20, IF 10, seed 0, the four best rows on validation after step 3 (`table --rank-val 4`; LA and
#      Balanced Softmax, one method, count once), or the rows named in $IF10_ROWS;
#   5. run: budget 20, IF 100, seeds 0-2, every other row (the paper's ablations, the balanced reference).
# Commit experiments/results/ and methods.toml as they fill (they are the record); runs/ stays out of git.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${FAIR_WORKDIR:-$REPO/runs/bench}"
LOGS="${FAIR_LOGS:-$REPO/runs/fair-logs}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
PIDS="$LOGS/pids"
mkdir -p "$LOGS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1

acc() { "$PY" "$REPO/experiments/accuracy.py" "$@"; }
names() {  # grid | fight | others, then all | reversed: the methods the grid tunes, or the rows `run` trains that
           # are (not) in the fight (accuracy.py FIGHT: the recipe, baselines, peers, controls), comma-separated
    "$PY" -c "import sys; sys.path.insert(0, '$REPO/experiments'); import accuracy as a
m = a.load_methods(); rows = [n for n, s in m.items() if 'run' not in s]
names = {'grid': a.grid_methods(m), 'fight': [n for n in rows if n in a.FIGHT],
         'others': [n for n in rows if n not in a.FIGHT]}['$1']
print(','.join(reversed(names) if '$2' == 'reversed' else names))"
}
methods() { names grid "$1"; }
first() { names fight "$1"; }     # step 3: what the verdict and the IF 10 rows need
rest() { names others "$1"; }     # step 5: the paper's other ablations, the balanced reference
both() {  # run "accuracy.py ARGS --methods X" as two processes (forward and reversed order), wait for both
    local kind="$1"; shift
    "$PY" "$REPO/experiments/accuracy.py" "$@" --methods "$($kind all)" --device cpu --no-progress \
        --workdir "$WORK" >> "$LOGS/A.log" 2>&1 &
    local a=$!
    "$PY" "$REPO/experiments/accuracy.py" "$@" --methods "$($kind reversed)" --device cpu --no-progress \
        --workdir "$WORK" >> "$LOGS/B.log" 2>&1 &
    local b=$!
    echo "$a $b" > "$PIDS.children"
    wait $a; local ra=$?; wait $b; local rb=$?
    return $(( ra || rb ))
}
chain() {
    echo "$(date -u +%FT%TZ) step 1: grid" >> "$LOGS/steps.log"
    both methods grid --imbalance-factor 100 --budget 4 --seeds 0 || { echo "grid: a point failed (see A.log, B.log)" >> "$LOGS/steps.log"; exit 1; }
    echo "$(date -u +%FT%TZ) step 2: write-tuned" >> "$LOGS/steps.log"
    acc grid-table --imbalance-factor 100 --budget 4 --write-tuned >> "$LOGS/steps.log" 2>&1 || exit 1
    echo "$(date -u +%FT%TZ) step 3: budget 20, IF 100, seeds 0-2, the fight's rows: $(first all)" >> "$LOGS/steps.log"
    both first run --imbalance-factor 100 --budget 20 --seeds 0 1 2 --results "$REPO/experiments/results/tuned" || exit 1
    acc table --imbalance-factor 100 --budget 20 --results "$REPO/experiments/results/tuned" >> "$LOGS/steps.log" 2>&1
    IF10_ROWS="${IF10_ROWS:-$(acc table --imbalance-factor 100 --budget 20 --results "$REPO/experiments/results/tuned" --rank-val 4)}"
    echo "$(date -u +%FT%TZ) step 4: budget 20, IF 10, seed 0: $IF10_ROWS" >> "$LOGS/steps.log"
    if10() { echo "$IF10_ROWS" | tr ',' '\n' | { [ "$1" = reversed ] && tac || cat; } | paste -sd,; }
    both if10 run --imbalance-factor 10 --budget 20 --seeds 0 --results "$REPO/experiments/results/tuned" || exit 1
    echo "$(date -u +%FT%TZ) step 5: budget 20, IF 100, seeds 0-2, the other rows: $(rest all)" >> "$LOGS/steps.log"
    both rest run --imbalance-factor 100 --budget 20 --seeds 0 1 2 --results "$REPO/experiments/results/tuned" || exit 1
    echo "$(date -u +%FT%TZ) done" >> "$LOGS/steps.log"
}

all_pids() { cat "$PIDS" "$PIDS.children" 2>/dev/null | tr ' ' '\n' | grep -v '^$'; }
case "${1:-status}" in
    start)
        if [ -f "$PIDS" ] && kill -0 "$(cat "$PIDS")" 2>/dev/null; then echo "already running (pid $(cat "$PIDS"))"; exit 0; fi
        nohup nice -n 19 "$0" chain > /dev/null 2>&1 &
        echo $! > "$PIDS"
        echo "started (pid $!); logs in $LOGS" ;;
    chain) chain ;;
    fight-rows) first all ;;
    pause) all_pids | xargs -r kill -STOP; echo paused ;;
    resume) all_pids | xargs -r kill -CONT; echo resumed ;;
    stop) all_pids | xargs -r kill -CONT; all_pids | xargs -r kill 2>/dev/null; rm -f "$PIDS" "$PIDS.children"
          echo stopped ;;
    status)
        tail -n 3 "$LOGS/steps.log" 2>/dev/null
        acc grid-table --imbalance-factor 100 --budget 4 2>/dev/null | tail -n 30
        for f in "$LOGS/A.log" "$LOGS/B.log"; do [ -f "$f" ] && { echo "== $f"; tail -n 2 "$f" | cut -c1-200; }; done ;;
    *) echo "usage: $0 start|pause|resume|status|stop|fight-rows" >&2; exit 2 ;;
esac
