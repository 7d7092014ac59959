#!/usr/bin/env bash
# Quickstart, step 1 of 2: set up a virtual environment in .venv and run the example batch job on the
# default model (SmolLM2-135M-Instruct, fetched on first use) with 2 MPI ranks. Works without a GPU.
#   scripts/quickstart.sh            # results in out/quickstart.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
# An MPI runtime from PyPI (the mpich wheel) when the machine has none; a system MPI is used as it is.
extras=""
if ! command -v mpiexec >/dev/null 2>&1; then extras="[mpich]"; fi
python -m pip install -q --disable-pip-version-check -e ".${extras}"
mkdir -p out
mpiexec -n 2 mpillm run --prompts examples/prompts.jsonl --output out/quickstart.jsonl --overwrite
echo "results: out/quickstart.jsonl"
head -c 2000 out/quickstart.jsonl
