"""Engine end to end on the NumPy backend: continuous batching, chunked prefill, preemption, prefix caching,
per-request sampling, finish reasons, stop strings, logprobs; and the host sampler (mpillm/sampler.py).

Most tests use a tiny random-weight Llama (hidden 32, 2 layers) with the real SmolLM2 tokenizer (vocab 49152),
checked against transformers' own greedy generation; the real SmolLM2 model is used for the EOS test only. A
scripted runner (fixed token ids) pins down the engine's text handling exactly.
"""

import ctypes
import glob
import math
import os
import random

import numpy as np
import pytest

from mpillm.engine import Engine, EngineConfig
from mpillm.jobio import Request, SamplingParams
from mpillm.sampler import apply_repetition_penalty, filtered_probs, request_seed, sample_token, top_logprobs


# ---------------------------------------------------------------------------------------------------- fixtures

def _openblas_threads(n):
    """Set numpy's OpenBLAS thread count at run time; returns the previous one (None if not found).

    On a small shared machine a multi-threaded OpenBLAS spins against other processes and a one-row matmul gets
    ~100x slower; these tests only need one thread."""
    libdir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in glob.glob(os.path.join(libdir, "*openblas*")):
        lib = ctypes.CDLL(path)
        for get, put in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                         ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                         ("openblas_get_num_threads", "openblas_set_num_threads")):
            if hasattr(lib, get) and hasattr(lib, put):
                old = getattr(lib, get)()
                getattr(lib, put)(int(n))
                return lambda: getattr(lib, put)(old)
    return None


@pytest.fixture(scope="module", autouse=True)
def single_thread_blas():
    restore = _openblas_threads(1)
    yield
    if restore:
        restore()


@pytest.fixture(scope="module")
def tokenizer(smollm_gguf):
    from mpillm.checkpoint import open_checkpoint
    return open_checkpoint(smollm_gguf).tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(NumPy Transformer, HF model) of a tiny random Llama with SmolLM2's vocabulary size."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, initializer_range=0.5)   # large weights: peaked logits, no near-ties to flip the argmax
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    hf.save_pretrained(path)
    from mpillm.checkpoint import open_checkpoint
    from mpillm.model import Transformer
    yield Transformer(open_checkpoint(path)), hf
    torch.set_num_threads(torch_threads)


@pytest.fixture(scope="module")
def real_model(smollm_gguf):
    from mpillm.checkpoint import open_checkpoint
    from mpillm.model import Transformer
    return Transformer(open_checkpoint(smollm_gguf))


def make_engine(model, tokenizer, num_blocks=64, **cfg):
    from mpillm.runner import NumpyRunner
    cfg.setdefault("max_model_len", num_blocks * 16)
    return Engine(NumpyRunner(model, num_blocks, 16), tokenizer, EngineConfig(num_blocks=num_blocks, **cfg))


def req(rid, prompt=None, messages=None, **params):
    return Request(str(rid), rid, 0, prompt, messages, SamplingParams(**params), None)


def run(engine, requests, late=(), late_after=3, max_steps=5000):
    """Results by request id. `late` requests are added after `late_after` steps (continuous batching)."""
    out = {}
    for r in requests:
        res = engine.add(r)
        if res is not None:
            out[r.id] = res
    steps = 0
    late = list(late)
    while engine.has_work() or late:
        if steps == late_after or not engine.has_work():
            for r in late:
                res = engine.add(r)
                if res is not None:
                    out[r.id] = res
            late = []
        for res in engine.step():
            assert res.request.id not in out
            out[res.request.id] = res
        steps += 1
        assert steps < max_steps
    assert engine.blocks.num_free == engine.cfg.num_blocks          # everything given back
    return out


def alone(model, tokenizer, r, **cfg):
    return run(make_engine(model, tokenizer, **cfg), [r])[r.id]


WORDS = ("the of and to in is was for on that with as by at from his her an which are this be or has had one "
         "river mountain city light music garden winter ocean history paper engine silver forest market story "
         "bridge window science number yellow morning question animal travel kitchen").split()


def text_of(n_words, seed):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize()


# ------------------------------------------------------------------------------------------ the tiny model itself

def test_tiny_model_greedy_matches_transformers(tiny, tokenizer):
    torch = pytest.importorskip("torch")
    model, hf = tiny
    for i, n in enumerate((3, 40)):
        prompt = text_of(n, i)
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        got = alone(model, tokenizer, req(i, prompt, max_tokens=12))
        assert got.token_ids == want
        assert len(set(want)) > 3                                   # context-dependent, not a constant loop


# ------------------------------------------------------------------------------------------ batching == alone

BATCH = [(3, 12), (8, 30), (20, 5), (35, 20), (50, 1), (70, 25), (90, 10), (105, 30), (5, 18), (40, 8), (60, 16),
         (12, 22)]                                                  # (prompt words, max_tokens)


