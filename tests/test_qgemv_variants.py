"""The quantized small-M kernel variants that `scripts/bench.py --qgemv` sweeps compile with nvcc for sm_80 and
sm_90 (no GPU needed), so a variant broken by a change to cuda_src/gemv_quant.cu fails here, not on the GPU box."""

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from mpillm.cuda.kernels import CUDA_SRC, nvcc_command

NVCC = shutil.which("nvcc")
ARCHS = ("sm_80", "sm_90")



def _dtype_source() -> str:
    """The ring and L2-hint paths in the other activation / output dtypes and token tilings, which the sweep
    (bf16 only) does not instantiate."""
    src = "#define QGEMV_VARIANTS_ONLY\n" + (CUDA_SRC / "gemv_quant.cu").read_text()
    for t, out, name in (("f16", "f16", "f16_f16"), ("f16", "float", "f16_f32"), ("bf16", "float", "bf16_f32")):
        for fmt, bits, sym in (("8", 8, "false"), ("4", 4, "false"), ("4s", 4, "true")):
            for nt, stages, loop in ((1, 4, "true"), (2, 3, "false"), (4, 0, "false")):
                src += (f"QGEMV_KERNEL_EX({t}, {out}, {name}, {fmt}, {bits}, {sym}, {nt}, 8, 1, 2, true, {stages}, "
                        f"{loop})\n")
    return src


def _compile(tmp_path, name, source, arch):
    src = tmp_path / f"{name}_{arch}.cu"
    src.write_text(source)
    keep = tmp_path / f"keep_{name}_{arch}"
    keep.mkdir()
    cmd = nvcc_command(NVCC, str(src), arch, str(tmp_path / f"{name}_{arch}.cubin")) + ["-keep", "-keep-dir", str(keep)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, keep / f"{name}_{arch}.ptx"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_bench_qgemv_variants_compile(bench, tmp_path):
    ring = [v for v in bench.QGEMV_VARIANTS if v[4]]
    assert ring and all(v[4] >= 2 for v in ring)
    sources = {"variants": bench.qgemv_variant_source(), "dtypes": _dtype_source()}
    jobs = [(name, arch) for name in sources for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: (*job, *_compile(tmp_path, job[0], sources[job[0]], job[1])), jobs))
    failures = [f"{name} ({arch}):\n{log}" for name, arch, rc, log, _ in results if rc != 0]
    assert not failures, "\n\n".join(failures)
    noisy = [f"{name} ({arch}): {log}" for name, arch, rc, log, _ in results if log.strip()]
    assert not noisy, "\n".join(noisy)

    # Every entry point the sweep looks up exists, and keeps the PDL contract (tests/test_cuda_compile.py).
    ptx = next(p for name, arch, *_, p in results if name == "variants" and arch == "sm_90").read_text()
    entries = {part.split("(", 1)[0]: part for part in re.split(r"^\.visible \.entry ", ptx, flags=re.M)[1:]}
    wanted = {f"qgemv{fmt}_v{v}_m{nt}" for fmt, *_ in bench.QGEMV_FORMATS for nt in bench.QGEMV_TILES
              for v in range(len(bench.QGEMV_VARIANTS))}
    assert wanted <= set(entries)
    assert all("griddepcontrol.wait;" in body for body in entries.values())
    # The ring variants really stream through cp.async with the L2::256B hint where asked.
    for v, (*_, l2, stages) in enumerate(bench.QGEMV_VARIANTS):
        body = entries[f"qgemv8_v{v}_m1"]
        assert ("cp.async.cg.shared.global" in body) == (stages > 0)
        assert ("L2::256B" in body) == l2
