"""Host-side logic of the CUDA backend that needs no GPU."""

import numpy as np

from mpillm.batch import StepInput
from mpillm.cuda.model import _attention_groups
from mpillm.cuda.runtime import bf16_to_f32, f32_to_bf16


def test_attention_groups_split_decodes_from_prefills():
    rows = [([1], 5, [0], True), ([1], 9, [1], True), ([1, 2, 3], 0, [2], True), ([4], 3, [3], True),
            ([5, 6], 16, [4, 5], False), ([7, 8, 9, 10], 0, [6], True)]
    step = StepInput.build(rows, 16)
    assert _attention_groups(step) == [(0, 2, 1, 10), (2, 3, 3, 3), (3, 4, 1, 4), (4, 6, 4, 18)]
    decode_only = StepInput.build([([1], 5, [0], True), ([2], 7, [1], True)], 16)
    assert _attention_groups(decode_only) == [(0, 2, 1, 8)]


def test_bf16_round_trip_rounds_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -3.5e-3, 65504.0, 1e-40], np.float32)
    y = bf16_to_f32(f32_to_bf16(x))
    assert y[0] == 1.0 and y[1] == 1.0           # halfway: ties to even (1.0)
    assert y[2] == np.float32(1.015625)          # halfway between 1.0078125 and 1.015625: even mantissa
    assert np.all(np.abs(y - x) <= np.abs(x) * 2 ** -8 + 1e-38)
