"""cuBLASLt through nvmath-python's raw-pointer bindings: the vendor GEMM for larger M (prefill, big batches).

Measured against our own mma.sync GEMM (scripts/bench.py --gemm), cuBLASLt wins wherever M > GEMV_MAX_M,
so `Kernels.linear` uses it there when it is available. Row-major y[M, N] = x[M, K] @ w[N, K]^T is the
column-major product y^T (N x M) = op_T(w^T) (N x K) @ x^T (K x M), so no data is moved. Descriptors and
the chosen algorithm are cached per shape; the workspace is allocated once, so calls can be captured in a
CUDA graph.
"""

from __future__ import annotations

import numpy as np

CUDA_TYPE = {"f32": 0, "f16": 2, "bf16": 14}      # cudaDataType_t
COMPUTE_32F = 68                                   # cublasComputeType_t CUBLAS_COMPUTE_32F
OP_T = 1                                           # cublasOperation_t CUBLAS_OP_T
WORKSPACE_BYTES = 32 << 20


class CublasLt:
    def __init__(self, stream):
        from nvmath.bindings import cublasLt as lt

        from mpillm.cuda.runtime import DeviceTensor
        self.lt, self.stream = lt, stream
        self.handle = lt.create()
        self.workspace = DeviceTensor.empty((WORKSPACE_BYTES,), "u8")
        self._plans: dict[tuple, tuple] = {}
        # Host scalars for alpha/beta: cuBLASLt reads them at call time (host pointer mode).
        self._one = np.ones(1, np.float32)
        self._zero = np.zeros(1, np.float32)

    def _set(self, fn, obj, attr, value: np.ndarray):
        fn(obj, int(attr), value.ctypes.data, value.nbytes)

    def _plan(self, m: int, n: int, k: int, dt: str, out_dt: str, bias: bool):
        key = (m, n, k, dt, out_dt, bias)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        lt = self.lt
        desc = lt.matmul_desc_create(COMPUTE_32F, CUDA_TYPE["f32"])
        self._set(lt.matmul_desc_set_attribute, desc, lt.MatmulDescAttribute.TRANSA, np.array([OP_T], np.int32))
        if bias:
            self._set(lt.matmul_desc_set_attribute, desc, lt.MatmulDescAttribute.EPILOGUE,
                      np.array([int(lt.Epilogue.BIAS)], np.uint32))
            self._set(lt.matmul_desc_set_attribute, desc, lt.MatmulDescAttribute.BIAS_DATA_TYPE,
                      np.array([CUDA_TYPE[dt]], np.int32))
        a = lt.matrix_layout_create(CUDA_TYPE[dt], k, n, k)         # w as stored: K x N column-major
        b = lt.matrix_layout_create(CUDA_TYPE[dt], k, m, k)         # x: K x M column-major
        d = lt.matrix_layout_create(CUDA_TYPE[out_dt], n, m, n)     # y: N x M column-major
        pref = lt.matmul_preference_create()
        self._set(lt.matmul_preference_set_attribute, pref, lt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES,
                  np.array([WORKSPACE_BYTES], np.uint64))
        results = lt.MatmulHeuristicResult(1)
        count = np.zeros(1, np.int32)
        lt.matmul_algo_get_heuristic(self.handle, desc, a, b, d, d, pref, 1, results.ptr, count.ctypes.data)
        lt.matmul_preference_destroy(pref)
        if count[0] < 1:
            raise RuntimeError(f"cuBLASLt has no algorithm for {m}x{n}x{k} {dt}->{out_dt}")
        plan = (desc, a, b, d, results)
        self._plans[key] = plan
        return plan

    def matmul(self, y, x, w, bias=None):
        """y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]); shapes and dtypes already checked by the caller."""
        m, k = x.shape
        n = w.shape[0]
        desc, a, b, d, results = self._plan(m, n, k, w.dtype, y.dtype, bias is not None)
        lt = self.lt
        if bias is not None:
            # The bias pointer is per call (the same plan serves several layers).
            self._set(lt.matmul_desc_set_attribute, desc, lt.MatmulDescAttribute.BIAS_POINTER,
                      np.array([bias.ptr], np.uint64))
        lt.matmul(self.handle, desc, self._one.ctypes.data, w.ptr, a, x.ptr, b, self._zero.ctypes.data,
                  y.ptr, d, y.ptr, d, results.ptr, self.workspace.ptr, WORKSPACE_BYTES, self.stream.handle)
