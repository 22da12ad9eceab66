# Two entry points for a fresh machine (see README): `make quickstart` and `make test`.
# torch is installed as torch==2.13.0, the CPU build on this machine's disk; an open range would pull CUDA.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
DEB    := mosquitto dataset-fashion-mnist
# the tests' RTSP camera: GStreamer's RTSP server, run by the system python3
# the fleet monitor's tests: a real PostgreSQL (run as an unprivileged user), a real Prometheus scraping
# /metrics, Chromium for the web dashboard (driven by Playwright), tmux for the terminal dashboard; the stock
# MQTT clients (mosquitto_sub, mosquitto_rr) an operator watches and commands a device with
DEB_TEST := $(DEB) gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good python3-gi \
            postgresql prometheus chromium tmux mosquitto-clients

.PHONY: quickstart lint test test-fast test-arm64 arm64-mnv2 mutation-check fuzz deb deb-test bench mutation clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	touch $@

# what `make quickstart` runs: export (torch, LiteRT), the device side (the agent) and the fleet monitor
$(VENV)/.export: $(VENV)/.base pyproject.toml
	$(PIP) install -q $(TORCH) -e '.[export,tflite,device,fleet]'
	touch $@

$(VENV)/.all: $(VENV)/.base pyproject.toml
	$(PIP) install -q $(TORCH) -e '.[all,dev]'
	touch $@ $(VENV)/.export

# Debian packages (real data, a real broker; for the tests also an RTSP camera); only when we may install them.
define apt_install
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi; \
	else echo "not root: make sure these Debian packages are installed: $(1)"; fi
endef

deb:
	$(call apt_install,$(DEB))

deb-test:
	$(call apt_install,$(DEB_TEST))

# ends with the whole loop: an agent -> a local mosquitto (Debian, in DEB) -> the monitor and its dashboard;
# `make quickstart ARGS=--serve` keeps them up until Ctrl-C
quickstart: deb $(VENV)/.export
	$(VENV)/bin/lepton-edge quickstart $(ARGS)

# the quality gates, first in `make test` and `make test-fast` (so in .ci/run), a few seconds: ruff with the rule
# set and complexity limit of [tool.ruff] in pyproject.toml, then mypy on the public API and the device side
# ([tool.mypy] files)
LINT_PATHS := lepton_edge exporters targets tests bench scripts
lint: $(VENV)/.all
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m mypy

# the fuzz tier (tests/fuzz: hypothesis over every parser of outside input + the committed corpus) runs
# bounded here, ~10 s in all; `make fuzz` runs it long, then atheris on each parser for FUZZ_SECONDS. The 25
# slowest tests are listed at the end (CI's log shows where its time goes). It runs on two pytest-xdist workers
# (1,036-1,069 s here against 1,531 s in one process, SUITE_WORKERS=0): under that load the live dashboard's
# stream lags and is closed, which the page now recovers from without losing an alert (fleet/web/app.py)
TEST_WORKERS ?= 2
SUITE_WORKERS ?= 2
test: deb-test $(VENV)/.all lint
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q -n $(SUITE_WORKERS) --dist worksteal --durations=25

# the fast tier: unit tests and every test that needs no exported model, no real data set and no service on
# a port (tests/conftest.py marks those slow / network by the fixtures they use); under a minute, no Debian
# packages (43 s on two workers here, 62 s on one). `make test` above runs everything, the fast tier included,
# and is what .ci/run runs.
test-fast: $(VENV)/.all lint
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow and not network"

FUZZ_SECONDS ?= 60
FUZZ_PARSERS := command manifest signature profile agent_config input_spec broker telemetry
fuzz: $(VENV)/.all
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q -p no:cacheprovider tests/fuzz
	@mkdir -p out/fuzz
	@for p in $(FUZZ_PARSERS); do w=$$(mktemp -d); echo "atheris: $$p for $(FUZZ_SECONDS) s"; \
	  $(PY) tests/fuzz/atheris_fuzz.py $$p -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	    -artifact_prefix=out/fuzz/$$p- -print_final_stats=1 $$w tests/fuzz/corpus/$$p; rc=$$?; rm -rf $$w; \
	  [ $$rc = 0 ] || { echo "atheris: $$p crashed; the input is in out/fuzz/"; exit $$rc; }; done

# the arm64 proof (issue 12): as root on an x86_64 Debian host, the rpi4 kit installed offline and run in a
# Debian bookworm arm64 root under qemu-user; the root is cached in ~/.cache/lepton-edge/arm64-root
test-arm64: deb $(VENV)/.all
	PY=$(abspath $(PY)) scripts/arm64/run.sh

# the issue's emulated footprint figure (bench section `footprint` reads out/arm64-mnv2/result.json): the same
# proof with zoo:mobilenetv2 224x224 int8 TFLite; 20 PNG frames, no video comparison (random weights: near-
# uniform scores), the agent over 1,000 frames. Emulated: about a second per frame on an idle 2-core host.
arm64-mnv2: deb $(VENV)/.all
	rm -rf out/arm64-mnv2-export
	$(PY) -c 'import lepton_edge; lepton_edge.export("zoo:mobilenetv2", target="rpi4", out="out/arm64-mnv2-export", eval_limit=500, measure_latency=False)'
	ARM64_BUNDLE=$(abspath out/arm64-mnv2-export/mobilenetv2-rpi4) ARM64_ONNX=0 ARM64_PNG_FRAMES=20 ARM64_VIDEO_COMPARE=0 \
	  ARM64_AGENT_FRAMES=1000 ARM64_AGENT_TIMEOUT=3600 ARM64_OUT=$(abspath out/arm64-mnv2) PY=$(abspath $(PY)) scripts/arm64/run.sh

bench: deb $(VENV)/.all
	$(PY) bench/run.py

# mutation score (issue 13): mutmut's mutants of the modules whose bugs matter most, each run against that
# module's fast tests in a scratch copy; MUTATION_SAMPLE mutants per module (0: all, hours on 2 cores),
# MUTATION_BUDGET_S seconds per module at most; the table goes into BENCHMARKS.md (section `mutation`)
MUTATION_SAMPLE ?= 30
MUTATION_BUDGET_S ?= 900
mutation: deb-test $(VENV)/.all
	$(PY) bench/mutation_bench.py run --sample $(MUTATION_SAMPLE) --budget $(MUTATION_BUDGET_S)
	$(PY) bench/run.py --only mutation

# CI's guard that the score does not fall (.ci/run): a small fixed-seed sample per module, minutes in all;
# fails when a module kills under 80 % of its sampled mutants (equivalent ones left out)
mutation-check: deb-test $(VENV)/.all
	$(PY) bench/mutation_bench.py run --sample 6 --budget 150 --results out/mutation/ci.json --min-score 0.8

clean:
	rm -rf $(VENV) out build dist *.egg-info
