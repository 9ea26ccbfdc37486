# Entry points: `make demo`, `make test` and `make study` (the comparisons; about an hour on
# 2 CPU cores). Both create .venv and install the pinned
# requirements first (idempotent: a second run reuses the environment).
PY := .venv/bin/python
export TORCH_NUM_THREADS ?=

.PHONY: demo test study venv clean

.venv/.installed: requirements.txt requirements-test.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements-test.txt
	# nilearn is installed only for the MNI152 template files inside its wheel; --no-deps keeps
	# its dependency stack out and the project never imports it.
	.venv/bin/pip install -q --no-deps nilearn==0.14.1
	touch $@

venv: .venv/.installed

demo: venv
	$(PY) demo.py

study: venv
	$(PY) study.py --readme README.md

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf runs demo_data .cache
