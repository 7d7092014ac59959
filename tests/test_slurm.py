"""The Slurm templates: valid bash, and they keep the promises the README makes (signal, requeue, resume)."""

import re
import subprocess
from pathlib import Path

import pytest

SLURM = sorted((Path(__file__).resolve().parents[1] / "scripts" / "slurm").glob("*.sbatch"))


def test_there_are_single_and_multi_node_templates():
    assert {p.name for p in SLURM} >= {"single_node.sbatch", "multi_node.sbatch"}


@pytest.mark.parametrize("path", SLURM, ids=lambda p: p.name)
def test_template_is_valid_and_resumable(path):
    text = path.read_text()
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+", text, re.M), "warn the batch script before the time limit"
    assert re.search(r"^#SBATCH --requeue", text, re.M)
    assert "srun" in text and "mpillm run" in text and "--resume" in text
    assert "trap" in text and "USR1" in text and "scontrol requeue" in text
    assert "[ $rc -eq 75 ]" in text          # the documented preemption exit code triggers the requeue
