"""scripts/peers/random_gguf.py writes the file llama.cpp is timed on: it must be a valid Llama GGUF with the
types and shapes asked for, and mpillm must run it too (same bytes on both sides of the comparison)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "peers" / "random_gguf.py"


def write(tmp_path, *args):
    out = tmp_path / "m.gguf"
    p = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", *args, str(out)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return out


@pytest.mark.parametrize("qtype,head", [("q4_0", "f16"), ("q4_0", None), ("q8_0", None)])
def test_random_gguf_has_the_shapes_types_and_scales_asked(tmp_path, qtype, head):
    path = write(tmp_path, "--type", qtype, *(["--lm-head", head] if head else []))
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 1 + 9 * 2 + 2                      # embedding, 2 layers of 9, final norm, LM head
    Q = gguf.GGMLQuantizationType
    want = Q.Q4_0 if qtype == "q4_0" else Q.Q8_0
    shapes = {"attn_q": (256, 256), "attn_k": (256, 128), "attn_v": (256, 128), "attn_output": (256, 256),
              "ffn_gate": (256, 512), "ffn_up": (256, 512), "ffn_down": (512, 256)}   # GGUF order: (in, out)
    for i in range(2):
        for name, shape in shapes.items():
            t = tensors[f"blk.{i}.{name}.weight"]
            assert t.tensor_type == want and tuple(int(d) for d in t.shape) == shape, name
        assert tensors[f"blk.{i}.attn_norm.weight"].tensor_type == Q.F32
    assert tensors["output.weight"].tensor_type == (Q.F16 if head == "f16" else want)
    assert tuple(int(d) for d in tensors["token_embd.weight"].shape) == (256, 1024)

    # Every block's scale is 0.002 and the codes vary: finite logits, and no block the compiler could fold.
    w = gguf.quants.dequantize(tensors["blk.0.ffn_down.weight"].data, want)
    step = float(np.float16(0.002))                       # Q4_0 decodes to (code - 8) * d, Q8_0 to code * d
    assert np.isfinite(w).all() and np.allclose(np.round(w / step), w / step, atol=1e-3)
    assert len(np.unique(w)) > 8

    f = r.fields
    assert bytes(f["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    assert len(f["tokenizer.ggml.tokens"].data) == 1024
    assert int(f["llama.attention.head_count_kv"].parts[-1][0]) == 2


def test_mpillm_runs_the_random_gguf(tmp_path):
    path = write(tmp_path, "--type", "q4_0", "--lm-head", "f16")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "hello 123"}) + "\n")
    out = tmp_path / "o.jsonl"
    p = subprocess.run([sys.executable, "-m", "mpillm", "run", "--model", str(path), "--prompts", str(prompts),
                        "--output", str(out), "--max-tokens", "3", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["usage"]["completion_tokens"] == 3 and all(0 <= t < 1024 for t in rec["token_ids"])


def test_random_gguf_refuses_a_width_that_is_not_whole_blocks(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import random_gguf
    finally:
        sys.path.remove(str(SCRIPT.parent))
    with pytest.raises(SystemExit, match="100 columns are not whole q4_0 blocks of 32"):
        random_gguf.random_blocks(np.random.default_rng(0), 4, 100, "q4_0")
    raw = random_gguf.random_blocks(np.random.default_rng(0), 3, 64, "q8_0")
    assert raw.shape == (3, 2 * 34)
    assert (raw.reshape(3, 2, 34)[:, :, :2].copy().view(np.float16) == np.float16(0.002)).all()
