#!/bin/bash
# Candidates for the one-hour CPU configuration (issue 12), screened on a lent GPU before an hour of CPU is
# spent on one: configs/fmnist-hour.toml and variants, each with the step budget it would get in an hour
# on 2 idle CPU cores (from benchmarks/steps.py's interleaved timings), side by side for at most TRAIN_S
# seconds; then each run's model file and metrics (NAME.tar), to be evaluated on the CPU machine.
# Figures (with public images): docs/results.md. Reads .dev/ (benchmarks/gpu_setup.sh says what).
#   TRAIN_S=430 bash benchmarks/hour_gpu.sh
#   ONLY="E G" TRAIN_S=330 bash benchmarks/hour_gpu.sh
#   ONLY=G SEEDS="0 1 2" TRAIN_S=330 bash benchmarks/hour_gpu.sh   (one run a seed: G-s0, G-s1, G-s2)
# LOCAL=1 PY=.venv/bin/python TRAIN_S=240 EXTRA="--set train.local_steps=3 --set train.warm_start=5 --set train.rounds=2"
#   bash benchmarks/hour_gpu.sh   runs it here (a CPU check of the script itself).
set -u
T0=$(date +%s)
TRAIN_S=${TRAIN_S:-420}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
RUNS=/tmp/hour; rm -rf $RUNS; mkdir -p $RUNS
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-3}  # several runs side by side
source benchmarks/gpu_setup.sh
# each candidate as screened, against configs/fmnist-hour.toml (which is G since 2026-11-27 evening, E before):
# A to D ran with a constant lr
F64="--set loss.feature_width=64"
CONST="--set train.lr_schedule=\"constant\""
declare -A RUN=(
  [A]="$CONST --set train.warm_start=3000 --set train.rounds=18"                                # the first draft
  [B]="$CONST $F64 --set train.warm_start=1500 --set train.rounds=7"                            # x2.3 A's step
  [C]="$CONST $F64 --set train.batch_size=64 --set train.warm_start=2000 --set train.rounds=12"  # x1.5 A's step
  [D]="$CONST --set train.warm_start=6000 --set train.rounds=10"                                # a longer warm start
  [E]="--set train.warm_start=6000 --set train.rounds=10"                                       # the first choice
  [G]=""                                                                                        # longer still: the configuration
)
for name in "${!RUN[@]}"; do  # ONLY="E G": just these runs (default: A to D)
  case " ${ONLY:-A B C D} " in *" $name "*) ;; *) unset "RUN[$name]" ;; esac
done
if [ -n "${SEEDS:-}" ]; then  # SEEDS="0 1 2": each candidate once a seed, named NAME-sS
  for name in "${!RUN[@]}"; do
    for s in $SEEDS; do RUN[$name-s$s]="${RUN[$name]} --set seed=$s"; done; unset "RUN[$name]"
  done
fi
for name in "${!RUN[@]}"; do  # background jobs of a script ignore SIGINT: SIGTERM keeps the last round's checkpoint
  eval timeout -k 20 $TRAIN_S $PY -m prismfl.cli train -c configs/fmnist-hour.toml --set train.device=\"$DEV\" \
    ${RUN[$name]} ${EXTRA:-} --out $RUNS/$name -q > $OUT/$name.train.log 2>&1 &
done
wait
echo "training stopped at +$(( $(date +%s) - T0 )) s"
for name in "${!RUN[@]}"; do
  cp $RUNS/$name/metrics.jsonl $OUT/$name.metrics.jsonl; cp $RUNS/$name/samples.png $OUT/$name.png
  $PY -m prismfl.cli export $RUNS/$name --out $OUT/$name.prism > $OUT/$name.export.log 2>&1 &
done
wait
for name in "${!RUN[@]}"; do echo "== $name"; tail -3 $OUT/$name.train.log; tail -3 $OUT/$name.export.log
  python3 -c "import json, sys; [print(r['round'], r['domain_fid']) for r in map(json.loads, sys.stdin) if r.get('domain_fid')]" < $OUT/$name.metrics.jsonl
  rm $OUT/$name.export.log
  # the machine returns 8 files at most: one archive a run (metrics, samples, model file, log)
  tar -cf $OUT/$name.tar -C $OUT $name.metrics.jsonl $name.png $name.prism $name.train.log && \
    rm $OUT/$name.metrics.jsonl $OUT/$name.png $OUT/$name.prism $OUT/$name.train.log; done
echo "done at +$(( $(date +%s) - T0 )) s"
ls -la $OUT
