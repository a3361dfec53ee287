#!/usr/bin/env bash
# Create FusionBench's environment for the peer comparison, in its OWN virtual environment.
#
# fusion-bench 0.2.33 needs transformers < 5 and datasets < 4, which conflict with the project's
# environment, so it never goes there. torch is installed first and pinned (the CPU build that pip
# finds on this machine's wheel folder); a bare `torch` requirement could otherwise resolve to the
# multi-GB CUDA build.
#
#   bash bench/peer/setup_env.sh            # venv at $OPCM_PEER_VENV or <repo>/.venv-peer
#   OPCM_PEER_VENV=/somewhere bash bench/peer/setup_env.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${OPCM_PEER_VENV:-$repo/.venv-peer}"
python="${PYTHON:-python3}"
torch_pin="${OPCM_PEER_TORCH:-torch==2.13.0}"

start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
"${pip[@]}" --upgrade pip >/dev/null
"${pip[@]}" "$torch_pin"
# torch stays pinned while fusion-bench and its dependencies resolve.
"${pip[@]}" "$torch_pin" "fusion-bench==0.2.33" "transformers<5" "datasets<4" safetensors
"$venv/bin/python" - <<'PY'
import fusion_bench, torch, transformers, datasets
from fusion_bench.method.opcm.opcm_general import OPCM  # noqa: F401  the class the peer runs
print(f"peer venv ready: fusion_bench {getattr(fusion_bench, '__version__', '0.2.33')}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, datasets {datasets.__version__}")
PY
end=$(date +%s)
echo "setup took $((end - start)) s; size $(du -sh "$venv" | cut -f1) at $venv"
