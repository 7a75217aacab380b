#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest.
# Two pytest workers (one per core of the 2-core reference machine), each test file on one
# worker (module fixtures are built once), and one torch thread per process: most tests launch
# scripts whose time is Python start-up and small tensors, where a second thread on a busy core
# only adds contention.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -rs -n "${TEST_WORKERS:-2}" --dist loadfile tests "$@"
