"""mpillm.perplexity (HF's strided sliding-window perplexity) and the `mpillm perplexity` command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mpillm.cli import main
from mpillm.perplexity import DEFAULT_TEXT, perplexity, windows

ROOT = Path(__file__).resolve().parents[1]
V = 50


class CausalToy:
    """A stand-in model: the logits at window position j depend on every token of the window up to j (and
    on nothing else), so a wrong window, a wrong context or a wrong shift changes the result."""

    def __init__(self):
        rs = np.random.RandomState(0)
        self.a, self.b = rs.randn(V, V), rs.randn(V, V)
        self.calls = []

    def new_cache(self, num_blocks, block_size):
        return None

    def all_logits(self, window):
        running = np.cumsum(self.b[window], axis=0) / np.arange(1, len(window) + 1)[:, None]
        return self.a[window] + running

    def forward(self, step, cache):
        assert (step.positions == np.arange(len(step.input_ids))).all()     # positions restart per window
        self.calls.append(len(step.input_ids))
        return self.all_logits(step.input_ids)[step.logits_index]


def hf_reference(toy, ids, max_length, stride):
    """transformers' documented recipe: labels -100 except the window's new tokens, loss on shifted labels."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        window = ids[begin:end]
        labels = window.copy()
        labels[:-trg_len] = -100
        logits, labels = toy.all_logits(window)[:-1], labels[1:]
        keep = labels != -100
        z = logits[keep]
        logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
        nll_sum -= logp[np.arange(len(z)), labels[keep]].sum()
        n_tokens += keep.sum()
        prev_end = end
        if end == len(ids):
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("n,context,stride", [(2, 4, 2), (37, 8, 3), (40, 8, 8), (40, 64, 16), (25, 6, 1),
                                              (100, 16, 15)])
def test_matches_transformers_recipe(n, context, stride):
    ids = np.random.RandomState(n).randint(0, V, n)
    toy = CausalToy()
    got = perplexity(toy, ids, context=context, stride=stride)
    want, count = hf_reference(CausalToy(), ids, context, stride)
    assert got.scored == count == (n - 1 if stride < context else n - got.windows) and got.tokens == n
    assert got.windows == len(toy.calls) and max(toy.calls) <= context
    assert math.isclose(got.nll, want, rel_tol=1e-12)
    assert math.isclose(got.perplexity, math.exp(want), rel_tol=1e-12)


def test_windows_score_every_token_once_with_enough_context():
    for n, context, stride in [(1000, 512, 256), (513, 512, 256), (300, 512, 256), (51, 10, 3), (50, 10, 10)]:
        seen, starts = [], []
        for begin, end, first in windows(n, context, stride):
            assert end - begin <= context and begin < first <= end
            if begin > 0:
                assert first - begin >= max(context - stride, 1)   # later windows give every token real context
            seen += range(first, end)
            starts.append(begin)
        # stride == context: non-overlapping windows, whose first tokens have no context to be scored with
        assert seen == [p for p in range(1, n) if stride < context or p not in starts]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(CausalToy(), [3])
    with pytest.raises(ValueError, match="stride"):
        perplexity(CausalToy(), [1, 2, 3], context=4, stride=5)


# ---------------------------------------------------------------------------------------------- the CLI

def test_cli_prints_perplexity(smollm_gguf):
    p = subprocess.run([sys.executable, "-m", "mpillm", "perplexity", "--model", str(smollm_gguf), "--text",
                        str(ROOT / "mpillm" / "data" / "perplexity.txt"), "--max-tokens", "300"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    fields = dict(line.split(":", 1) for line in p.stdout.splitlines())
    assert fields["tokens scored"].split()[0] == "299"
    assert fields["quantization"].strip() == "none (float32)"
    ppl, nll = float(fields["perplexity"]), float(fields["mean NLL"].split()[0])
    assert 3 < ppl < 30 and math.isclose(ppl, math.exp(nll), rel_tol=1e-5)


def test_cli_json_int8_windows(smollm_gguf):
    r = CliRunner().invoke(main, ["perplexity", "--model", str(smollm_gguf), "--text", str(DEFAULT_TEXT),
                                  "--max-tokens", "80", "--context", "32", "--stride", "16", "--json",
                                  "--quantize", "int8", "--group-size", "64"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert (out["tokens"], out["tokens_scored"], out["windows"]) == (80, 79, 4)
    assert out["quantize"] == "int8" and out["group_size"] == 64
    assert math.isclose(out["perplexity"], math.exp(out["mean_nll"]))


def test_cli_int8_picks_the_group_size_the_model_takes(smollm_gguf):
    r = CliRunner().invoke(main, ["perplexity", "--model", str(smollm_gguf), "--text", str(DEFAULT_TEXT),
                                  "--max-tokens", "40", "--context", "32", "--stride", "16", "--json",
                                  "--quantize", "int8"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["group_size"] == 64        # 128 does not divide SmolLM2's hidden 576


def _cli_error(args):
    r = CliRunner().invoke(main, ["perplexity", *map(str, args)])
    assert r.exit_code == 2, r.output
    return r.stderr


def test_cli_errors_exit_2_naming_the_file(smollm_gguf, tmp_path):
    missing = tmp_path / "no-such-text.txt"
    assert f"--text {missing}: no such file" in _cli_error(["--text", missing])
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    assert f"--text {empty}: the file is empty" in _cli_error(["--model", smollm_gguf, "--text", empty])
    short = tmp_path / "short.txt"
    short.write_text("Hello")                              # one token, and SmolLM2's tokenizer adds no BOS
    assert f"--text {short}: 1 token(s)" in _cli_error(["--model", smollm_gguf, "--text", short])
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert f"--text {binary}: cannot read it as UTF-8" in _cli_error(["--text", binary])
    err = _cli_error(["--model", smollm_gguf, "--text", DEFAULT_TEXT, "--quantize", "int8", "--group-size", "128"])
    assert "--group-size 64" in err                        # 128 does not divide SmolLM2's 576
    assert "--stride" in _cli_error(["--text", DEFAULT_TEXT, "--context", "8", "--stride", "9"])
    assert "apply to --quantize int8" in _cli_error(["--text", DEFAULT_TEXT, "--group-size", "64"])
