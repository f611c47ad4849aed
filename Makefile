# Sluice — build, run, test, benchmark, package.
#   make run      build (release) and start the daemon with defaults
#   make deps     test prerequisites: installs nats-server, python3-venv and nodejs/npm (Debian,
#                 as root) when missing, makes target/pyenv (grpcio) for the Python checks and
#                 examples, and runs npm ci in examples/node
#   make test     deps, format check, clippy (warnings are errors), all tests
#   make bench    benchmarks; results go to the terminal (record them in bench/RESULTS.md)
#   make bench-sustained [SCENARIOS="batch unary openloop"]   minutes-long runs: per-second CSV
#                 and a PNG per scenario in target/bench-sustained/ (SLUICE_BENCH_OUT)
#   make sim SEEDS=N / make fuzz CASES=N / make crash-loop ROUNDS=N   longer proof runs

CARGO  ?= cargo
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR  = $(DESTDIR)$(PREFIX)/bin
UNITDIR ?= $(DESTDIR)/etc/systemd/system
TARGET ?= $(shell rustc -vV | sed -n 's/^host: //p')
# Cargo's output directory: CARGO_TARGET_DIR when set, as cargo itself does.
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
ARGS   ?=

.PHONY: all build run deps test lint bench bench-sustained release install install-files clean sim fuzz crash-loop

SEEDS  ?= 2000
CASES  ?= 100000
ROUNDS ?= 100

all: build

build:
	$(CARGO) build --release --locked

