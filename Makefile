# Every target runs inside the pinned runtime (scripts/runtime builds it on first use).
RUNTIME := scripts/runtime
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one per core, at most 4 (each holds its own TensorFlow); the tests
# of one file share a process, so a module's fixtures are built once.
TEST_WORKERS ?= $(shell n=$$(nproc); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST := python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup run test test-fast lock clean

setup:  ## build the runtime once (a no-op when it exists)
	@scripts/setup-runtime >/dev/null && echo "runtime ready: $$(scripts/setup-runtime)"

run: setup  ## the main job: food-kitchen -> baseline and cross-domain model through the TFX pipeline -> side by side, report -> serve, A/B
	$(RUNTIME) env PYTHONUNBUFFERED=1 xdctr demo --workdir outputs/demo

test: setup  ## unit tests and the end-to-end test
	$(RUNTIME) env PYTHONUNBUFFERED=1 $(PYTEST) $(PYTEST_ARGS) tests

test-fast: setup  ## the tests without the slow ones (pipelines, JAX, fine-tuning): for development
	$(RUNTIME) env PYTHONUNBUFFERED=1 $(PYTEST) -m "not slow" $(PYTEST_ARGS) tests

lock:  ## re-resolve runtime/requirements.in into requirements.lock (inside the current runtime)
	$(RUNTIME) scripts/lock

clean:
	rm -rf outputs
