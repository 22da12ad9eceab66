# Two entry points for a fresh machine (see README): `make quickstart` and `make test`.
# torch is installed as torch==2.13.0, the CPU build on this machine's disk; an open range would pull CUDA.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
DEB    := mosquitto dataset-fashion-mnist
# the tests' RTSP camera: GStreamer's RTSP server, run by the system python3
DEB_TEST := $(DEB) gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good python3-gi

.PHONY: quickstart test deb deb-test bench clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	touch $@

$(VENV)/.export: $(VENV)/.base pyproject.toml
	$(PIP) install -q $(TORCH) -e '.[export,tflite]'
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

quickstart: deb $(VENV)/.export
	$(VENV)/bin/lepton-edge quickstart

test: deb-test $(VENV)/.all
	$(PY) -m pytest -q

bench: deb $(VENV)/.all
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) out build dist *.egg-info