run: build
	./target/release/sluice serve $(ARGS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# The NATS tests (tests/nats_client.rs, tests/jetstream_api.rs, tests/jetstream_store.rs,
# tests/migrate.rs and the suites run with SLUICE_TEST_STORE=nats) start real nats-server processes.
# NATS_SERVER=/path/to/nats-server overrides the lookup (PATH, /usr/sbin, /usr/bin).
# The Python client the acceptance check (tests/acceptance_gateways.rs) and the Python examples
# (tests/examples.rs) run, in a local venv.
PYENV = target/pyenv
GRPCIO_VERSION = 1.68.1
# The Node examples (tests/examples.rs): their packages, exactly as package-lock.json pins them,
# from the npm registry into examples/node/node_modules (install scripts off; none is needed).
NODE_EXAMPLES = examples/node

deps:
	@if [ -n "$$NATS_SERVER" ] || command -v nats-server >/dev/null 2>&1 \
	    || [ -x /usr/sbin/nats-server ] || [ -x /usr/bin/nats-server ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "deps: installing nats-server (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nats-server >/dev/null; \
	else \
	  echo "deps: missing nats-server (needed by tests/nats_client.rs and tests/jetstream_api.rs)."; \
	  echo "      Install it (Debian: sudo apt-get install nats-server) or set NATS_SERVER=/path/to/nats-server."; \
	  exit 1; \
	fi
	@if [ -x $(PYENV)/bin/python ] && $(PYENV)/bin/python -c 'import grpc, grpc_tools' 2>/dev/null; then :; \
	else \
	  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "deps: installing python3-venv (apt-get)"; \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null; \
	    else \
	      echo "deps: missing python3 with venv (needed by tests/acceptance_gateways.rs)."; \
	      echo "      Install it (Debian: sudo apt-get install python3-venv)."; \
	      exit 1; \
	    fi; \
	  fi; \
	  echo "deps: making $(PYENV) (grpcio $(GRPCIO_VERSION) from PyPI)"; \
	  rm -rf $(PYENV) && python3 -m venv $(PYENV) \
	    && $(PYENV)/bin/pip install -q grpcio==$(GRPCIO_VERSION) grpcio-tools==$(GRPCIO_VERSION) \
	    || { echo "deps: cannot install grpcio into $(PYENV) (network?)"; exit 1; }; \
	fi
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "deps: installing nodejs and npm (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null; \
	else \
	  echo "deps: missing node and npm (needed by tests/examples.rs for $(NODE_EXAMPLES))."; \
	  echo "      Install Node.js 18 or newer with npm (Debian: sudo apt-get install nodejs npm)."; \
	  exit 1; \
	fi
	@node -e 'process.exit(+process.versions.node.split(".")[0] >= 18 ? 0 : 1)' \
	  || { echo "deps: node $$(node --version) is too old for $(NODE_EXAMPLES) (18 or newer)"; exit 1; }
	@if [ $(NODE_EXAMPLES)/node_modules/.package-lock.json -nt $(NODE_EXAMPLES)/package-lock.json ]; then :; \
	else \
	  echo "deps: npm ci in $(NODE_EXAMPLES) (packages from the npm registry)"; \
	  (cd $(NODE_EXAMPLES) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) \
	    || { echo "deps: npm ci failed in $(NODE_EXAMPLES) (network?)"; exit 1; }; \
	fi

# The black-box suites run twice: on SQLite, and on the JetStream store (each
# test daemon then gets its own nats-server; see tests/common/mod.rs).
NATS_SUITES = --test publish --test subscribe --test admin --test backpressure --test robustness --test telemetry --test delivery_guarantees --test examples

test: deps lint
	$(CARGO) test --locked
	SLUICE_TEST_STORE=nats $(CARGO) test --locked $(NATS_SUITES)

# Longer runs of what `make test` runs in bounded form.
sim:
	SLUICE_SIM_SEEDS=$(SEEDS) $(CARGO) test --locked --lib broker::core::sim -- --nocapture

fuzz:
	SLUICE_FUZZ_CASES=$(CASES) $(CARGO) test --locked --lib fuzz -- --nocapture

crash-loop:
	SLUICE_CRASH_ROUNDS=$(ROUNDS) $(CARGO) test --locked --test crash_loop -- --nocapture

bench: release
	SLUICE_BIN=$(TARGET_DIR)/$(TARGET)/release/sluice $(CARGO) bench --locked
	SLUICE_BIN=$(TARGET_DIR)/$(TARGET)/release/sluice bench/h2load.sh

# Sustained load (issue 15): bench/sustained.rs writes <scenario>.csv (one row per second) into
# SLUICE_BENCH_OUT, then bench/plot_sustained.py draws <scenario>.png beside it with matplotlib
# from a local venv (PyPI, pinned). Lengths: SLUICE_BENCH_SUSTAINED_SECS (batch, unary; default
# 60) and SLUICE_BENCH_OPENLOOP_SECS (default 600). SLUICE_BENCH_DATA_DIR runs batch and unary on
# a (pre-filled) data dir instead of a fresh one; the other settings are in bench/sustained.rs.
SCENARIOS ?= batch unary openloop
SLUICE_BENCH_OUT ?= $(CURDIR)/target/bench-sustained
PLOTENV = target/plotenv
MATPLOTLIB_VERSION = 3.10.9

bench-sustained: release $(PLOTENV)/.matplotlib-$(MATPLOTLIB_VERSION)
	@mkdir -p $(SLUICE_BENCH_OUT)
	@for s in $(SCENARIOS); do \
	  SLUICE_BIN=$(TARGET_DIR)/$(TARGET)/release/sluice SLUICE_BENCH_OUT=$(SLUICE_BENCH_OUT) \
	    $(CARGO) bench --locked --bench sustained -- $$s || exit 1; \
	  [ $$s = fill ] || $(PLOTENV)/bin/python bench/plot_sustained.py $(SLUICE_BENCH_OUT)/$$s.csv || exit 1; \
	done

$(PLOTENV)/.matplotlib-$(MATPLOTLIB_VERSION):
	@if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "bench-sustained: installing python3-venv (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null; \
	  else \
	    echo "bench-sustained: missing python3 with venv (Debian: sudo apt-get install python3-venv)"; \
	    exit 1; \
	  fi; \
	fi
	@echo "bench-sustained: making $(PLOTENV) (matplotlib $(MATPLOTLIB_VERSION) from PyPI)"
	rm -rf $(PLOTENV) && python3 -m venv $(PLOTENV) \
	  && $(PLOTENV)/bin/pip install -q matplotlib==$(MATPLOTLIB_VERSION) \
	  && touch $@

# A stripped, statically linked binary (glibc crt-static) in target/$(TARGET)/release.
release:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --locked --target $(TARGET)
	strip $(TARGET_DIR)/$(TARGET)/release/sluice
	@ls -l $(TARGET_DIR)/$(TARGET)/release/sluice

BIN ?= target/release/sluice

install: build install-files

# Copies an already built $(BIN) and the unit (the unit's ExecStart follows PREFIX).
install-files:
	install -D -m 0755 $(BIN) $(BINDIR)/sluice
	install -D -m 0644 dist/sluice.service $(UNITDIR)/sluice.service
	sed -i 's|/usr/local/bin/sluice|$(PREFIX)/bin/sluice|' $(UNITDIR)/sluice.service

clean:
	$(CARGO) clean
