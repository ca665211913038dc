# The two commands of the README: `make run` (tiny tier pipeline, end to end) and `make test`.
# Each creates or reuses .venv and installs only what pyproject.toml newly asks for.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run run-imf test bench report
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# the whole tiny tier (every table) through Snakemake; a second call with nothing changed does nothing
run: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake --profile workflow/profiles/default --config tier=tiny

# the iMF ablation (table imf1) on the tiny tier: a second target, as its 8 runs do not fit run's budget
run-imf: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake --profile workflow/profiles/default --config tier=tiny tables=imf1

report: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/snakemake --profile workflow/profiles/default --config tier=tiny --report results/tiny/report.html

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/train_step.py

# DVC records what Snakemake produced (docs/versioning.md): dvc.lock gets the hashes of the tier's
# outputs, deps and params; nothing reruns. Outputs already hashed are not read again (DVC's state db).
TIER ?= tiny
.PHONY: record exp
record:
	$(VENV)/bin/dvc commit --force --with-deps --quiet tables-$(TIER)
	$(VENV)/bin/dvc status --with-deps tables-$(TIER)

# an ablation as a DVC experiment: make exp SET='experiments.p_1p5.meanflow.p=1.2' [EXP_ARGS=--queue]
exp:
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) workflow/scripts/exp.py --tier $(TIER) $(foreach s,$(SET),-S '$(s)') $(EXP_ARGS)
