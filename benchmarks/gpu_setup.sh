# Sourced by the benchmarks/*_gpu.sh scripts: on the lent GPU machine (torch, no network) install the
# wheels it lacks and put the data and caches where prismfl looks, all from .dev/ (ignored by git, carried):
#   .dev/whl/    wheels it lacks (tomli-w, constriction) for its Python 3.12
#   .dev/data/fashion-mnist/   the four IDX files (/usr/share/datasets/fashion-mnist here)
#   .dev/cache/  the public feature nets from ~/.cache/prismfl (optional)
# With LOCAL set (a CPU check of a script here) it installs and copies nothing. Either way it then sets
# what every script uses: PY (default python3), DEV (cuda, or cpu with LOCAL), unbuffered output, and
# prints the torch build, the commit and the set-up time since the script's T0.
if [ -z "${LOCAL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  mkdir -p /usr/share/datasets && cp -r .dev/data/fashion-mnist /usr/share/datasets/
  export PRISMFL_CACHE=/tmp/cache; mkdir -p $PRISMFL_CACHE; cp .dev/cache/* $PRISMFL_CACHE/
  nvidia-smi -L
fi
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEV=cuda; [ -n "${LOCAL:-}" ] && DEV=cpu
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
git log -1 --format='commit %h %cd' 2>/dev/null
echo "setup done at +$(( $(date +%s) - ${T0:-$(date +%s)} )) s"
