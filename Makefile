# Fieldgate: two commands on a fresh machine, `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config.yaml

.PHONY: run test test-stress lint check bench mutation clean mosquitto chromium rabbitmq test-tools proto

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/fieldgate run -c $(CONFIG)

check: $(VENV)/.installed
	$(BIN)/fieldgate check -c $(CONFIG)

# The store-and-forward tests run a real Mosquitto upstream. Installed once from Debian; the check
# is by PATH (and /usr/sbin), not a stamp file, so a fresh machine with an old work tree still gets it.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then exit 0; fi; \
	set -e; \
	echo "installing Debian's mosquitto for the test suite"; \
	$(SUDO) apt-get update -q; \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mosquitto; \
	if [ -d /run/systemd/system ] && systemctl is-active --quiet mosquitto; then \
		echo "stopping the system mosquitto service: the demo broker uses 1883"; \
		$(SUDO) systemctl disable --now mosquitto; \
	elif [ ! -d /run/systemd/system ] && [ -x /etc/init.d/mosquitto ] && /etc/init.d/mosquitto status >/dev/null 2>&1; then \
		echo "stopping the mosquitto init script's daemon: the demo broker uses 1883"; \
		$(SUDO) /etc/init.d/mosquitto stop; \
		$(SUDO) update-rc.d mosquitto disable >/dev/null 2>&1 || true; \
	fi

# The cluster test (tests/cluster/) runs real RabbitMQ nodes with their MQTT plugin, started by tests/rabbitmq.py as
# the current user on free loopback ports with an epmd of their own. Installed once from Debian like mosquitto (checked
# by the scripts' path, not a stamp file). The package's own service is stopped and disabled, and the epmd it brought
# up on 4369 stopped: the tests need neither, and a stray node would hold 5672 and 25672.
RABBITMQ_SERVER := /usr/lib/rabbitmq/bin/rabbitmq-server

rabbitmq:
	@if [ -x $(RABBITMQ_SERVER) ] && command -v epmd >/dev/null 2>&1; then exit 0; fi; \
	set -e; \
	echo "installing Debian's rabbitmq-server for the cluster test"; \
	epmd_before=no; if command -v epmd >/dev/null 2>&1 && epmd -names >/dev/null 2>&1; then epmd_before=yes; fi; \
	$(SUDO) apt-get update -q; \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends rabbitmq-server; \
	if [ -d /run/systemd/system ]; then \
		echo "stopping and disabling the system rabbitmq-server service: the tests start their own nodes"; \
		$(SUDO) systemctl disable --now rabbitmq-server || true; \
	elif [ -x /etc/init.d/rabbitmq-server ]; then \
		$(SUDO) /etc/init.d/rabbitmq-server stop >/dev/null 2>&1 || true; \
		$(SUDO) update-rc.d rabbitmq-server disable >/dev/null 2>&1 || true; \
	fi; \
	if [ "$$epmd_before" = no ] && epmd -names >/dev/null 2>&1; then \
		echo "stopping the epmd the package started on 4369: the tests run their own"; \
		if [ -d /run/systemd/system ]; then $(SUDO) systemctl stop epmd.socket epmd.service || true; \
		else $(SUDO) epmd -kill >/dev/null 2>&1 || true; fi; \
	fi

# The status page's browser test renders it in headless Chromium (Debian's; playwright's CDN downloads
# are not needed). Like mosquitto: checked by PATH, installed once when no chromium binary is found.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi; \
	set -e; \
	echo "installing Debian's chromium for the status page's browser test"; \
	$(SUDO) apt-get update -q; \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium

# Debian tools the tests run for real, as command:package: strace (the durability test reads the kernel's
# fsyncs), shellcheck (install.sh's lint), systemd-analyze (the unit file's check), stress-ng (make
# test-stress), mbpoll (a Modbus TCP client on libmodbus, apart from pymodbus, against the gateway's server).
# Each is checked by PATH and installed once if missing; under CI=true a test that lacks
# one fails instead of skipping (tests/conftest.py).
TEST_TOOLS := strace:strace shellcheck:shellcheck systemd-analyze:systemd stress-ng:stress-ng mbpoll:mbpoll

test-tools:
	@missing=""; for t in $(TEST_TOOLS); do command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	set -e; \
	echo "installing Debian's$$missing for the test suite"; \
	$(SUDO) apt-get update -q; \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing

# The Sparkplug tests decode what the gateway publishes with an independent implementation (pysparkplug), which
# needs paho-mqtt<2: it lives in a venv of its own (tests/sparkplug/independent/README.md).
SPB_VENV := .venv-sparkplug
SPB_REQS := tests/sparkplug/independent/requirements.txt

$(SPB_VENV)/.installed: $(SPB_REQS)
	$(PY) -m venv $(SPB_VENV)
	$(SPB_VENV)/bin/pip install -q -r $(SPB_REQS)
	touch $@

# Two test processes (pytest-xdist): most tests wait on sockets, lines and deadlines, so two share the
# cores well; TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2

test: $(VENV)/.installed-test $(SPB_VENV)/.installed mosquitto chromium rabbitmq test-tools
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# Style, types and layers (.ci/run runs it beside make test): ruff on every Python file of the project, mypy (strict
# on drivers/ and bridge/, see pyproject.toml), and import-linter's contracts: a new import that breaks the layout of
# shared/ARCHITECTURE.md (drivers and bridge apart, only the shared kernel of gateway below them, no cycles) fails.
LINT_PATHS := gateway drivers bridge hil tests

lint: $(VENV)/.installed-test
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy
	$(BIN)/lint-imports

# The whole suite with both cores busy (stress-ng --cpu 2 beside it), as on a shared CI machine: it must pass.
test-stress: $(VENV)/.installed-test $(SPB_VENV)/.installed mosquitto chromium rabbitmq test-tools
	@stress-ng --cpu 2 --timeout 3600s --quiet & stress=$$!; \
	trap 'kill $$stress 2>/dev/null; wait $$stress 2>/dev/null' EXIT; \
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# Mutation testing of the core (hil/mutation/; not part of make test: it is slow, see the README).
$(VENV)/.installed-mutation: pyproject.toml $(VENV)/.installed-test
	$(BIN)/pip install -q -e '.[test,mutation]'
	touch $@

mutation: $(VENV)/.installed-mutation
	$(BIN)/python hil/mutation/run.py $(MUTATION_ARGS)

# Every benchmark, one table (hil/bench/suite.py; ~7 minutes here). Full reports land in var/bench/<time>/.
bench: $(VENV)/.installed-test mosquitto
	$(BIN)/python hil/bench/suite.py $(BENCH_ARGS)

# The Sparkplug B payload module is protoc's output, checked in: regenerate it after editing the .proto. protoc comes
# from grpcio-tools in a venv of its own (the gateway needs only the protobuf runtime); its version sets the
# runtime the generated module asks for (protobuf>=7.35.1 in pyproject.toml).
PROTO_VENV := var/protoc-venv
PROTO_DIR := bridge/sparkplug

proto:
	@[ -x $(PROTO_VENV)/bin/python ] || $(PY) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/pip install -q grpcio-tools==1.85.4
	cd $(PROTO_DIR) && $(CURDIR)/$(PROTO_VENV)/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. sparkplug_b.proto

clean:
	rm -rf $(VENV) $(SPB_VENV) var .pytest_cache .hypothesis
