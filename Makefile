# Two entry points: `make demo` and `make test`. Both create .venv and install the pinned
# requirements first (idempotent: a second run reuses the environment).
PY := .venv/bin/python
export TORCH_NUM_THREADS ?=

.PHONY: demo test venv clean

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

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf runs demo_data .cache