@pytest.fixture(scope="module")
def batch_alone(tiny, tokenizer):
    model, _ = tiny
    reqs = [req(i, text_of(n, 100 + i), max_tokens=m) for i, (n, m) in enumerate(BATCH)]
    return reqs, {r.id: alone(model, tokenizer, r, prefix_caching=False) for r in reqs}


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_continuous_batch_equals_alone(tiny, tokenizer, batch_alone, prefix_caching):
    model, _ = tiny
    reqs, want = batch_alone
    assert max(len(tokenizer.encode(r.prompt)) for r in reqs) > 100
    # 12 blocks of 16 = 192 slots (the longest request needs 9 blocks), a 24-token step budget (not a multiple
    # of the block size), 6 running at most; half the requests arrive while the others are mid-decode
    eng = make_engine(model, tokenizer, num_blocks=12, max_num_batched_tokens=24, max_num_seqs=6,
                      prefix_caching=prefix_caching)
    got = run(eng, reqs[:6], late=reqs[6:], late_after=10)
    assert eng.scheduler.num_preemptions > 0
    for r in reqs:
        g, w = got[r.id], want[r.id]
        assert g.token_ids == w.token_ids, f"request {r.id} differs in a batch"
        assert (g.text, g.finish_reason, g.prompt_tokens, g.completion_tokens) == \
               (w.text, w.finish_reason, w.prompt_tokens, w.completion_tokens)
        assert g.finish_reason == "length" and len(g.token_ids) == r.params.max_tokens
        assert g.text == tokenizer.decode(g.token_ids)
    assert eng.completion_tokens == sum(r.params.max_tokens for r in reqs)
    assert eng.prompt_tokens == sum(w.prompt_tokens for w in want.values())


def test_prefix_caching_on_off_identical(tiny, tokenizer):
    model, _ = tiny
    shared = text_of(60, 7)                                          # ~60 tokens, several full blocks
    reqs = [req(i, shared + " " + text_of(2 + 3 * i, 50 + i), max_tokens=10 + i) for i in range(6)]
    late = [req(10, shared + " " + text_of(4, 99), max_tokens=6)]

    def go(pc):
        eng = make_engine(model, tokenizer, num_blocks=40, max_num_batched_tokens=32, prefix_caching=pc)
        out = run(eng, reqs, late=late, late_after=10_000)          # `late` comes once everything finished
        return eng, out

    on, got_on = go(True)
    off, got_off = go(False)
    assert off.blocks.hits == 0
    assert on.blocks.hits >= 5 * 48                                  # the later requests reuse the prefix...
    assert on.blocks.hits % 16 == 0
    for r in reqs + late:
        assert got_on[r.id].token_ids == got_off[r.id].token_ids
        assert got_on[r.id].text == got_off[r.id].text
    want = alone(model, tokenizer, late[0], prefix_caching=False)
    assert got_on[late[0].id].token_ids == want.token_ids           # ...and freed blocks too


def test_prefix_cache_never_serves_uncomputed_kv(tiny, tokenizer):
    """A finishes with 32 tokens but KV for 31 (its last token is never fed back): its second block is full of
    token ids yet not computed, so B, whose prompt starts with all 32 of A's tokens, may reuse block 0 only."""
    model, _ = tiny
    prompt = text_of(10, 300)
    ids = tokenizer.encode(prompt)
    eng = make_engine(model, tokenizer, num_blocks=16, prefix_caching=True)
    a = run(eng, [req("a", prompt, max_tokens=32 - len(ids))])["a"]
    b_prompt = prompt + a.text + " river garden"
    assert tokenizer.encode(b_prompt)[:32] == ids + a.token_ids     # the text round-trips to the same ids
    b = run(eng, [req("b", b_prompt, max_tokens=8)])["b"]
    assert eng.blocks.hits == 16
    assert b.token_ids == alone(model, tokenizer, req("b", b_prompt, max_tokens=8), prefix_caching=False).token_ids


def test_one_step_ahead_equals_step_by_step(tiny, tokenizer):
    """The engine launches step n + 1 before reading step n back, feeding its decode inputs on the device: the
    same results as reading every step back first, through preemption, prefix caching, late arrivals, stop
    strings, seeded sampling, and host-sampled requests (logprobs, repetition penalty) mixed in."""
    model, _ = tiny
    shared = text_of(40, 11)
    reqs = [req("g0", shared + " " + text_of(5, 1), max_tokens=14),
            req("g1", shared + " " + text_of(9, 2), max_tokens=3),
            req("s0", text_of(30, 3), max_tokens=16, temperature=0.9, top_p=0.9, seed=7),
            req("lp", text_of(12, 4), max_tokens=6, logprobs=3),
            req("st", text_of(20, 5), max_tokens=20, stop=["e"]),
            req("one", text_of(6, 6), max_tokens=1)]
    late = [req("rp", text_of(15, 7), max_tokens=9, repetition_penalty=1.4),
            req("g2", shared + " " + text_of(3, 8), max_tokens=11, temperature=1.1, seed=3),
            req("g3", text_of(70, 9), max_tokens=7)]

    def go(pipeline):
        eng = make_engine(model, tokenizer, num_blocks=12, max_num_batched_tokens=24, max_num_seqs=5,
                          prefix_caching=True, global_seed=5, pipeline=pipeline)
        fed = []
        launch = eng.runner.launch

        def counting(step, specs, fetch=True):
            fed.append(int((step.input_ids < 0).sum()))
            return launch(step, specs, fetch)
        eng.runner.launch = counting
        return eng, run(eng, reqs, late=late, late_after=6), fed

    ahead, got, fed = go(True)
    plain, want, _ = go(False)
    assert ahead.pipelined and not plain.pipelined
    assert sum(fed) > 10 and ahead.scheduler.num_preemptions > 0 and ahead.blocks.hits > 0
    assert want["st"].finish_reason == "stop"
    for r in reqs + late:
        g, w = got[r.id], want[r.id]
        assert (g.token_ids, g.text, g.finish_reason, g.prompt_tokens, g.completion_tokens, g.logprobs) == \
               (w.token_ids, w.text, w.finish_reason, w.prompt_tokens, w.completion_tokens, w.logprobs), r.id
    assert (ahead.prompt_tokens, ahead.completion_tokens) == (plain.prompt_tokens, plain.completion_tokens)


