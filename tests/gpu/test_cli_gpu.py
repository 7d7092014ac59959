"""`mpillm run --device cuda` end to end (subprocess), on one GPU and on two with --tp 2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "prompts.jsonl"


def clean_env(**extra):
    """This pytest process may itself be an MPI singleton (pytest-mpi imports mpi4py): a launcher started
    from it must not inherit its MPI/PMIx identity, or the new job's ranks wait for a parent that never calls."""
    identity = ("OMPI_COMM_WORLD_", "OMPI_UNIVERSE_SIZE", "OMPI_MCA_orte_hnp_uri", "OMPI_MCA_ess_base_",
                "OMPI_MCA_orte_ess_", "PMIX_RANK", "PMIX_NAMESPACE", "PMIX_SERVER_", "PMI_RANK", "PMI_SIZE", "PMI_FD",
                "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    # Only a launched rank's identity goes; site settings (OMPI_MCA_plm_rsh_agent and the like) stay.
    env = {k: v for k, v in os.environ.items() if not k.startswith(identity)}
    env.update(extra)
    return env


def run(args, ranks=None, **env):
    cmd = [sys.executable, "-m", "mpillm", "run", *map(str, args)]
    if ranks:
        launcher = os.environ.get("MPIRUN", shutil.which("mpiexec") or "mpiexec").split()
        cmd = [*launcher, "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=clean_env(**env))


def answers(path):
    out = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if "custom_id" in r:
            out[r["custom_id"]] = r["response"]["body"]["choices"][0]["message"]["content"]
        else:
            out[r["id"]] = r["text"]
    return out


def test_run_cuda_single_and_tp2(cuda_device, smollm_gguf, tmp_path):
    out = tmp_path / "gpu.jsonl"
    p = run(["--model", smollm_gguf, "--prompts", EXAMPLES, "--output", out, "--device", "cuda"])
    assert p.returncode == 0, p.stderr[-3000:]
    got = answers(out)
    assert len(got) == len(EXAMPLES.read_text().splitlines())
    assert "Paris" in got["capital"]
    import pycuda.driver as cuda
    if cuda.Device.count() < 2:
        pytest.skip("one GPU: --tp 2 not run")
    out2 = tmp_path / "tp2.jsonl"
    p = run(["--model", smollm_gguf, "--prompts", EXAMPLES, "--output", out2, "--device", "cuda", "--tp", "2"], ranks=2)
    assert p.returncode == 0, p.stderr[-3000:]
    tp2 = answers(out2)
    assert set(tp2) == set(got) and "Paris" in tp2["capital"]
    # Two replicas of one GPU each: every id answered once.
    out3 = tmp_path / "dp2.jsonl"
    p = run(["--model", smollm_gguf, "--prompts", EXAMPLES, "--output", out3, "--device", "cuda", "--tp", "1"], ranks=2)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = Path(out3).read_text().splitlines()
    assert len(lines) == len(got) and set(answers(out3)) == set(got)


def test_tp2_rank_failure_inside_nccl_ends_every_rank(cuda_device, smollm_gguf, tmp_path):
    """A rank that raises (or dies) while its peer waits in an NCCL all-reduce: every rank ends, quickly."""
    import time

    import pycuda.driver as cuda
    if cuda.Device.count() < 2:
        pytest.skip("needs 2 GPUs")
    rows = "".join(json.dumps({"id": f"r{i}", "prompt": f"Count to {i}:", "max_tokens": 64}) + "\n" for i in range(8))
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(rows)
    t = time.time()
    launcher = os.environ.get("MPIRUN", shutil.which("mpiexec") or "mpiexec").split()
    if "-x" in launcher:
        launcher += ["-x", "MPILLM_FAIL_AT"]
    p = subprocess.run([*launcher, "-n", "2", sys.executable, "-m", "mpillm", "run", "--model", str(smollm_gguf),
                        "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"), "--device", "cuda",
                        "--tp", "2"], capture_output=True, text=True, timeout=240, env=clean_env(MPILLM_FAIL_AT="1:5"))
    assert p.returncode != 0
    assert "rank 1 of 2 failed while" in p.stderr, p.stderr[-3000:]
    assert time.time() - t < 240
