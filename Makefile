# Entry points: `make demo`, `make test`, `make study` (the comparisons over three seeds;
# `python study.py --dry-run` lists its stages and the time they should take on 2 CPU cores) and
# `make study-mechanism` (the same at the geometry where the mechanism can be judged).
# Each creates .venv and installs what it needs first (idempotent: a second run reuses the
# environment). The demo and the study need only the runtime requirements; the tests
# and bench.py add their reference peers (MONAI, scikit-image) and Triton's interpreter.
PY := .venv/bin/python
export TORCH_NUM_THREADS ?=

.PHONY: demo test study study-mechanism study-mechanism-160 study-mechanism-3 venv venv-test clean

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	# nilearn is installed only for the MNI152 template files inside its wheel; --no-deps keeps
	# its dependency stack out and the project never imports it.
	.venv/bin/pip install -q --no-deps nilearn==0.14.1
	# blosc2 (the b2nd cache format, cache.py) without its remote-array stack: requirements.txt has
	# the modules its import needs
	.venv/bin/pip install -q --no-deps blosc2==4.12.0
	touch $@

.venv/.installed-test: .venv/.installed requirements-test.txt requirements-peers.txt
	# --no-warn-conflicts: nilearn (template files only, --no-deps) would be reported as incomplete
	.venv/bin/pip install -q --no-warn-conflicts -r requirements-test.txt
	# the official BraTS evaluation: --no-deps, so that its pins cannot move the project's
	.venv/bin/pip install -q --no-deps --no-warn-conflicts -r requirements-peers.txt
	touch $@

venv: .venv/.installed

venv-test: .venv/.installed-test

demo: venv
	$(PY) demo.py --readme README.md --diagnostics docs/training.md

study: venv
	$(PY) study.py --results docs/results.md --readme README.md

# the mechanism at a 2^3 bottleneck grid (roi 64^3), with the option that keeps X_h' personal (no-skips);
# MRI only, resumable like the study (`python study.py ... --dry-run` prints its time estimate); the
# pre-trainings 2 at a time, each on 1 of the 2 cores
study-mechanism: venv
	$(PY) study.py --preset-size mechanism --option no-skips --petct-presets "" --section study-mechanism \
		--out runs/study-mechanism --jobs 2 --pretrain-steps 80 --seg-steps 20 --val-every 10 --transfer-steps 8 \
		--results docs/results.md --readme README.md

# the budget check of study-mechanism's pre-trainings: one seed at twice the steps, mechanism part alone
# one seed at a time (about 65 min each on 2 cores): SEED=1 writes the section study-mechanism-160-seed1
SEED ?= 0
# a one-seed target's section (NAME, or NAME-seedN) and the make command that names it
seed_section = $(1)$(if $(filter-out 0,$(SEED)),-seed$(SEED))
seed_target = $(1)$(if $(filter-out 0,$(SEED)), SEED=$(SEED))
MECH160 = $(call seed_section,study-mechanism-160)
MECH160_MAKE = $(call seed_target,study-mechanism-160)
study-mechanism-160: venv
	$(PY) study.py --preset-size mechanism --option no-skips --petct-presets "" --section $(MECH160) \
		--target "$(MECH160_MAKE)" --out runs/$(MECH160) --part mechanism --seeds $(SEED) --jobs 2 --pretrain-steps 160 \
		--results docs/results.md

# the paper's 3^3 bottleneck grid (roi 96^3, F=12, prior heads 3): the full preset and the baseline, one
# seed at a time (about 65 min each on 2 cores); SEED=1 writes the section study-mechanism-3-seed1
MECH3 = $(call seed_section,study-mechanism-3)
MECH3_MAKE = $(call seed_target,study-mechanism-3)
study-mechanism-3: venv
	$(PY) study.py --preset-size mechanism3 --petct-presets "" --section $(MECH3) \
		--target "$(MECH3_MAKE)" --out runs/$(MECH3) --part mechanism --seeds $(SEED) --jobs 2 --pretrain-steps 80 \
		--results docs/results.md

# the suite over TEST_WORKERS processes, each with its share of the cores (tests/conftest.py)
TEST_WORKERS ?= 2
test: venv-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

clean:
	rm -rf runs demo_data .cache
