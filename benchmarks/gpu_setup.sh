# Sourced by the benchmarks/*_gpu.sh scripts: on the lent GPU machine (torch, no network) install the
# wheels it lacks and put the data and caches where prismfl looks, all from .dev/ (ignored by git, carried):
#   .dev/whl/    wheels it lacks (tomli-w, constriction) for its Python 3.12
#   .dev/data/fashion-mnist/   the four IDX files (/usr/share/datasets/fashion-mnist here)
#   .dev/cache/  the public feature nets from ~/.cache/prismfl (optional)
# With LOCAL set (a CPU check of a script here) it does nothing.
if [ -z "${LOCAL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  mkdir -p /usr/share/datasets && cp -r .dev/data/fashion-mnist /usr/share/datasets/
  export PRISMFL_CACHE=/tmp/cache; mkdir -p $PRISMFL_CACHE; cp .dev/cache/* $PRISMFL_CACHE/
  nvidia-smi -L
fi