# ------------------------------------------------------------------------------------------------ sampling

def test_seeded_sampling_alone_equals_batched(tiny, tokenizer):
    model, _ = tiny
    sampled = [req("s1", text_of(30, 1), max_tokens=20, temperature=1.0, top_p=0.95, seed=1234),
               req("s2", text_of(9, 2), max_tokens=15, temperature=0.7, top_k=50, min_p=0.01, seed=99),
               req("s3", text_of(50, 3), max_tokens=12, temperature=1.2),              # seed from the job seed
               req("s4", text_of(20, 4), max_tokens=14, temperature=0.9, repetition_penalty=1.3, seed=5)]
    others = [req(f"g{i}", text_of(10 + 17 * i, 20 + i), max_tokens=10 + 3 * i) for i in range(5)]
    want = {r.id: alone(model, tokenizer, r, global_seed=42) for r in sampled}
    eng = make_engine(model, tokenizer, num_blocks=10, max_num_batched_tokens=20, global_seed=42)
    got = run(eng, others[:3] + sampled[:2], late=others[3:] + sampled[2:], late_after=4)
    assert eng.scheduler.num_preemptions > 0
    for r in sampled:
        assert got[r.id].token_ids == want[r.id].token_ids, r.id
    # a sampled request does not just follow the greedy path
    greedy = alone(model, tokenizer, req("s1", sampled[0].prompt, max_tokens=20))
    assert greedy.token_ids != want["s1"].token_ids


def test_seeds_change_samples(tiny, tokenizer):
    model, _ = tiny
    prompt = text_of(12, 5)
    outs = {seed: alone(model, tokenizer, req("x", prompt, max_tokens=12, temperature=1.0, seed=seed)).token_ids
            for seed in (1, 2, 3)}
    assert len({tuple(v) for v in outs.values()}) == 3
    assert alone(model, tokenizer, req("x", prompt, max_tokens=12, temperature=1.0, seed=2)).token_ids == outs[2]
    # without a request seed: the job seed and the request id decide
    unseeded = lambda rid, gs: alone(model, tokenizer, req(rid, prompt, max_tokens=12, temperature=1.0),
                                     global_seed=gs).token_ids
    assert unseeded("a", 0) == unseeded("a", 0)
    assert unseeded("a", 0) != unseeded("b", 0)
    assert unseeded("a", 0) != unseeded("a", 1)


def test_top_k_1_equals_greedy(tiny, tokenizer):
    model, _ = tiny
    prompt = text_of(25, 6)
    greedy = alone(model, tokenizer, req("g", prompt, max_tokens=15)).token_ids
    for seed in (0, 1):
        assert alone(model, tokenizer, req("k", prompt, max_tokens=15, temperature=0.8, top_k=1,
                                           seed=seed)).token_ids == greedy
    assert alone(model, tokenizer, req("m", prompt, max_tokens=15, temperature=1.0, min_p=1.0,
                                       seed=3)).token_ids == greedy


