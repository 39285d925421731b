# Sourced by device scripts (from session 20 on): `source benchmarks/device_calls/setup.sh .whl ...`
# installs the given wheel folders into /tmp/site (no index, no deps), puts it and the repository on
# PYTHONPATH, makes $OUT and prints the GPU's name. The earlier scripts inline these lines (kept as the
# records of what ran).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(for d in "$@"; do echo "$d"/*.whl; done) || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
