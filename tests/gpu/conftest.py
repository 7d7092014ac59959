"""GPU fixtures: skip cleanly where pycuda is missing or no CUDA device exists."""

import pytest


@pytest.fixture(scope="session")
def cuda_device():
    try:
        import pycuda.driver as cuda
    except Exception as e:  # not installed, or its libcuda is missing
        pytest.skip(f"pycuda unavailable: {e}")
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            pytest.skip("no CUDA device")
    except cuda.Error as e:
        pytest.skip(f"no usable CUDA driver: {e}")
    from mpillm.cuda.runtime import init_device

    device = init_device(0)
    yield device
    device.close()


@pytest.fixture(scope="session")
def kernels(cuda_device):
    from mpillm.cuda.kernels import Kernels

    k = Kernels(cuda_device)
    print(f"\ncompiled cuda_src in {k.compile_seconds:.2f} s on {cuda_device.name}")
    return k
