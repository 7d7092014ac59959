"""Every cuda_src/*.cu compiles with nvcc for sm_80 and sm_90, as PyCUDA will compile it (no GPU needed), and
every kernel keeps the programmatic-dependent-launch contract of cuda_src/common.cuh."""

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from mpillm.cuda.kernels import CUDA_SRC, kernel_sources, nvcc_command

NVCC = shutil.which("nvcc")
ARCHS = ("sm_80", "sm_90")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_every_kernel_file_compiles(tmp_path, code_size):
    sources = kernel_sources()
    assert {"embedding", "norm", "rope_kv", "activation", "gemv", "gemm", "attention_prefill",
            "attention_decode", "sampling", "gemv_quant", "allreduce"} <= set(sources)

    def compile_one(job):
        name, arch = job
        # Same text PyCUDA writes to its temp kernel.cu; includes resolve through -I cuda_src.
        src = tmp_path / f"{name}_{arch}.cu"
        src.write_text(sources[name])
        cmd = nvcc_command(NVCC, str(src), arch, str(tmp_path / f"{name}_{arch}.cubin"))
        if arch == "sm_90":  # keep the PTX for the PDL check below (no extra compile)
            keep = tmp_path / f"keep_{name}"
            keep.mkdir()
            cmd += ["-keep", "-keep-dir", str(keep)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return name, arch, proc.returncode, proc.stdout + proc.stderr

    jobs = [(name, arch) for name in sources for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, jobs))
    failures = [f"{name} ({arch}):\n{log}" for name, arch, rc, log in results if rc != 0]
    assert not failures, "\n\n".join(failures)
    # PyCUDA turns any compiler chatter into a warning at startup; keep the build silent.
    noisy = [f"{name} ({arch}): {log}" for name, arch, rc, log in results if log.strip()]
    assert not noisy, "\n".join(noisy)
    assert CUDA_SRC.is_dir()

    # The decode graph links our kernels with programmatic edges (mpillm/cuda/graphs.py): a kernel that
    # never executes griddepcontrol.wait could read its input before the kernel that writes it has
    # finished. Every entry point must wait, so check each one in the sm_90 PTX.
    entries = {}
    for name in sources:
        ptx = (tmp_path / f"keep_{name}" / f"{name}_sm_90.ptx").read_text()
        for part in re.split(r"^\.visible \.entry ", ptx, flags=re.M)[1:]:
            entries[part.split("(", 1)[0]] = part
    assert len(entries) > 100, sorted(entries)
    assert any(k.startswith("gemv_bf16_bf16_m") for k in entries)
    # Every decode attention kernel the launcher may name exists (kernels.decode_kernel_suffix picks "_occ",
    # kernels.decode_uses_cluster the cluster kernels, which only the sm_90 build has).
    from mpillm.cuda.kernels import ATTN_HEAD_DIMS, DECODE_CLUSTER_GROUPS, DECODE_GROUPS, DECODE_OCC_GROUPS
    decode = {f"attention_decode_{dt}_hd{hd}_g{g}{suffix}" for dt in ("bf16", "f16") for hd in ATTN_HEAD_DIMS
              for g in DECODE_GROUPS for suffix in ("", "_occ") if suffix == "" or g in DECODE_OCC_GROUPS}
    decode |= {f"attention_decode_cluster_{dt}_hd{hd}_g{g}" for dt in ("bf16", "f16") for hd in ATTN_HEAD_DIMS
               for g in DECODE_CLUSTER_GROUPS}
    assert decode == {k for k in entries if k.startswith("attention_decode_")}
    # The one-token _x1 kernels (kernels.Kernels._takes_x1: int8, Q4_0 and Q4_1) and their pre-norm twins (_x1n),
    # all that the launcher can name and no others.
    from mpillm.cuda.kernels import QGEMV_X1_FORMATS
    assert QGEMV_X1_FORMATS == ("8", "4s", "4")
    x1 = {f"qgemv{fmt}{sw}_bf16_{out}_x1" for fmt in QGEMV_X1_FORMATS for sw in ("", "_swiglu")
          for out in ("bf16", "f32")}
    x1 |= {f"qgemv{fmt}_rope_bf16_x1{n}" for fmt in QGEMV_X1_FORMATS for n in ("", "n")}
    x1 |= {f"qgemv{fmt}_swiglu_bf16_bf16_x1n" for fmt in QGEMV_X1_FORMATS}
    x1 |= {"qgemv8_send_bf16_x1", "qgemv4s_send_bf16_x1"}            # the row-parallel projections' send twins
    assert x1 == {k for k in entries if re.search(r"_x1n?$", k)}
    # bf16's pre-norm twins (kernels.Kernels._gemv with prenorm: the 8-warp one-token kernel), and no others.
    assert {k for k in entries if k.endswith("_m1n")} == {"gemv_swiglu_bf16_bf16_m1n", "gemv_rope_bf16_m1n"}
    missing = sorted(k for k, body in entries.items() if "griddepcontrol.wait;" not in body)
    assert not missing, f"kernels without pdl_wait() (griddepcontrol.wait): {missing}"
    no_trigger = sorted(k for k, body in entries.items() if "griddepcontrol.launch_dependents;" not in body)
    assert not no_trigger, f"kernels without pdl_launch_dependents(): {no_trigger}"

    # scripts/code_size.py reads each kernel's machine code size from the cubins' sections: every entry point has a
    # .text section there, of whole 16-byte instructions, and the report sums what it lists.
    cubins = {name: (tmp_path / f"{name}_sm_90.cubin").read_bytes() for name in sources}
    sizes = {fn: size for cubin in cubins.values() for fn, size in code_size.text_sizes(cubin).items()}
    assert set(entries) <= set(sizes), sorted(set(entries) - set(sizes))
    assert all(size > 0 and size % 16 == 0 for fn, size in sizes.items() if fn in entries)
    layer = ["^qgemv4s_bf16_bf16_x1d$", "^qgemv4s_swiglu_bf16_bf16_x1n$"]
    lines = code_size.report(cubins, layer).splitlines()
    want = sizes["qgemv4s_bf16_bf16_x1d"] + sizes["qgemv4s_swiglu_bf16_bf16_x1n"]
    assert len(lines) == 3 and lines[-1].split()[0] == f"{want:,d}", lines


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_the_trace_build_compiles_and_stamps_every_kernel(tmp_path):
    """bench.py --timeline's build (-DMPILLM_TRACE, mpillm/cuda/trace.py): every file compiles for sm_90, every
    entry point stamps its wait (%globaltimer), the projection, decode attention and sampling kernels their ends too,
    and each module has the constant the host points at the records (mpillm_trace, 24 bytes, as Tracer writes it)."""
    sources = kernel_sources()

    def compile_one(name):
        src = tmp_path / f"{name}.cu"
        src.write_text(sources[name])
        keep = tmp_path / f"keep_{name}"
        keep.mkdir()
        cmd = nvcc_command(NVCC, str(src), "sm_90", str(tmp_path / f"{name}.cubin")) + ["-DMPILLM_TRACE", "-keep",
                                                                                         "-keep-dir", str(keep)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return name, proc.returncode, proc.stdout + proc.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, sources))
    failures = [f"{name}:\n{log}" for name, rc, log in results if rc != 0 or log.strip()]
    assert not failures, "\n\n".join(failures)
    entries = {}
    for name in sources:
        ptx = (tmp_path / f"keep_{name}" / f"{name}.ptx").read_text()
        assert re.search(r"^\.const \.align 8 \.b8 mpillm_trace\[24\];", ptx, flags=re.M), name
        for part in re.split(r"^\.visible \.entry ", ptx, flags=re.M)[1:]:
            entries[part.split("(", 1)[0]] = part
    unstamped = sorted(k for k, body in entries.items() if body.count("%globaltimer") < 2)
    assert not unstamped, f"kernels without the wait's two stamps: {unstamped}"
    ends = [k for k, body in entries.items() if body.count("%globaltimer") >= 3]
    assert {"qgemv4s_bf16_bf16_x1d", "gemv_bf16_f32_m1", "attention_decode_cluster_bf16_hd128_g4", "sample_f32",
            "argmax_f32"} <= set(ends), sorted(ends)[:5]
