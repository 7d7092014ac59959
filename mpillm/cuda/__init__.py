"""CUDA backend layer: device/stream/buffers (runtime) and the compiled kernels with their launchers (kernels).

Importing this package does not import pycuda; `runtime.init_device` and `kernels.Kernels` do.
"""
