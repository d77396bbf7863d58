#!/usr/bin/env bash
# The whole AdamBNN pipeline, end to end, on any CPU and without downloads:
#
#   bash demo.sh [extra training flags]     # e.g. bash demo.sh -j 1
#
# 1. exports scikit-learn's handwritten digits (real data shipped inside the package: 1,797
#    8x8 images, 10 classes) once to demo_output/data/{train,val}/<class>/*.png (32x32 RGB);
# 2. trains the teacher, a torchvision ResNet-34 (random init), with labels on them;
# 3. step 1 (bash step1/run.sh), 4. step 2 (bash step2/run.sh) from step 1's model_best.pth.tar,
# 5. evaluates step 2's model_best.pth.tar with evaluate.py, 6. exports it as the 1-bit network
# (python -m utils.export) and evaluates that file too;
# and prints each stage's val accuracy and the times. Steps 1 and 2 and the evaluation go through
# the very entry points used on ImageNet with the published recipe (Adam, lr 1.25e-3, weight
# decay 5e-6 / 0, linear schedule, distillation loss, the original transforms); only the data,
# the resolution (--input-size 32), the epochs and the batch size differ. Extra arguments go to
# both run.sh calls.
#
# Everything goes under demo_output/ (DEMO_OUT; git-ignored). Re-running resumes: the export, the
# teacher and finished steps are kept (a finished step says "nothing to do"), an interrupted
# step continues from its last completed epoch, and the evaluation runs again. FRESH=1 deletes
# demo_output/ first and retrains everything.
#
# Environment: PYTHON (default: the python on PATH, e.g. the activated venv), DEMO_OUT,
# TEACHER_EPOCHS, EPOCHS1, EPOCHS2, BATCH_SIZE, INPUT_SIZE (defaults below: tuned to finish
# within 15 minutes on 2 CPU cores with step 2 above 90% val top-1; measured 2026-12-02: 542 s
# on 2 idle cores, step 2 at 94.4%, see the README).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
OUT="${DEMO_OUT:-$ROOT/demo_output}"
TEACHER_EPOCHS="${TEACHER_EPOCHS:-8}"
EPOCHS1="${EPOCHS1:-12}"
EPOCHS2="${EPOCHS2:-12}"
BATCH_SIZE="${BATCH_SIZE:-64}"
INPUT_SIZE="${INPUT_SIZE:-32}"
DATA="$OUT/data"
TEACHER="$OUT/teacher/resnet34_digits.pth"

if ! "$PYTHON" -c "import torch, torchvision, sklearn" 2>/dev/null; then
    echo "error: $PYTHON cannot import torch, torchvision and sklearn: activate the environment" \
         "that has requirements.txt installed, or set PYTHON=/path/to/python" >&2
    exit 1
fi
if [ "${FRESH:-0}" = 1 ]; then
    rm -rf "$OUT"
fi
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
stage() {  # stage NAME: prints a banner and remembers when the stage began
    STAGE_START=$SECONDS
    echo
    echo "=== demo: $1 ==="
}
took() { echo "=== demo: $1 took $((SECONDS - STAGE_START)) s ==="; TIMES+=("$1 $((SECONDS - STAGE_START))"); }
TIMES=()

stage "export the digits to $DATA"
"$PYTHON" -m utils.demo.digits export --out "$DATA" --size "$INPUT_SIZE"
took export

stage "teacher: ResNet-34, $TEACHER_EPOCHS epochs with labels"
if [ -f "$TEACHER" ]; then
    echo "kept $TEACHER (delete it, or FRESH=1, to retrain)"
else
    rm -f "$OUT/teacher/results.jsonl"
    "$PYTHON" -m utils.demo.digits teacher --data "$DATA" --out "$TEACHER" --epochs "$TEACHER_EPOCHS" \
        --input-size "$INPUT_SIZE" --results-file "$OUT/teacher/results.jsonl"
fi
took teacher

COMMON=(--data "$DATA" --input-size "$INPUT_SIZE" --batch_size "$BATCH_SIZE"
        --teacher-weights "$TEACHER")
stage "step 1: binary activations, $EPOCHS1 epochs (bash step1/run.sh)"
bash "$ROOT/step1/run.sh" "${COMMON[@]}" --epochs "$EPOCHS1" --save "$OUT/step1" "$@"
took "step 1"

stage "step 2: binary weights and activations, $EPOCHS2 epochs (bash step2/run.sh)"
bash "$ROOT/step2/run.sh" "${COMMON[@]}" --epochs "$EPOCHS2" --save "$OUT/step2" \
    --init-checkpoint "$OUT/step1/model_best.pth.tar" "$@"
took "step 2"

stage "evaluate step 2's model_best.pth.tar (python evaluate.py)"
rm -f "$OUT/evaluate.jsonl" "$OUT/evaluate_1bit.jsonl"
"$PYTHON" "$ROOT/evaluate.py" --checkpoint "$OUT/step2/model_best.pth.tar" --data "$DATA" \
    --results-file "$OUT/evaluate.jsonl"
took evaluation

stage "export the 1-bit network (python -m utils.export) and evaluate it"
"$PYTHON" -m utils.export --checkpoint "$OUT/step2/model_best.pth.tar" --out "$OUT/step2/reactnet_a_1bit.pt"
"$PYTHON" "$ROOT/evaluate.py" --checkpoint "$OUT/step2/reactnet_a_1bit.pt" --data "$DATA" \
    --results-file "$OUT/evaluate_1bit.jsonl"
took "1-bit export"

echo
echo "=== demo: summary (val top-1 on $DATA/val) ==="
"$PYTHON" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def last(path):
    with open(path) as f:
        return json.loads(f.read().splitlines()[-1])
rows = []
teacher = last(os.path.join(out, "teacher", "results.jsonl"))
rows.append((f"teacher ResNet-34, {teacher['epochs']} epochs, labels", teacher["top1"], teacher["top5"]))
for step, what in ((1, "binary activations"), (2, "binary weights and activations")):
    rec = last(os.path.join(out, f"step{step}", "log.jsonl"))
    rows.append((f"step {step} ReActNet-A, {what}: best of {rec['epoch'] + 1} epochs",
                 rec["best_top1"], None))
ev = last(os.path.join(out, "evaluate.jsonl"))
rows.append(("evaluate.py, step 2 model_best.pth.tar", ev["top1"], ev["top5"]))
ev = last(os.path.join(out, "evaluate_1bit.jsonl"))
rows.append(("evaluate.py, the exported 1-bit network", ev["top1"], ev["top5"]))
for name, top1, top5 in rows:
    print(f"{name:<68} Acc@1 {top1:7.3f}" + (f"  Acc@5 {top5:7.3f}" if top5 is not None else ""))
EOF
for t in "${TIMES[@]}"; do
    echo "time: ${t% *}: ${t##* } s"
done
echo "total time: $((SECONDS - START)) s"
