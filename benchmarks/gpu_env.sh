# Sourced by benchmarks/gpu_run.sh and benchmarks/gpu_study.sh (run from the repository root).
#
#   gpu_setup FILE   install the wheels carried in .whl/ (if any) into /tmp/site, put them and this
#                    checkout on PYTHONPATH, and record the date, the GPUs and the library versions
#                    in FILE (and on stdout). Returns 1 when the install fails.
#
# The lent H200's image (no network) has jax, flax, optax and orbax-checkpoint but not
# ml-collections: `bash benchmarks/gpu_run.sh fetch` downloads that wheel into .whl/ beforehand.
gpu_setup() {
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    python3 -c 'import jax, flax, optax, orbax.checkpoint as o; print("jax", jax.__version__,
      "flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__, jax.devices())'
  } 2>&1 | tee "$1"
}
