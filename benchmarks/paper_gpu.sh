#!/bin/bash
# The paper's FashionMNIST configuration (configs/paper-fmnist.toml) on a GPU machine, for as many of
# its 500 rounds as fit in TRAIN_S seconds; then the model file and the full evaluation (10,000
# samples; the documented figures are protocol v2) from the last checkpoint. Figures: docs/results.md "The paper's scale on a GPU".
#
# The GPU machine has torch but no network: it reads everything from .dev/ (benchmarks/gpu_setup.sh says what)
# and writes metrics.jsonl, model.prism, quality.json, samples.png and train.log to $OUT.
#   TRAIN_S=300 bash benchmarks/paper_gpu.sh                     # the paper's settings
#   SMOKE=0 TRAIN_S=225 EXTRA="--set train.warm_start=1000" bash benchmarks/paper_gpu.sh
# LOCAL=1 PY=.venv/bin/python runs it here instead (a CPU check of the script itself).
set -u
T0=$(date +%s)
TRAIN_S=${TRAIN_S:-330}
EXTRA=${EXTRA:-}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
RUN=/tmp/paper
rm -rf $RUN
source benchmarks/gpu_setup.sh
if [ "${SMOKE:-1}" = 1 ]; then
# smoke: one short round, export, a small evaluation: stop early if the device path breaks
$PY -m prismfl.cli train -c configs/paper-fmnist.toml --set train.rounds=1 --set train.local_steps=2 --set train.eval_every=1 --out /tmp/smoke -q 2>&1 | tail -4 || exit 1
$PY -m prismfl.cli evaluate /tmp/smoke --n 500 2>&1 | tail -4
[ -f /tmp/smoke/model.prism ] || { echo "smoke failed"; exit 1; }
echo "smoke done at +$(( $(date +%s) - T0 )) s"
fi
timeout -s INT $TRAIN_S $PY -m prismfl.cli train -c configs/paper-fmnist.toml --set train.eval_every=5 --set train.sample_every=5 $EXTRA --out $RUN -q 2>&1 | tee $OUT/train.log | tail -30
echo "training stopped at +$(( $(date +%s) - T0 )) s"
cp $RUN/metrics.jsonl $OUT/
$PY -m prismfl.cli export $RUN --out $OUT/model.prism
$PY -m prismfl.cli evaluate $OUT/model.prism --out $OUT/quality.json 2>&1 | tail -25
$PY -m prismfl.cli sample $OUT/model.prism --out $OUT/samples.png 2>&1 | tail -3
cp $RUN/curves.png $OUT/ 2>/dev/null
echo "done at +$(( $(date +%s) - T0 )) s"
ls -la $OUT