def test_repetition_penalty_greedy_matches_transformers(tiny, tokenizer):
    """Greedy decoding under HF's repetition penalty, over prompt and output ids alike."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    model, hf = tiny

    def hf_greedy(ids, n, penalty, ignore_prompt=False):
        out, proc = list(ids), RepetitionPenaltyLogitsProcessor(penalty)
        with torch.no_grad():
            for _ in range(n):
                logits = hf(torch.tensor([out])).logits[0, -1:].double()
                seen = out[len(ids):] if ignore_prompt else out
                if seen:
                    logits = proc(torch.tensor([seen]), logits)
                out.append(int(logits.argmax()))
        return out[len(ids):]

    prompt = text_of(15, 8)
    ids = tokenizer.encode(prompt)
    for penalty in (2.0, 0.3):                                     # < 1 favours seen ids: the prompt matters
        want = hf_greedy(ids, 15, penalty)
        got = alone(model, tokenizer, req("r", prompt, max_tokens=15, repetition_penalty=penalty)).token_ids
        assert got == want, penalty
    assert hf_greedy(ids, 15, 0.3, ignore_prompt=True) != want     # (so the check above sees the prompt ids)
    assert want != alone(model, tokenizer, req("r", prompt, max_tokens=15)).token_ids


# ------------------------------------------------------------------------------------------------ finish reasons

def test_length(tiny, tokenizer):
    model, _ = tiny
    prompt = text_of(10, 9)
    r = alone(model, tokenizer, req("l", prompt, max_tokens=7))
    assert r.finish_reason == "length" and len(r.token_ids) == 7 and r.completion_tokens == 7
    assert r.prompt_tokens == len(tokenizer.encode(prompt)) and r.error is None
    assert r.text == tokenizer.decode(r.token_ids)
    one = alone(model, tokenizer, req("l1", prompt, max_tokens=1))
    assert one.token_ids == r.token_ids[:1] and one.finish_reason == "length"


def test_errors_are_reported_and_the_engine_goes_on(tiny, tokenizer):
    model, _ = tiny
    eng = make_engine(model, tokenizer, num_blocks=8, max_model_len=40)
    long_prompt = text_of(60, 10)
    n_long = len(tokenizer.encode(long_prompt))
    assert n_long > 40
    exact_prompt, fits_prompt = "river" + " river" * 39, "river" + " river" * 38
    assert len(tokenizer.encode(exact_prompt)) == 40 and len(tokenizer.encode(fits_prompt)) == 39
    ok = req("ok", text_of(5, 12), max_tokens=4)
    out = run(eng, [req("empty", "", max_tokens=5), req("long", long_prompt), ok,
                    req("exact", exact_prompt, max_tokens=3), req("fits", fits_prompt, max_tokens=3)])
    e = out["empty"]
    assert e.finish_reason == "error" and e.token_ids == [] and e.text == "" and e.completion_tokens == 0
    assert e.error["type"] == "invalid_request" and "empty" in e.error["message"]
    lg = out["long"]
    assert lg.finish_reason == "error" and lg.error["type"] == "context_length_exceeded"
    assert str(n_long) in lg.error["message"] and "40" in lg.error["message"]
    assert lg.prompt_tokens == n_long and lg.token_ids == []
    assert out["exact"].finish_reason == "error"                     # a full context leaves no room to generate
    assert out["exact"].error["type"] == "context_length_exceeded" and out["exact"].prompt_tokens == 40
    f = out["fits"]                                                  # one slot left: exactly one token
    assert f.finish_reason == "length" and len(f.token_ids) == 1 and f.prompt_tokens == 39
    assert out["ok"].finish_reason == "length" and len(out["ok"].token_ids) == 4


def test_max_tokens_beyond_context_ends_at_context(tiny, tokenizer):
    model, _ = tiny
    prompt = text_of(20, 13)
    n = len(tokenizer.encode(prompt))
    r = alone(model, tokenizer, req("c", prompt, max_tokens=1000), num_blocks=8, max_model_len=n + 9)
    assert r.finish_reason == "length" and r.error is None
    assert len(r.token_ids) == 9 and r.prompt_tokens + r.completion_tokens == n + 9
    full = alone(model, tokenizer, req("c", prompt, max_tokens=9))
    assert full.token_ids == r.token_ids


def test_stop_strings_truncate_text(tiny, tokenizer):
    model, _ = tiny
    prompt = text_of(14, 14)
    full = alone(model, tokenizer, req("f", prompt, max_tokens=24))
    text = full.text
    assert len(text) > 40
    stop = text[20:24]                                              # a piece from the middle of the output
    first = text.find(stop)
    r = alone(model, tokenizer, req("s", prompt, max_tokens=24, stop=[stop]))
    assert r.finish_reason == "stop"
    assert r.text == text[:first] and stop not in r.text
    # generation stops at the token completing the stop string
    k = len(r.token_ids)
    assert r.token_ids == full.token_ids[:k] and k < 24
    assert stop in tokenizer.decode(full.token_ids[:k]) and stop not in tokenizer.decode(full.token_ids[:k - 1])
    # several stop strings: the earliest in the text wins; a stop string that never occurs changes nothing
    later = text[30:33]
    r2 = alone(model, tokenizer, req("s2", prompt, max_tokens=24, stop=[later, stop, "\u2603never\u2603"]))
    assert r2.text == text[:min(first, text.find(later))] and r2.finish_reason == "stop"
    r3 = alone(model, tokenizer, req("s3", prompt, max_tokens=24, stop=["\u2603never\u2603"]))
    assert (r3.text, r3.token_ids, r3.finish_reason) == (text, full.token_ids, "length")


def test_eos_stops_with_real_model(real_model, tokenizer):
    msgs = [{"role": "user", "content": "What is 2+2? Answer with a number only."}]
    eng = make_engine(real_model, tokenizer, num_blocks=16)
    out = run(eng, [req("eos", messages=msgs, max_tokens=40)])
    r = out["eos"]
    assert r.finish_reason == "stop" and r.token_ids[-1] in tokenizer.eos_ids
    assert 1 < len(r.token_ids) < 40
    assert r.text.strip() and "4" in r.text and "<|im_end|>" not in r.text
    assert r.text == tokenizer.decode(r.token_ids)
    assert r.prompt_tokens == len(tokenizer.encode_chat(msgs))
    # ignore_eos: the same tokens up to EOS, then it goes on to max_tokens
    n = len(r.token_ids)
    eng = make_engine(real_model, tokenizer, num_blocks=16)
    g = run(eng, [req("go", messages=msgs, max_tokens=n + 3, ignore_eos=True)])["go"]
    assert g.finish_reason == "length" and len(g.token_ids) == n + 3
    assert g.token_ids[:n] == r.token_ids


# ------------------------------------------------------------------------------------------------ logprobs

def test_logprobs(tiny, tokenizer):
    torch = pytest.importorskip("torch")
    model, hf = tiny
    prompt = text_of(18, 15)
    k = 5
    eng = make_engine(model, tokenizer, num_blocks=16, max_num_batched_tokens=16)
    out = run(eng, [req("g", prompt, max_tokens=10, logprobs=k),
                    req("t", prompt, max_tokens=10, logprobs=k, temperature=1.5, seed=11),
                    req("none", prompt, max_tokens=3)])
    assert out["none"].logprobs is None
    for rid in ("g", "t"):
        r = out[rid]
        assert len(r.logprobs) == len(r.token_ids) == 10
        for tok, e in zip(r.token_ids, r.logprobs):
            assert e["token_id"] == tok and e["token"] == tokenizer.decode([tok], skip_special_tokens=False)
            assert e["logprob"] <= 0.0
            top = e["top_logprobs"]
            assert len(top) == k and len({t["token_id"] for t in top}) == k
            vals = [t["logprob"] for t in top]
            assert vals == sorted(vals, reverse=True) and all(v <= 0 for v in vals)
            assert sum(math.exp(v) for v in vals) <= 1 + 1e-6
            assert e["logprob"] <= vals[0] + 1e-9
            for t in top:
                if t["token_id"] == tok:
                    assert t["logprob"] == pytest.approx(e["logprob"])
            if rid == "g":
                assert top[0]["token_id"] == tok and e["logprob"] == pytest.approx(vals[0])
    # the first token's logprobs are the model's log-softmax (transformers as the reference)
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].double(), -1)
    e = out["g"].logprobs[0]
    for t in e["top_logprobs"]:
        assert t["logprob"] == pytest.approx(ref[t["token_id"]].item(), abs=2e-3)
    assert [t["token_id"] for t in e["top_logprobs"]] == torch.topk(ref, k).indices.tolist()
    assert out["t"].token_ids != out["g"].token_ids


# ------------------------------------------------------------------------------------------------ scripted runner

class ScriptedRunner:
    """Plays back fixed token ids per request (keyed by the request seed): pins down the engine's own logic."""

    def __init__(self, scripts):
        self.scripts = scripts

    def execute(self, step, specs):
        assert len(step.logits_index) == len(specs)
        out = []
        for spec in specs:
            tok = self.scripts[spec.seed][spec.step]
            lp = (tok, -0.25, [(tok, -0.25)]) if spec.params.logprobs else None
            out.append((tok, lp))
        return out


