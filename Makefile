# The two commands of the README: `make run` (tiny tier pipeline, end to end) and `make test`.
# Each creates or reuses .venv and installs only what pyproject.toml newly asks for.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help run run-imf report test bench clean-runs record exp
TIER ?= tiny

# `make` or `make help`: the targets and what each does (the `##` comments below)
help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  make \1\t/' | expand -t 24
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# the whole tiny tier (every table) through Snakemake; a second call with nothing changed does nothing
run: $(STAMP) ## a tier end to end through Snakemake (TIER=tiny default; cifar10, imagenet)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake --profile workflow/profiles/default --config tier=$(TIER)

# a second target, as its 8 runs do not fit run's budget
run-imf: $(STAMP) ## the iMF ablation (table imf1) on the tiny tier
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake --profile workflow/profiles/default --config tier=tiny tables=imf1

report: $(STAMP) ## results/<tier>/report.html (TIER=tiny default): tables with captions, plots, grids, logs (after make run)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake --profile workflow/profiles/default --config tier=$(TIER) --report results/$(TIER)/report.html

# one worker per core (pytest-xdist), a test file's tests on one worker (they share its module fixtures),
# files with slow tests first (tests/conftest.py);
# the 10 slowest printed at the end. PYTEST_ARGS='-n 0 ...' runs in one process.
test: $(STAMP) ## the test suite (PYTEST_ARGS=... passes options to pytest)
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=10 $(PYTEST_ARGS)

bench: $(STAMP) ## speed and memory ratios (bench/train_step.py)
	$(PY) bench/train_step.py

# run directories no table of the tier reads any more (e.g. an edited ablation's old run): listed;
# DELETE=1 deletes them (and their logs)
clean-runs: $(STAMP) ## list runs/<tier>/ directories no table reads and leftover checkpoints; DELETE=1 deletes them
	$(PY) -m stages.clean --tier $(TIER) $(if $(DELETE),--delete)

# DVC records what Snakemake produced (docs/versioning.md): dvc.lock gets the hashes of the tier's
# outputs, deps and params; nothing reruns. Outputs already hashed are not read again (DVC's state db).
record: ## dvc.lock <- the hashes of what Snakemake produced for TIER (nothing reruns; commit dvc.lock)
	$(PY) -m stages.check --tier $(TIER) >/dev/null   # results/$(TIER)/params.ok: DVC's first stage (Snakemake needs none)
	$(VENV)/bin/dvc commit --force --with-deps --quiet tables-$(TIER)
	$(VENV)/bin/dvc status --with-deps tables-$(TIER)

# e.g. make exp SET='tiers.tiny.train.replicates=5' [EXP_ARGS=--queue]; a value alone: dvc exp run -S
exp: ## a DVC experiment that changes the set of runs, regenerating dvc.yaml (SET='key=value ...', EXP_ARGS=--queue)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) workflow/scripts/exp.py --tier $(TIER) $(foreach s,$(SET),-S '$(s)') $(EXP_ARGS)
