# Quichex: two commands on a fresh Debian machine.
#   make demo   installs what is missing, builds, runs the echo demo on loopback
#   make test   installs what is missing, builds, runs every test and gate
#   make soak   the soak and abuse suite at full size (10 minutes at most)
#   make valgrind  the NIF crate's tests under valgrind memcheck
#   make fuzz      AFL++ on the NIF's parsing of peer bytes (FUZZ_SECONDS per target)
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
export MIX_ENV ?= test
export LANG := C.UTF-8
export LC_ALL := C.UTF-8
export ERL_AFLAGS ?= +S 2:2

CRATE := native/quichex_nif
VENV := _build/venv
QUINN_PEER := integration/peers/quinn_peer/target/release/quinn_peer
export QUICHEX_PYTHON := $(CURDIR)/$(VENV)/bin/python
export QUICHEX_QUINN_PEER := $(CURDIR)/$(QUINN_PEER)
APT_PACKAGES := elixir erlang-dev erlang-proper erlang-dialyzer erlang-os-mon cmake libclang-dev clang g++ make python3-venv openssl ngtcp2-client ngtcp2-server

.PHONY: all deps deps-system deps-rust deps-python deps-peers quinn-peer build demo test test-elixir test-rust gates dialyzer interop soak bench clean valgrind deps-valgrind fuzz fuzz-short deps-fuzz

FUZZ_SECONDS ?= 60

all: build

## deps: install the system packages, the Rust toolchain check and the Python peers
deps: deps-system deps-rust