class LaggedScriptedRunner(ScriptedRunner):
    """The same scripts through launch/collect, so the engine runs one step ahead (mpillm.engine). Checks that
    every fed id names a row of the step launched just before; counts fed ids and sampled rows."""

    def __init__(self, scripts):
        # The step after a script's EOS is launched before the EOS is read back: a filler token past the end,
        # which the engine must drop (the results are compared with the step-by-step run's).
        super().__init__({k: list(v) + [v[-1]] for k, v in scripts.items()})
        self.previous = self.sampled = self.fed = 0

    def launch(self, step, specs):
        fed = step.input_ids[step.input_ids < 0]
        assert all(0 <= -1 - int(t) < self.previous for t in fed)
        self.fed += len(fed)
        picks = self.execute(step, specs)
        self.previous = len(picks)
        self.sampled += len(picks)
        return picks

    def collect(self, picks):
        return picks


def scripted(tokenizer, scripts, requests, **cfg):
    """Results of the requests run step by step; run one step ahead too, they must be the same."""
    cfg.setdefault("max_model_len", 256)
    eng = Engine(ScriptedRunner(scripts), tokenizer, EngineConfig(num_blocks=16, **cfg))
    assert not eng.pipelined
    out = run(eng, requests)
    lagged = LaggedScriptedRunner(scripts)
    ahead = Engine(lagged, tokenizer, EngineConfig(num_blocks=16, **cfg))
    assert ahead.pipelined
    got = run(ahead, requests)
    assert got.keys() == out.keys()
    for rid, want in out.items():
        g = got[rid]
        assert (g.token_ids, g.text, g.finish_reason, g.prompt_tokens, g.completion_tokens, g.logprobs, g.error) == \
               (want.token_ids, want.text, want.finish_reason, want.prompt_tokens, want.completion_tokens,
                want.logprobs, want.error), rid
    assert (ahead.prompt_tokens, ahead.completion_tokens) == (eng.prompt_tokens, eng.completion_tokens)
    # A sequence that stops on EOS or a stop string is known one step late: at most one token more, dropped.
    early = sum(1 for r in out.values() if r.finish_reason == "stop")
    assert eng.completion_tokens <= lagged.sampled <= eng.completion_tokens + early
    if any(r.completion_tokens > 1 for r in out.values()):
        assert lagged.fed > 0
    return out


