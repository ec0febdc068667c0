#!/usr/bin/env bash
# Build the peer's own virtual environment (.venv-peer) for the side-by-side benchmarks.
#
# The peer is PyPI transfusion-pytorch 0.20.0 (lucidrains). It is installed --no-deps so it can never replace
# our torch 2.13.0 CPU wheel; its requirements are installed by name with torch excluded (DESIGN.md §4).
# Idempotent: a finished environment is recognised by a stamp file and left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-python3}"
VENV="${PEER_VENV:-$ROOT/.venv-peer}"
STAMP="$VENV/.peer-installed-0.20.0"
TORCH="${TORCH:-torch==2.13.0}"
PEER="transfusion-pytorch==0.20.0"
REQS=(axial-positional-embedding beartype einops einx ema-pytorch jaxtyping loguru
      rotary-embedding-torch torch-einops-utils torchdiffeq tqdm)

if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import transfusion_pytorch" 2>/dev/null; then
    echo "peer venv ready: $VENV"
    exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH"
"$VENV/bin/pip" install -q --no-deps "$PEER"
"$VENV/bin/pip" install -q "${REQS[@]}"
# a requirement must not have swapped torch (an unpinned torch would pull a multi-GB CUDA build)
"$VENV/bin/python" - <<'PYEOF'
import torch, transfusion_pytorch  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("peer venv ok: torch", torch.__version__)
PYEOF
touch "$STAMP"
