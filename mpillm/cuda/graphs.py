"""Programmatic dependent launch (PDL) inside the captured decode CUDA graphs.

A decode step is a chain of a few hundred short kernels, each waiting for the one before. Between two
plain graph nodes the GPU drains: the last blocks of kernel A finish, then B is launched, its blocks are
scheduled, and only then do its first weight loads go out, a microsecond or two in which DRAM idles. At
batch 1 that gap is a fixed cost per kernel that no kernel can win back (SmolLM2's step is ~250 kernels).

On sm_90 an edge A -> B of the graph can be *programmatic*: B is launched as soon as every block of A has
executed `griddepcontrol.launch_dependents`, and B's `griddepcontrol.wait` then blocks until A has finished
and its writes are visible. Every kernel in cuda_src keeps that contract (cuda_src/common.cuh: wait before
touching anything another kernel writes, then let the next one launch; the small-M linear kernels load
their first weights before the wait), and tests/test_cuda_compile.py checks each entry point's PTX for it.

PyCUDA launches carry no launch attributes, so the graph is captured as usual and its edges are rewritten
before instantiation: an edge becomes programmatic only when both ends are kernels of ours. Edges to or
from anything else (NCCL, cuBLASLt, copies) stay full dependencies, because those kernels do not wait.
"""

from __future__ import annotations

import os
from typing import Callable

from mpillm.cuda.runtime import check_cu


def pdl_enabled(compute_capability: tuple[int, int]) -> bool:
    """PDL needs sm_90; MPILLM_PDL=0 turns it off (the A side of `bench.py --no-pdl`)."""
    return tuple(compute_capability) >= (9, 0) and os.environ.get("MPILLM_PDL", "1") != "0"


def _kernel_name(node) -> str | None:
    """The function name of a kernel node, None for any other node (or a kernel the driver will not name)."""
    from cuda.bindings import driver as cu
    err, kind = cu.cuGraphNodeGetType(node)
    if err != cu.CUresult.CUDA_SUCCESS or kind != cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL:
        return None
    err, params = cu.cuGraphKernelNodeGetParams(node)
    if err != cu.CUresult.CUDA_SUCCESS or not int(params.func):
        return None
    err, name = cu.cuFuncGetName(params.func)
    if err != cu.CUresult.CUDA_SUCCESS:
        return None
    return name.decode() if isinstance(name, bytes) else str(name)


def link_programmatic(graph, is_ours: Callable[[str], bool]) -> int:
    """Turn every full edge between two kernels that `is_ours` names into a programmatic edge, in place,
    before the graph is instantiated. Returns the number of edges changed."""
    from cuda.bindings import driver as cu
    n = check_cu(cu.cuGraphGetEdges(graph, 0), "cuGraphGetEdges")[-1]
    if not n:
        return 0
    src, dst, data, n = check_cu(cu.cuGraphGetEdges(graph, n), "cuGraphGetEdges")
    names: dict[int, str | None] = {}

    def ours(node) -> bool:
        key = int(node)
        if key not in names:
            names[key] = _kernel_name(node)
        return names[key] is not None and is_ours(names[key])

    pick = [i for i in range(n)
            if int(data[i].type) == int(cu.CUgraphDependencyType.CU_GRAPH_DEPENDENCY_TYPE_DEFAULT)
            and ours(src[i]) and ours(dst[i])]
    if not pick:
        return 0
    frm, to = [src[i] for i in pick], [dst[i] for i in pick]
    check_cu(cu.cuGraphRemoveDependencies(graph, frm, to, [data[i] for i in pick], len(pick)),
        "cuGraphRemoveDependencies")
    edges = []
    for _ in pick:
        e = cu.CUgraphEdgeData()
        e.from_port = cu.CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC
        e.type = cu.CUgraphDependencyType.CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
        edges.append(e)
    check_cu(cu.cuGraphAddDependencies(graph, frm, to, edges, len(pick)), "cuGraphAddDependencies")
    return len(pick)


def kernel_sequence(graph, is_ours: Callable[[str], bool]) -> list[tuple[str, int]]:
    """(name, blocks) of the graph's kernel nodes that `is_ours` names, in dependency order (a decode graph is one
    chain); other nodes (NCCL's kernels, copies) left out, as they stamp nothing: what mpillm/cuda/trace.py lines a
    step's launches up against."""
    from cuda.bindings import driver as cu
    nodes = check_cu(cu.cuGraphGetNodes(graph, 0), "cuGraphGetNodes")[-1]
    nodes = check_cu(cu.cuGraphGetNodes(graph, nodes), "cuGraphGetNodes")[0] if nodes else []
    n_edges = check_cu(cu.cuGraphGetEdges(graph, 0), "cuGraphGetEdges")[-1]
    src, dst = check_cu(cu.cuGraphGetEdges(graph, n_edges), "cuGraphGetEdges")[:2] if n_edges else ([], [])
    key = {int(nd): i for i, nd in enumerate(nodes)}
    succ: list[list[int]] = [[] for _ in nodes]
    indeg = [0] * len(nodes)
    for a, b in zip(src, dst):
        succ[key[int(a)]].append(key[int(b)])
        indeg[key[int(b)]] += 1
    order, ready = [], [i for i in range(len(nodes)) if indeg[i] == 0]
    while ready:                                  # Kahn's order: the chain's, for a chain
        i = ready.pop()
        order.append(i)
        for j in succ[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
    out = []
    for i in order:
        name = _kernel_name(nodes[i])
        if name is None or not is_ours(name):
            continue
        p = check_cu(cu.cuGraphKernelNodeGetParams(nodes[i]), "cuGraphKernelNodeGetParams")
        out.append((name, int(p.gridDimX) * int(p.gridDimY) * int(p.gridDimZ)))
    return out
