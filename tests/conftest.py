import os
from pathlib import Path

import pytest

from mpillm.threads import limit_blas_threads

limit_blas_threads()   # ranks of `mpiexec -n 2 pytest` share the cores: one BLAS thread pool each, not two


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """The real default model (SmolLM2-135M-Instruct Q4_1 GGUF).

    `MPILLM_TEST_MODEL` points at a local copy (GPU machines have no network); otherwise the model is
    fetched into the cache on first use. Skips when neither is possible.
    """
    env = os.environ.get("MPILLM_TEST_MODEL")
    if env:
        p = Path(env)
        if not p.exists():
            pytest.skip(f"MPILLM_TEST_MODEL={env} does not exist")
        return p
    from mpillm.default_model import DefaultModelError, default_model_path
    try:
        return default_model_path()
    except DefaultModelError as e:  # offline machine (GPU hosts): skip, unless told it must be there
        if os.environ.get("MPILLM_REQUIRE_MODEL"):
            raise
        pytest.skip(f"default model unavailable: {e}")


def _script(name: str):
    """scripts/<name>.py as a module (the scripts are not part of the package)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def bench():
    """scripts/bench.py as a module."""
    return _script("bench")


@pytest.fixture(scope="session")
def code_size():
    """scripts/code_size.py as a module."""
    return _script("code_size")