deps-system:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then echo "==> system packages: all present"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "==> installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	else \
	  echo "Not a Debian machine. Install these (names are Debian's):$$missing"; \
	  echo "  Elixir >= 1.14 with Erlang/OTP >= 25 (erl_interface headers, PropEr, dialyzer), cmake, a C/C++ compiler, libclang."; \
	  exit 1; \
	fi

deps-rust:
	@command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust from https://rustup.rs (rustup default stable)"; exit 1; }

deps-python: $(VENV)/.installed

$(VENV)/.installed: integration/requirements.txt
	@echo "==> python venv with aioquic in $(VENV)"
	@python3 -m venv $(VENV)
	@$(VENV)/bin/pip install -q --disable-pip-version-check -r integration/requirements.txt
	@touch $@

## deps-peers: the foreign QUIC stacks the integration tests talk to
deps-peers: deps-python quinn-peer

quinn-peer: deps
	cd integration/peers/quinn_peer && cargo build --release --locked --quiet

build: deps
	mix compile --warnings-as-errors

demo: export MIX_ENV := dev
demo: deps
	mix compile
	mix run examples/echo.exs

gates: deps
	mix format --check-formatted
	mix compile --warnings-as-errors --force
	cd $(CRATE) && cargo fmt --check
	cd $(CRATE) && cargo clippy --release --all-targets --locked -- -D warnings
	cd integration/peers/quinn_peer && cargo fmt --check
	cd bench/quiche_baseline && cargo fmt --check
	cd fuzz && cargo fmt --check

## dialyzer: Debian's erlang-dialyzer on the compiled lib/ modules, zero warnings.
# The PLT holds the OTP and Elixir applications lib/ calls (mix: for Mix
# tasks under lib/mix); it is built once under _build/plt (a few minutes),
# named by the OTP and Elixir versions and the application list, and rebuilt
# when missing; dialyzer refreshes it when those files change. The modules
# checked are every beam of the app except test/support's (compiled into the
# app when MIX_ENV=test: Quichex.Test.* and its :telemetry stand-in).
# Warnings, beyond dialyzer's defaults:
#   -Wunmatched_returns  a discarded {:error, _} or other union result (an
#                        ignored result must be written `_ = ...`, with a reason)
#   -Werror_handling     functions that only raise, without a no_return() spec
#   -Wextra_return       a @spec return type the function never returns
#   -Wmissing_return     a function that returns more than its @spec says
#   -Wunknown            calls to modules/functions missing from the PLT or lib
# Not used: -Wunderspecs/-Woverspecs/-Wspecdiffs compare each @spec with the
# inferred typing and flag deliberate API contracts (e.g. an error code
# specced as non_neg_integer() rather than the literal 258).
DIALYZER_APPS := erts kernel stdlib crypto public_key asn1
DIALYZER_ELIXIR_APPS := elixir logger mix
DIALYZER_FLAGS := -Wunmatched_returns -Werror_handling -Wextra_return -Wmissing_return -Wunknown

dialyzer: build
	@set -eo pipefail; \
	elixir_lib=$$(elixir -e 'IO.write(Path.expand("..", :code.lib_dir(:elixir)))'); \
	otp=$$(cat "$$(erl -noshell -eval 'io:format("~s", [code:root_dir()]), halt().')/releases/$$(erl -noshell -eval 'io:format("~s", [erlang:system_info(otp_release)]), halt().')/OTP_VERSION"); \
	ex=$$(elixir -e 'IO.write(System.version())'); \
	apps=$$(echo "$(DIALYZER_APPS) $(DIALYZER_ELIXIR_APPS)" | cksum | cut -d' ' -f1); \
	plt=_build/plt/quichex-otp$$otp-elixir$$ex-$$apps.plt; \
	if [ ! -f "$$plt" ]; then \
	  echo "==> building the dialyzer PLT $$plt (once, a few minutes)"; \
	  mkdir -p _build/plt; \
	  dialyzer -pa "$$elixir_lib/elixir/ebin" --build_plt --output_plt "$$plt.tmp" \
	    --apps $(DIALYZER_APPS) $(foreach a,$(DIALYZER_ELIXIR_APPS),"$$elixir_lib/$(a)/ebin") >/dev/null || \
	    { s=$$?; [ $$s -eq 2 ] || exit $$s; }; \
	  mv "$$plt.tmp" "$$plt"; \
	fi; \
	beams=$$(ls _build/$(MIX_ENV)/lib/quichex/ebin/*.beam | grep -v -e '/Elixir\.Quichex\.Test\.' -e '/telemetry\.beam$$'); \
	echo "==> dialyzer: $$(echo "$$beams" | wc -l) modules of lib/"; \
	dialyzer -pa "$$elixir_lib/elixir/ebin" --plt "$$plt" $(DIALYZER_FLAGS) $$beams

test-rust: deps
	cd $(CRATE) && cargo test --release --locked

# --cover: lib/'s line coverage, printed per module; below the threshold in
# mix.exs (test_coverage) the run fails.
test-elixir: deps deps-peers
	mix test --cover

test: gates dialyzer test-rust test-elixir

interop: deps deps-peers
	mix test integration

## soak: the soak and abuse suite (soak/, issue 15) at full size, with the
## API property at ten times its cases; loopback only, killed after 10 minutes.
## `make test` runs the same tests in a short form (QUICHEX_SOAK unset).
## Then the fuzz targets briefly (fuzz-short: 10 s each; their first
## instrumented build of quiche takes a while, once).
soak: export QUICHEX_SOAK := full
soak: deps
	mix compile
	timeout --kill-after=10 600 mix test soak test/quichex/api_safety_test.exs
	$(MAKE) fuzz-short

## valgrind: every test executable of `cargo test --release` in the NIF crate
## (unit tests and the quiche patch regression tests) under valgrind memcheck;
## fails on any error or leak (definite, indirect or possible). Logs in
## _build/valgrind/.
deps-valgrind:
	@command -v valgrind >/dev/null 2>&1 || $(MAKE) deps-system APT_PACKAGES=valgrind

valgrind: deps deps-valgrind
	nice native/valgrind/run.sh

## fuzz: AFL++ (cargo-afl, stable Rust) on each target in fuzz/ for
## FUZZ_SECONDS (default 60) seconds; fuzz-short: 10 s each, for make soak.
deps-fuzz: deps
	@command -v cargo-afl >/dev/null 2>&1 || cargo install cargo-afl --locked --version 0.18.2

fuzz: deps-fuzz
	nice fuzz/run.sh $(FUZZ_TARGETS)

fuzz-short: deps-fuzz
	FUZZ_SECONDS=10 nice fuzz/run.sh $(FUZZ_TARGETS)

clean:
	rm -rf _build priv/native
	cd $(CRATE) && cargo clean
	cd fuzz && cargo clean
	cd integration/peers/quinn_peer && cargo clean

## bench: raw quiche vs Quichex, 3 runs per scenario (see bench/bench.exs)
bench: export MIX_ENV := prod
# 100,000 idle connections (--idle 100000) are 200,000 processes.
bench: export ELIXIR_ERL_OPTIONS := +P 1048576
bench: deps
	mix compile
	mix run bench/bench.exs -- $(BENCH_ARGS)
