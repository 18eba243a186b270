#!/usr/bin/env bash
# The prepared GPU check, one command: bash benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py options]
# Needs torch, accelerate, peft, transformers, safetensors and numpy on the machine; everything else comes from
# the wheels in .whl/ (made here by scripts/prepare_gpu_wheels.sh). No network. Writes gpu_check.json / .md.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${OUT:-$root/output/gpu-check}}"
site="$(mktemp -d)"
if compgen -G "$root/.whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$root"/.whl/*.whl
fi
ln -s "$root" "$site/decoupled_dmd"  # the checkout is the package, as pyproject's package-dir maps it
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
python3 -c "import decoupled_dmd.trainer.loop, diffusers; print('decoupled_dmd', decoupled_dmd.__path__[0], '| diffusers', diffusers.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 "$root/benchmarks/gpu_check.py" --out "$out" "${@:2}"
