#!/usr/bin/env bash
# `make data`: try to install the full Fashion-MNIST (Debian package dataset-fashion-mnist, MIT).
# Never fails: without it, training falls back to the committed subset src/transfusion/assets/fashion_subset.npz.
DIR=/usr/share/datasets/fashion-mnist
have_full() { [ -f "$DIR/train-images-idx3-ubyte.gz" ] && [ -f "$DIR/t10k-labels-idx1-ubyte.gz" ]; }

if ! have_full && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="no"; fi
  fi
  if [ "$SUDO" != no ]; then
    echo "data: installing dataset-fashion-mnist with apt-get ..."
    timeout 300 $SUDO apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive timeout 300 $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || true
  else
    echo "data: not root and no password-less sudo; cannot apt-get install dataset-fashion-mnist"
  fi
fi

if have_full; then
  echo "data: using the FULL Fashion-MNIST (60k train + 10k test) from $DIR"
else
  echo "data: full Fashion-MNIST unavailable -> FALLBACK to the committed subset (3,000 train + 1,000 test images)."
  echo "      For the full dataset: sudo apt-get install dataset-fashion-mnist   (then rerun)"
fi

# Emoji (npm packages emoji-datasource-{google,twitter}, prepared once into the cache; falls back to the
# committed subset src/transfusion/assets/emoji_subset.npz when npm or the registry is unreachable)
EMOJI_PY="${EMOJI_PY:-.venv/bin/python}"
if [ -x "$EMOJI_PY" ]; then
  "$EMOJI_PY" scripts/get_emoji.py || echo "data: emoji preparation failed -> FALLBACK to the committed subset"
else
  echo "data: no $EMOJI_PY yet (run \`make venv\`): emoji -> FALLBACK to the committed subset"
fi
exit 0
