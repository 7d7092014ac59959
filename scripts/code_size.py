#!/usr/bin/env python3
"""The machine code size of our kernels: the bytes of each function's .text section in the cubins nvcc builds
from cuda_src (16 bytes an instruction on sm_70 and later), no GPU and no cuobjdump needed.

Why: a decode layer runs a handful of kernels, and the weights streamed between two launches of one of them evict
its code from L2; when a layer's kernels together outgrow an SM's instruction cache, every launch fetches its code
again. One kernel for a layer's o projection and MLP (95 KB of code) made the layer's other kernels slower beside it
(docs/PERFORMANCE.md, twenty-first session). This prints what a set of kernels weighs.

Usage, from the project root:
    python scripts/code_size.py [--arch sm_90] [--cubin FILE [--cubin FILE ...]] [PATTERN ...]
Without --cubin it compiles every cuda_src/*.cu as PyCUDA would (kernels.nvcc_command). PATTERNs are regular
expressions searched in function names (all functions without one); each match is printed with its size, then
the total. Example, Llama-3-8B Q4_0 at one token on one GPU (one layer's kernels):
    python scripts/code_size.py '^qgemv4s_rope_bf16_x1n$' '^attention_decode_cluster_bf16_hd128_g4$' \\
        '^qgemv4s_bf16_bf16_x1d$' '^qgemv4s_swiglu_bf16_bf16_x1n$'
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

INSTRUCTION_BYTES = 16


def text_sizes(cubin: bytes) -> dict[str, int]:
    """{function name: bytes of its .text section} of a cubin (ELF64, little-endian). ValueError on anything else."""
    if len(cubin) < 64 or cubin[:4] != b"\x7fELF" or cubin[4] != 2 or cubin[5] != 1:
        raise ValueError("not a little-endian ELF64 cubin")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    if shentsize < 64 or shoff + shnum * shentsize > len(cubin) or shstrndx >= shnum:
        raise ValueError("cubin: section header table out of bounds")

    def header(i: int) -> tuple[int, int, int]:  # name offset, file offset, size
        base = shoff + i * shentsize
        name, = struct.unpack_from("<I", cubin, base)
        offset, size = struct.unpack_from("<QQ", cubin, base + 0x18)
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    names = cubin[str_off:str_off + str_size]
    out = {}
    for i in range(shnum):
        name_at, _, size = header(i)
        name = names[name_at:names.index(b"\0", name_at)].decode()
        if name.startswith(".text."):
            out[name[len(".text."):]] = size
    return out


def compile_all(arch: str, workdir: Path) -> dict[str, bytes]:
    """{module: cubin} of every cuda_src/*.cu, built as PyCUDA builds it."""
    from mpillm.cuda.kernels import kernel_sources, nvcc_command
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("code_size.py: nvcc not found (or pass --cubin)")

    def build(item):
        name, source = item
        src, out = workdir / f"{name}.cu", workdir / f"{name}.cubin"
        src.write_text(source)
        proc = subprocess.run(nvcc_command(nvcc, str(src), arch, str(out)), capture_output=True, text=True,
                              check=False)
        if proc.returncode:
            raise SystemExit(f"code_size.py: nvcc failed on {name}.cu:\n{proc.stdout}{proc.stderr}")
        return name, out.read_bytes()

    with ThreadPoolExecutor() as pool:
        return dict(pool.map(build, kernel_sources().items()))


def report(cubins: dict[str, bytes], patterns: list[str]) -> str:
    """One line per function matching any pattern (all without one), largest first, then the total."""
    regexes = [re.compile(p) for p in patterns]
    rows = [(size, module, fn) for module, cubin in cubins.items() for fn, size in text_sizes(cubin).items()
            if not regexes or any(r.search(fn) for r in regexes)]
    if not rows:
        raise SystemExit(f"code_size.py: no function matches {patterns}")
    rows.sort(key=lambda r: (-r[0], r[2]))
    lines = [f"{size:9,d} B {size // INSTRUCTION_BYTES:7,d} instructions  {fn}  ({module})"
             for size, module, fn in rows]
    total = sum(r[0] for r in rows)
    lines.append(f"{total:9,d} B {total // INSTRUCTION_BYTES:7,d} instructions  total of {len(rows)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("patterns", nargs="*", metavar="PATTERN", help="regular expressions searched in function names")
    ap.add_argument("--arch", default="sm_90", help="nvcc target (default sm_90)")
    ap.add_argument("--cubin", action="append", default=[], metavar="FILE",
                    help="read this cubin instead of compiling (repeatable)")
    args = ap.parse_args(argv)
    for p in args.patterns:
        try:
            re.compile(p)
        except re.error as e:
            ap.error(f"pattern {p!r}: {e}")
    if args.cubin:
        cubins = {}
        for f in args.cubin:
            try:
                cubins[Path(f).stem] = data = Path(f).read_bytes()
                text_sizes(data)
            except (OSError, ValueError) as e:
                raise SystemExit(f"code_size.py: {f}: {e}")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cubins = compile_all(args.arch, Path(tmp))
    print(report(cubins, args.patterns))


if __name__ == "__main__":
    main()
