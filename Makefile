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
# /metrics, Chromium for the web dashboard (driven by Playwright), tmux for the terminal dashboard
DEB_TEST := $(DEB) gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good python3-gi \
            postgresql prometheus chromium tmux

.PHONY: quickstart test test-arm64 fuzz deb deb-test bench clean

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

# the fuzz tier (tests/fuzz: hypothesis over every parser of outside input + the committed corpus) runs
# bounded here, ~10 s in all; `make fuzz` runs it long, then atheris on each parser for FUZZ_SECONDS
test: deb-test $(VENV)/.all
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q

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

bench: deb $(VENV)/.all
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) out build dist *.egg-info
