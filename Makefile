# `make test` and `make demo` install first, so each works on a fresh machine by itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench bench-pipeline clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# The main job on the embedded default: local Ray, embedded Redis, the toy model. Results: runs/demo/.
demo: install
	$(BIN)/python -m cluster.train --config configs/toy.yaml --overwrite run.name=demo $(ARGS)

bench-pipeline: install
	$(BIN)/python -m bench.pipeline --json

bench: install
	$(BIN)/python -m bench.streaming --json

clean:
	rm -rf $(VENV) build *.egg-info
