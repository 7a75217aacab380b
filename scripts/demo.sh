#!/usr/bin/env bash
# The demo: set up, build 5,000 + 1,000 Fashion-MNIST images as an ImageFolder tree, pretrain
# SimCLR on the CPU, then evaluate it with a linear probe next to two references computed by
# the same evaluation: the same network randomly initialised, and the raw pixels.
# Running it again resumes an interrupted pretraining and re-evaluates. Everything it writes is
# under demo_data/ and results/demo/ (both ignored by git: the demo changes no tracked file).
# A smaller demo (the tests run one): DEMO_PER_CLASS="TRAIN TEST" images per class and
# DEMO_FLAGS="--epochs 1 ..." added to main.py's flags.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
DATA=demo_data
OUT=results/demo

read -r TRAIN_PER_CLASS TEST_PER_CLASS <<< "${DEMO_PER_CLASS:-500 100}"
[ -d "$DATA/train" ] && [ -d "$DATA/test" ] || $PY make_demo_data.py "$DATA" \
    --train-per-class "$TRAIN_PER_CLASS" --test-per-class "$TEST_PER_CLASS"
# The recipe chosen on validation images in docs/defaults.md ("The demo's recipe"), sized for
# about 20 minutes on 2 CPU cores: the half-resolution stem buys 14 epochs.
$PY main.py "$DATA" "$OUT" --stem half --epochs 14 -bs 250 -nw 2 ${DEMO_FLAGS:-}
$PY linear_evaluation.py "$DATA" "$OUT/model/model.pth" "$OUT/linear_eval" -bs 250 -nw 2
$PY linear_evaluation.py "$DATA" "$OUT/model/model.pth" "$OUT/reference_random" -bs 250 -nw 2 \
    --reference random > "$OUT/reference_random.log"
$PY linear_evaluation.py "$DATA" "$OUT/model/model.pth" "$OUT/reference_pixels" -bs 250 -nw 2 \
    --reference pixels > "$OUT/reference_pixels.log"
# The figures stay with the run (OUT is ignored by git: a user's demo changes no tracked file);
# the maintainers' copy in results/demo.json is written by bash tools/measure_docs.sh demo.
$PY scripts/demo_summary.py "$OUT" --json "$OUT/demo.json" --script-seconds "$SECONDS"
