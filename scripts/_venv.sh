# Sourced by quickstart.sh and test.sh: create (once) and activate the project's virtual environment in
# .venv, with an up-to-date pip. Run from the project root.
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
