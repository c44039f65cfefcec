#!/bin/bash
# Where the conditional demo's generator and loss top out when compute is not the limit: four runs of
# configs/fmnist-noniid.toml side by side on one GPU for TRAIN_S seconds each, then each one's
# evaluation on the central screens' protocol (5,000 samples, train on synthetic with 20,000 images).
# Figures: the commit history of docs/quality.md (removed from docs/ on 2026-12-07).
#   central-b32     central (pooled private data), the demo's generator and batch: the screens' row
#   central-b128    the same at batch 128
#   central-b128-m3 batch 128, 3 modes a class, width 1024
#   prism-m3        the demo's federation (warm start 1,000 steps, 5 of 10 shard clients a round,
#                   100 local steps) with 3 modes and 16 codes a step, for as many rounds as fit
#   central-b128-m3-f64  (ONLY=...) central-b128-m3 for 10,000 steps with a width-64 public feature net
# Reads .dev/ (benchmarks/gpu_setup.sh says what); the evaluation classifier ships with prismfl.
#   TRAIN_S=270 bash benchmarks/ceiling_gpu.sh
#   ONLY=central-b128-m3-f64 EXPORT_ONLY=1 TRAIN_S=200 bash benchmarks/ceiling_gpu.sh   # a wider public net
# LOCAL=1 PY=.venv/bin/python TRAIN_S=60 N=200 SYN=500 EXTRA="--set train.local_steps=5 --set train.warm_start=10" runs it here (a CPU check of the script itself).
set -u
T0=$(date +%s)
TRAIN_S=${TRAIN_S:-270}
N=${N:-5000}
SYN=${SYN:-20000}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
RUNS=/tmp/ceiling; rm -rf $RUNS; mkdir -p $RUNS
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-3}  # several runs side by side
source benchmarks/gpu_setup.sh
COMMON="--set train.device=\"$DEV\" --set train.eval_every=10 --set train.sample_every=0 --set model.modes=1"
COMMON="$COMMON --set loss.codes_per_step=0 --set train.warm_start=1000 ${EXTRA:-}"  # as run: the demo had no modes yet, a 1,000-step warm start
CENTRAL="--method central --set train.rounds=400"
declare -A RUN=(
  [central-b32]="$CENTRAL"
  [central-b128]="$CENTRAL --set train.batch_size=128"
  [central-b128-m3]="$CENTRAL --set train.batch_size=128 --set model.modes=3 --set model.width=1024"
  [prism-m3]="--set train.rounds=200 --set model.modes=3 --set loss.codes_per_step=16"
  # the same 10,000 steps as the widest run above got in its 270 s, with a public feature net twice as wide
  [central-b128-m3-f64]="$CENTRAL --set train.batch_size=128 --set model.modes=3 --set model.width=1024 --set loss.feature_width=64 --set train.rounds=20"
)
for name in "${!RUN[@]}"; do  # ONLY="a b": just these runs (default: the first four)
  case " ${ONLY:-central-b32 central-b128 central-b128-m3 prism-m3} " in *" $name "*) ;; *) unset "RUN[$name]" ;; esac
done
if [ "${SMOKE:-1}" = 1 ]; then  # every variant for one short round first: stop early if the device path breaks
  for name in "${!RUN[@]}"; do
    rm -rf /tmp/smoke-$name  # a stale one would pass the check below
    eval $PY -m prismfl.cli train -c configs/fmnist-noniid.toml $COMMON ${RUN[$name]} --set train.rounds=1 \
      --set train.local_steps=2 --set train.warm_start=5 --set train.eval_every=1 --out /tmp/smoke-$name -q \
      > $OUT/$name.smoke.log 2>&1 &
  done
  wait
  failed=0
  for name in "${!RUN[@]}"; do
    [ -f /tmp/smoke-$name/model.prism ] || { echo "== smoke $name failed"; grep -v "^│ *│$" $OUT/$name.smoke.log | tail -40; failed=1; }
  done
  [ $failed = 0 ] || exit 1
  echo "smoke done at +$(( $(date +%s) - T0 )) s"
fi
# background jobs of a script ignore SIGINT, so the runs are stopped with SIGTERM: each keeps the checkpoint
# of its last finished round (written atomically), and the export reads that
for name in "${!RUN[@]}"; do
  eval timeout -k 20 $TRAIN_S $PY -m prismfl.cli train -c configs/fmnist-noniid.toml $COMMON ${RUN[$name]} \
    --out $RUNS/$name -q > $OUT/$name.train.log 2>&1 &
done
wait
echo "training stopped at +$(( $(date +%s) - T0 )) s"
for name in "${!RUN[@]}"; do
  ( cp $RUNS/$name/metrics.jsonl $OUT/$name.metrics.jsonl
    $PY -m prismfl.cli export $RUNS/$name --out $OUT/$name.prism > $OUT/$name.eval.log 2>&1
    [ -n "${EXPORT_ONLY:-}" ] && exit 0  # evaluate elsewhere (prismfl evaluate NAME.prism ...)
    $PY -m prismfl.cli evaluate $OUT/$name.prism --n $N --synthetic $SYN --out $OUT/$name.json >> $OUT/$name.eval.log 2>&1
    $PY -m prismfl.cli sample $OUT/$name.prism --per-class 8 --out $OUT/$name.png >> $OUT/$name.eval.log 2>&1 ) &
done
wait
for name in "${!RUN[@]}"; do echo "== $name"; tail -3 $OUT/$name.train.log; tail -16 $OUT/$name.eval.log; done
echo "done at +$(( $(date +%s) - T0 )) s"
ls -la $OUT