def test_scripted_stop_strings(tokenizer):
    ids = tokenizer.encode("Hello world. The end of it all", add_special_tokens=False)
    script = {1: ids}
    r = lambda rid, **p: req(rid, "Hi", seed=1, max_tokens=len(ids), **p)
    out = scripted(tokenizer, script, [
        r("span", stop=["d. T"]),                       # spans three tokens
        r("inside", stop=["wor"]),                      # inside one token: the rest of the token is dropped
        r("two", stop=["end", "The"]),                  # the earliest in the text wins, not the first listed
        r("first", stop=["Hel"]),                       # in the very first token
        r("none", stop=["xyz"]),
        r("overlap", stop=[" end of it", "of"]),
        r("same_token", stop=["ld", "world"]),          # both complete with " world": the earlier one cuts
    ])
    assert out["span"].text == "Hello worl" and out["span"].finish_reason == "stop"
    assert out["inside"].text == "Hello " and out["inside"].token_ids == ids[:2]
    assert out["two"].text == "Hello world. "
    assert out["first"].text == "" and out["first"].token_ids == ids[:1]
    assert out["none"].text == "Hello world. The end of it all" and out["none"].finish_reason == "length"
    # generation ends when the first stop string completes: "of" does before " end of it" (which starts earlier)
    assert out["overlap"].text == "Hello world. The end " and out["overlap"].finish_reason == "stop"
    assert out["same_token"].text == "Hello " and out["same_token"].token_ids == ids[:2]


def test_scripted_eos(tokenizer):
    eos = min(tokenizer.eos_ids)
    body = tokenizer.encode("Yes it is", add_special_tokens=False)
    out = scripted(tokenizer, {1: body + [eos] + body}, [
        req("stop", "Q", seed=1, max_tokens=20),
        req("ignore", "Q", seed=1, max_tokens=len(body) + 2, ignore_eos=True),
        req("short", "Q", seed=1, max_tokens=len(body)),           # max_tokens is reached before EOS
    ])
    s = out["stop"]
    assert s.finish_reason == "stop" and s.token_ids == body + [eos] and s.text == "Yes it is"
    i = out["ignore"]
    assert i.finish_reason == "length" and i.token_ids == body + [eos] + body[:1]
    assert out["short"].finish_reason == "length" and out["short"].text == "Yes it is"


def test_scripted_multibyte_text(tokenizer):
    """Characters split over several tokens come out whole."""
    ids = tokenizer.encode("ok \U0001F600 \u65e5\u672c\u8a9e!", add_special_tokens=False)
    out = scripted(tokenizer, {1: ids}, [req("m", "Q", seed=1, max_tokens=len(ids)),
                                         req("s", "Q", seed=1, max_tokens=len(ids), stop=["\u672c"])])
    assert out["m"].text == "ok \U0001F600 \u65e5\u672c\u8a9e!"
    assert out["s"].text == "ok \U0001F600 \u65e5" and out["s"].finish_reason == "stop"
    # cut mid-character by max_tokens: the held-back bytes are flushed as a full decode shows them (U+FFFD)
    cut = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd"))
    r = scripted(tokenizer, {1: ids}, [req("c", "Q", seed=1, max_tokens=cut)])["c"]
    assert r.finish_reason == "length" and r.token_ids == ids[:cut]
    assert r.text == tokenizer.decode(ids[:cut]) and r.text.startswith("ok ")


