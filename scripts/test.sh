#!/usr/bin/env bash
# Quickstart, step 2 of 2: set up .venv with the test dependencies and run the whole test suite:
# the single-process tests, then the MPI tests under `mpiexec -n 2 pytest --with-mpi`.
# GPU tests skip cleanly without a GPU; CUDA sources are still compiled when nvcc is present.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
# torch (CPU) and transformers are test-only: they are the reference the NumPy backend must match.
python -m pip install -q --disable-pip-version-check -e ".[test,mpich]" "torch==2.13.0"

run() {  # pytest exits 5 when it collected no test: that is a broken suite, not a pass
  set +e; "$@"; rc=$?; set -e
  if [ $rc -eq 5 ]; then echo "error: no tests ran: $*" >&2; exit 1; fi
  if [ $rc -ne 0 ]; then exit $rc; fi
}
run python -m pytest -q -ra "$@"
run mpiexec -n 2 python -m pytest --with-mpi --only-mpi -q -ra -p no:cacheprovider tests/test_mpi.py
