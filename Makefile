# The two commands: `make demo` (the main job, end to end on a local broker) and `make test`.
# Everything they need is installed here: the venv, Python packages, the Kafka jars (and Java/Maven via
# apt-get when missing, from calmrun.devkafka).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: install kafka tools local-model demo demo-invoices test lint docs bench bench-peers soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

kafka: install
	$(PY) -m calmrun.devkafka fetch

# kcat: one test starts a run from the real kcat CLI, as operators do.
# prometheus: one test lets a real Prometheus scrape a worker and checks PromQL answers (it fails without).
# chromium: tests/ui/ drive the operator page in Debian's Chromium through Playwright (it fails without).
# nftables: tests/faults/ drop packets on a worker's link with nft (packet loss; it fails without).
# apt-get waits up to 10 minutes for the dpkg lock (another apt process, e.g. unattended upgrades), instead
# of failing at once.
APT = apt-get -o DPkg::Lock::Timeout=600
# jaeger: tests/tracing/ export traces to a real Jaeger, built once from its Go module into
# ~/.cache/calmrun/jaeger-1.75.0 (calmrun.devjaeger; Go from apt-get when missing).
# registry: tests/wire/ use a real Schema Registry, Apicurio Registry 2.4.2 built once with Maven into
# ~/.cache/calmrun/apicurio-2.4.2.Final (calmrun.devregistry; Maven from apt-get when missing).
tools: install
	@command -v kcat >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then $(APT) update -q && $(APT) install -y -q kcat; \
	  else echo "kcat missing: sudo apt-get install kcat" >&2; exit 1; fi; }
	@command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then $(APT) update -q && $(APT) install -y -q --no-install-recommends prometheus; \
	  else echo "prometheus missing: sudo apt-get install prometheus" >&2; exit 1; fi; }
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then $(APT) update -q && $(APT) install -y -q chromium; \
	  else echo "chromium missing: sudo apt-get install chromium" >&2; exit 1; fi; }
	@command -v nft >/dev/null || [ -x /usr/sbin/nft ] || { \
	  if [ "$$(id -u)" = 0 ]; then $(APT) update -q && $(APT) install -y -q nftables; \
	  else echo "nft missing: sudo apt-get install nftables" >&2; exit 1; fi; }
	@command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || { \
	  if [ "$$(id -u)" = 0 ]; then $(APT) update -q && $(APT) install -y -q golang-go; \
	  else echo "go missing: sudo apt-get install golang-go" >&2; exit 1; fi; }
	$(PY) -m calmrun.devjaeger build
	@command -v mvn >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then $(APT) update -q && $(APT) install -y -q maven; \
	  else echo "maven missing: sudo apt-get install maven" >&2; exit 1; fi; }
	$(PY) -m calmrun.devregistry build

# The local model of the end-to-end tests (calmrun.devmodel): the first install compiles llama.cpp (about
# 5 minutes on 2 cores); pip's wheel cache makes later installs take seconds.
local-model: install
	$(PY) -m calmrun.devmodel install

# `make demo UI=1`: the operator page (calmrun ui) on http://127.0.0.1:8765/ too, left open until Ctrl-C
demo: kafka
	$(PY) -m calmrun.demo $(if $(UI),--ui)

# loops, maps and agent-chosen routes: the invoice reconciliation example (examples/invoices)
demo-invoices: kafka
	$(PY) -m examples.invoices.demo

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: kafka tools local-model
	@$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran: failing" >&2; exit 1; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check calmrun tests $(wildcard bench)
	$(VENV)/bin/ruff format --check calmrun tests $(wildcard bench)
	$(VENV)/bin/mypy

# The docs site (mkdocs.yml, docs/) into site/; --strict: a warning (a broken link, a nav entry whose page is
# missing) fails the build.
docs: install
	$(PY) -m pip install -q -e '.[dev,docs]'
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# bench/: the numbers in docs/benchmarks.md (python -m bench --help); the bench extra is bench-only
bench: kafka
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench

# calmrun's throughput and latency, then Restate and DBOS on the same workload in the same run (bench/peers/:
# installs restate-server from npm, restate-sdk and dbos from PyPI into .calmrun/peers/, PostgreSQL via apt-get)
bench-peers: kafka
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench --only throughput --only latency --peers --out bench/results/peers

# The soak (bench/soak.py): 20 minutes of steady triage load on a local three-node cluster, sampling RSS,
# open descriptors and lag each minute, the history checker at the end; figures in bench/results/soak/.
# tests/faults/test_soak.py runs a 3-minute version in `make test`.
soak: kafka
	$(PY) -m bench.soak --minutes 20 --out bench/results/soak

clean:
	rm -rf $(VENV) .calmrun build dist site *.egg-info