def _spm_tokenizer():
    """A tiny SentencePiece-style (Llama 2 kind) vocabulary with byte fallback."""
    from mpillm.tokenizer import Tokenizer
    pieces = ["\u2581", "h", "i", "\u2581h", "\u2581hi"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [-1.0 - i for i in range(len(pieces))],
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
    return Tokenizer.from_gguf_metadata(meta)


@pytest.mark.parametrize("end", ["length", "eos"])
def test_scripted_text_ending_in_byte_fallback_run(end):
    """SentencePiece byte fallback: 'é' is <0xC3><0xA9>. The incremental decoder holds a byte run back until it
    ends, so a result ending right after one must flush it: text == decode(token_ids)."""
    tok = _spm_tokenizer()
    ids = tok.encode("hi\u00e9", add_special_tokens=False)
    assert len(ids) == 3 and tok.decode(ids) == "hi\u00e9"
    script = ids + ([2] if end == "eos" else [])
    out = scripted(tok, {1: script}, [req("x", "hi", seed=1, max_tokens=3 if end == "length" else 10)])
    r = out["x"]
    assert r.finish_reason == ("length" if end == "length" else "stop")
    assert r.text == "hi\u00e9"


def test_abort_all_frees_everything(tokenizer):
    ids = tokenizer.encode("one two three four five six", add_special_tokens=False)
    eng = Engine(ScriptedRunner({1: ids}), tokenizer,
                 EngineConfig(max_model_len=64, num_blocks=8, max_num_seqs=2))
    reqs = [req(f"r{i}", "x " * (3 + 5 * i), seed=1, max_tokens=[1, 6, 6, 6][i]) for i in range(4)]
    for r in reqs:
        assert eng.add(r) is None
    done = eng.step()
    assert [r.request.id for r in done] == ["r0"]
    eng.step()
    assert eng.blocks.num_free < 8
    left = eng.abort_all()
    assert sorted(r.id for r in left) == ["r1", "r2", "r3"]
    assert not eng.has_work() and eng.blocks.num_free == 8 and eng.step() == []


def test_stopping_one_step_ahead_keeps_the_step_in_flight(tokenizer):
    """Run one step ahead, a job that stops reads back the step it already launched first (Engine.flush): a
    request that step finished is a result, not an aborted request to redo."""
    ids = tokenizer.encode("one two three four five six", add_special_tokens=False)
    eng = Engine(LaggedScriptedRunner({1: ids}), tokenizer, EngineConfig(max_model_len=64, num_blocks=8,
                                                                          max_num_seqs=2))
    reqs = [req(f"r{i}", "x " * (3 + 5 * i), seed=1, max_tokens=[1, 6, 6][i]) for i in range(3)]
    for r in reqs:
        assert eng.add(r) is None
    assert eng.step() == []                     # r0's only token is still in flight
    done = eng.flush()
    assert [r.request.id for r in done] == ["r0"] and done[0].token_ids == ids[:1]
    left = eng.abort_all()
    assert sorted(r.id for r in left) == ["r1", "r2"]
    assert not eng.has_work() and eng.blocks.num_free == 8 and eng.flush() == []


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_request_larger_than_cache_is_refused_instead_of_looping(tokenizer, prefix_caching):
    """max_model_len 128 on a 64-slot cache: a request that would outgrow the cache gets an error record up
    front (never preempting and recomputing itself forever); requests that fit still run."""
    ids = tokenizer.encode("a b " * 60, add_special_tokens=False)
    eng = Engine(ScriptedRunner({1: ids}), tokenizer, EngineConfig(max_model_len=128, num_blocks=4,
                                                                   max_num_batched_tokens=32,
                                                                   prefix_caching=prefix_caching))
    res = eng.add(req("big", "x y z", seed=1, max_tokens=100))
    assert res is not None and res.finish_reason == "error"
    assert res.error["type"] == "kv_cache_too_small" and "64" in res.error["message"]
    out = run(eng, [req("small", "x y z", seed=1, max_tokens=20)])
    assert len(out["small"].token_ids) == 20


def test_scripted_engine_counts_and_logprob_records(tokenizer):
    ids = tokenizer.encode("a b c d", add_special_tokens=False)
    eng = Engine(ScriptedRunner({1: ids, 2: ids[::-1]}), tokenizer, EngineConfig(max_model_len=64, num_blocks=8))
    out = run(eng, [req("a", "x y", seed=1, max_tokens=4, logprobs=1), req("b", "x", seed=2, max_tokens=2)])
    assert out["a"].token_ids == ids[:4] and out["b"].token_ids == ids[::-1][:2]
    assert [e["token_id"] for e in out["a"].logprobs] == ids[:4]
    assert eng.completion_tokens == 6
    assert eng.prompt_tokens == len(tokenizer.encode("x y")) + len(tokenizer.encode("x"))


# ------------------------------------------------------------------------------------------------ sampler units

def P(**kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    base.update(kw)
    return SamplingParams(**base)


HAND = np.log(np.array([0.05, 0.30, 0.02, 0.25, 0.20, 0.10, 0.08]))   # sorted: 1, 3, 4, 5, 6, 0, 2


def support(p):
    return set(np.flatnonzero(p > 0).tolist())


def test_filtered_probs_hand_made():
    p = filtered_probs(HAND, 1.0, 0, 1.0, 0.0)
    np.testing.assert_allclose(p, np.exp(HAND), rtol=1e-12)
    assert support(filtered_probs(HAND, 1.0, 1, 1.0, 0.0)) == {1}
    assert support(filtered_probs(HAND, 1.0, 3, 1.0, 0.0)) == {1, 3, 4}
    assert support(filtered_probs(HAND, 1.0, 7, 1.0, 0.0)) == set(range(7))
    assert support(filtered_probs(HAND, 1.0, 100, 1.0, 0.0)) == set(range(7))
    # top-p: the smallest set whose mass reaches p (0.30, 0.55, 0.75, 0.85, 0.93, 0.98, 1.0)
    assert support(filtered_probs(HAND, 1.0, 0, 0.29, 0.0)) == {1}
    assert support(filtered_probs(HAND, 1.0, 0, 0.5, 0.0)) == {1, 3}
    assert support(filtered_probs(HAND, 1.0, 0, 0.6, 0.0)) == {1, 3, 4}
    assert support(filtered_probs(HAND, 1.0, 0, 0.9, 0.0)) == {1, 3, 4, 5, 6}
    # min-p: keep p >= min_p * max (0.30): 0.5 -> 0.15
    assert support(filtered_probs(HAND, 1.0, 0, 1.0, 0.5)) == {1, 3, 4}
    assert support(filtered_probs(HAND, 1.0, 0, 1.0, 0.3)) == {1, 3, 4, 5}
    assert support(filtered_probs(HAND, 1.0, 0, 1.0, 1.0)) == {1}
    # combined, HF order: top-k 4 renormalises (0.30, 0.25, 0.20, 0.10)/0.85 -> top-p 0.6 keeps 1, 3
    p = filtered_probs(HAND, 1.0, 4, 0.6, 0.0)
    assert support(p) == {1, 3}
    np.testing.assert_allclose(p[[1, 3]], [0.30 / 0.55, 0.25 / 0.55])
    # temperature sharpens / flattens before the filters
    hot, cold = filtered_probs(HAND, 2.0, 0, 1.0, 0.0), filtered_probs(HAND, 0.5, 0, 1.0, 0.0)
    assert cold[1] > 0.30 > hot[1]
    np.testing.assert_allclose(cold, np.exp(2 * HAND) / np.exp(2 * HAND).sum())
    for q in (hot, cold, p):
        assert q.sum() == pytest.approx(1.0)


def test_filtered_probs_match_transformers_warpers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    rng = np.random.default_rng(0)
    for trial in range(40):
        logits = rng.normal(0, 3, 300)
        t = float(rng.choice([0.5, 1.0, 1.7]))
        k = int(rng.choice([0, 1, 5, 50]))
        tp = float(rng.choice([1.0, 0.9, 0.5, 0.2]))
        mp = float(rng.choice([0.0, 0.05, 0.3]))
        chain = [TemperatureLogitsWarper(t)]
        if k:
            chain.append(TopKLogitsWarper(k))
        if tp < 1:
            chain.append(TopPLogitsWarper(tp))
        if mp:
            chain.append(MinPLogitsWarper(mp))
        scores = LogitsProcessorList(chain)(None, torch.tensor(logits[None], dtype=torch.float64))
        want = torch.softmax(scores, -1)[0].numpy()
        got = filtered_probs(logits, t, k, tp, mp)
        assert support(got) == support(want), (t, k, tp, mp)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    rng = np.random.default_rng(1)
    for penalty in (1.0, 1.2, 0.8, 2.5):
        logits = rng.normal(0, 2, 64).astype(np.float32)
        logits[5] = 0.0
        history = rng.integers(0, 64, 30)
        history[:2] = 5                                             # repeated ids count once
        got = apply_repetition_penalty(logits, history, penalty)
        want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(history[None]), torch.tensor(logits[None]))
        np.testing.assert_allclose(got, want[0].numpy(), rtol=1e-6)
        unseen = np.setdiff1d(np.arange(64), history)
        np.testing.assert_array_equal(got[unseen], logits[unseen])
    before = logits.copy()
    apply_repetition_penalty(logits, history, 1.5)
    np.testing.assert_array_equal(logits, before)                  # the input is not modified
    assert apply_repetition_penalty(logits, np.empty(0, np.int64), 1.5) is logits


def test_sample_token_distribution():
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    n = 6000
    for params in (P(), P(top_k=3), P(top_p=0.7), P(min_p=0.3, temperature=0.8), P(temperature=1.5)):
        p = filtered_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p)
        counts = np.bincount([sample_token(logits, params, 777, step, np.empty(0, np.int64)) for step in range(n)],
                             minlength=len(p))
        assert set(np.flatnonzero(counts)) <= support(p)            # filtered tokens never drawn
        kept = p > 0
        chi2 = (((counts[kept] - n * p[kept]) ** 2) / (n * p[kept])).sum()
        dof = kept.sum() - 1
        assert chi2 < dof + 6 * math.sqrt(2 * max(dof, 1)) + 10, (params, counts, n * p)


def test_sample_token_determinism_and_greedy():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, 1000)
    empty = np.empty(0, np.int64)
    params = P(temperature=1.0)
    a = [sample_token(logits, params, 12345, s, empty) for s in range(50)]
    b = [sample_token(logits, params, 12345, s, empty) for s in range(50)]
    c = [sample_token(logits, params, 12346, s, empty) for s in range(50)]
    assert a == b and a != c
    big = 2 ** 63 + 12345                                           # 64-bit seeds use their high half too
    assert [sample_token(logits, params, big, s, empty) for s in range(50)] != a
    g = P(temperature=0.0)
    assert sample_token(logits, g, 1, 0, empty) == int(np.argmax(logits))
    # greedy with a repetition penalty demotes the seen argmax
    top = int(np.argmax(logits))
    pen = P(temperature=0.0, repetition_penalty=100.0)
    assert sample_token(logits, pen, 1, 0, np.array([top])) != top


def test_top_logprobs():
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32)
    lp, top = top_logprobs(logits, 2, 3)
    ref = logits - np.log(np.exp(logits.astype(np.float64)).sum())
    assert lp == pytest.approx(ref[2])
    assert [i for i, _ in top] == [1, 2, 0]
    assert [v for _, v in top] == pytest.approx([ref[1], ref[2], ref[0]])


def test_request_seed():
    assert request_seed(7, 0, "a") == request_seed(7, 123, "b") == 7
    assert request_seed(-1, 0, "a") == 2 ** 64 - 1
    s = request_seed(None, 0, "req-1")
    assert s == request_seed(None, 0, "req-1") and 0 <= s < 2 ** 64
    assert s != request_seed(None, 1, "req-1") and s != request_seed(None, 0, "req-2")
    assert len({request_seed(None, 0, str(i)) for i in range(1000)}) == 1000


def test_text_without_stop_strings_is_one_decode_of_the_ids():
    """Without stop strings the text is decode(token_ids) once at the end (minus a final EOS): exactly what
    transformers' decode returns, even for byte-fallback garbage after a complete character of the same byte
    run, where a growing text would have kept that character."""
    tok = _spm_tokenizer()
    h = tok.encode("h", add_special_tokens=False)
    garbage = h + [3 + 0xC3, 3 + 0xA9, 3 + 0xC3] + h            # "h", "é", a lone lead byte, "h"
    out = scripted(tok, {1: garbage + [2]}, [req("len", "hi", seed=1, max_tokens=len(garbage)),
                                             req("eos", "hi", seed=1, max_tokens=20)])
    for r in out.values():
        assert r.text == tok.decode(garbage) and "\u00e9" not in r.text
    assert out["eos"].finish_reason == "stop" and out["eos"].token_ids == garbage + [2]
    assert out["len"].finish_reason == "length" and out["len"].token_ids == garbage
