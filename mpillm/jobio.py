"""Job input/output: the JSONL prompts file in, the JSONL results file out, and the manifest beside it.

The input is read and validated in full before any model loads (`read_requests`), so a bad file fails fast with
every problem listed at once instead of dying hours into a run.

Results are written in completion order, not input order; every output line carries its request's id (native "id" or
OpenAI "custom_id"), which is also what --resume keys on to skip finished requests.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
_BOM = b"\xef\xbb\xbf"


# ----------------------------------------------------------------------------------------------------------------
# Data model


@dataclass
class SamplingParams:
    max_tokens: int = 256  # completion tokens
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int = 0  # k top log-probs per generated token in the output (0 = none)
    ignore_eos: bool = False

    def problems(self) -> list[str]:
        """The same range checks the input file gets, for defaults that come from command-line flags."""
        out = [_bad(name, expected, v) for name, (ok, expected) in _CHECKS.items()
               if hasattr(self, name) and (v := getattr(self, name)) is not None and not ok(v)]
        if not _stop_ok(self.stop):
            out.append(_bad("stop", _STOP_EXPECTED, self.stop))
        if not _logprobs_k_ok(self.logprobs):
            out.append(_bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}]", self.logprobs))
        return out


@dataclass
class Request:
    id: str  # str(raw_id): what duplicate detection and --resume compare
    raw_id: object  # the id exactly as given (str or int), echoed back in the output
    line_no: int  # 1-based line in the input file
    prompt: str | None  # raw completion text (no template)
    messages: list[dict] | None  # chat, content parts already joined; the engine applies the chat template
    params: SamplingParams
    openai: dict | None  # OpenAI Batch API lines: {"custom_id", "url", "method", "model"} to shape the answer
    metadata: object = None  # the line's "metadata", echoed back untouched (None = absent)


@dataclass
class Result:
    request: Request
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "error"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list | None = None  # per token: {"token_id", "token", "logprob", "top_logprobs": [{...}, ...]}
    error: dict | None = None  # {"type", "message"} when finish_reason == "error"


class InputError(ValueError):
    """The input file has problems. `.problems` lists every one as (line_no, message); line 0 = the whole file."""

    MAX_SHOWN = 100  # .problems keeps all of them; the message itself stays readable on a terminal

    def __init__(self, problems: list[tuple[int, str]], path: str = "input"):
        self.problems, self.path = list(problems), path
        shown = [f"{path}:{n}: {m}" if n else f"{path}: {m}" for n, m in self.problems[:self.MAX_SHOWN]]
        if len(self.problems) > self.MAX_SHOWN:
            shown.append(f"... and {len(self.problems) - self.MAX_SHOWN} more problems")
        bad_lines = len({n for n, _ in self.problems if n})
        if bad_lines:
            shown.insert(0, f"{path}: {bad_lines} invalid line{'s' * (bad_lines != 1)} "
                            "(fix them, or use --skip-invalid to run the valid ones)")
        super().__init__("\n".join(shown))


class InvalidLine(tuple):
    """One rejected input line. Unpacks exactly like the (line_no, message, raw_id) tuple; `.openai` is the line's
    {"custom_id", "url", "method"} when it looked like an OpenAI batch line, so error_record can answer in kind."""

    def __new__(cls, line_no: int, message: str, raw_id: object, openai: dict | None = None):
        self = super().__new__(cls, (line_no, message, raw_id))
        self.openai = openai
        return self

    def __getnewargs__(self):  # keeps .openai through pickling (e.g. an MPI bcast)
        return (*self, self.openai)

    line_no = property(lambda self: self[0])
    message = property(lambda self: self[1])
    raw_id = property(lambda self: self[2])


class OutputError(ValueError):
    """An existing output file cannot be resumed safely (e.g. a corrupt line that is not a torn tail)."""

    def __init__(self, message: str, line_no: int | None = None):
        super().__init__(message)
        self.line_no = line_no


# ----------------------------------------------------------------------------------------------------------------
# Field checks, shared by both input formats and SamplingParams.problems()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true must not pass as 1


def _is_num(v) -> bool:
    return (isinstance(v, float) and math.isfinite(v)) or _is_int(v)


_CHECKS = {  # name -> (accepts, what was expected)
    "max_tokens": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "max_completion_tokens": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "temperature": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "min_p": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    # Samplers seed numpy / a 64-bit device RNG, which take neither negatives nor bigger values.
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**64, "an integer in [0, 2**64)"),
    "ignore_eos": (lambda v: isinstance(v, bool), "true or false"),
}
_FLOATS = {"temperature", "top_p", "min_p", "repetition_penalty"}
_STOP_EXPECTED = "a non-empty string or a list of them"


def _stop_ok(v) -> bool:
    # An empty stop string would match at once and end every completion before it starts.
    return (isinstance(v, str) and v != "") or (isinstance(v, list) and all(isinstance(s, str) and s for s in v))


def _logprobs_k_ok(v) -> bool:
    return _is_int(v) and 0 <= v <= MAX_LOGPROBS


def _show(v) -> str:
    s = json.dumps(v, ensure_ascii=False, default=repr)
    return s if len(s) <= 60 else s[:57] + "..."


def _bad(name: str, expected: str, got) -> str:
    return f'field "{name}": expected {expected}, got {_show(got)}'


def _json_type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _unknown_fields(obj: dict, known: set[str], probs: list[str], prefix: str = "") -> None:
    for k in obj:
        if k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.75)
            hint = f' (did you mean "{prefix}{close[0]}"?)' if close else ""
            probs.append(f'unknown field "{prefix}{k}"{hint}')


def _take_id(obj: dict, key: str, probs: list[str]):
    v = obj.get(key)
    if v is None:
        probs.append(f'missing "{key}"')
    elif not (isinstance(v, str) or _is_int(v)):
        probs.append(_bad(key, "a string or an integer", v))
    elif v == "":
        probs.append(f'field "{key}": must not be empty')
    else:
        return v
    return None


def _prompt(v, name: str, probs: list[str], allow_list: bool) -> str | None:
    # An empty prompt is deliberately valid here: the engine reports it as that request's failure.
    if isinstance(v, str):
        return v
    if allow_list and isinstance(v, list):  # OpenAI allows a list of prompts; one request = one prompt here
        if len(v) == 1 and isinstance(v[0], str):
            return v[0]
        if v and all(_is_int(t) or isinstance(t, list) for t in v):
            probs.append(f'field "{name}": token-id prompts are not supported; give the text')
        else:
            probs.append(f'field "{name}": expected one prompt string, got a list of {len(v)}')
        return None
    probs.append(_bad(name, "a string", v))
    return None


def _messages(v, name: str, probs: list[str]) -> list[dict] | None:
    if not isinstance(v, list) or not v:
        probs.append(_bad(name, "a non-empty list of messages", v))
        return None
    out, n_probs = [], len(probs)
    for i, m in enumerate(v):
        at = f"{name}[{i}]"
        if not isinstance(m, dict):
            probs.append(_bad(at, 'an object with "role" and "content"', m))
            continue
        _unknown_fields(m, {"role", "content", "name"}, probs, prefix=f"{at}.")
        role, content = m.get("role"), m.get("content")
        if "role" not in m:
            probs.append(f'{at}: missing "role"')
        elif not isinstance(role, str) or not role:
            probs.append(_bad(f"{at}.role", "a non-empty string", role))
        if "content" not in m:
            probs.append(f'{at}: missing "content"')
        elif isinstance(content, list):
            content = _join_parts(content, f"{at}.content", probs)
        elif not isinstance(content, str):
            probs.append(_bad(f"{at}.content", "a string or a list of text parts", content))
        if "name" in m and not isinstance(m["name"], str):
            probs.append(_bad(f"{at}.name", "a string", m["name"]))
        out.append({"role": role, "content": content, **({"name": m["name"]} if "name" in m else {})})
    return out if len(probs) == n_probs else None


def _join_parts(parts: list, name: str, probs: list[str]) -> str:
    texts = []
    for j, p in enumerate(parts):
        at = f"{name}[{j}]"
        if not isinstance(p, dict) or "type" not in p:
            probs.append(_bad(at, 'a content part like {"type": "text", "text": ...}', p))
        elif p["type"] != "text":
            probs.append(f'field "{at}": part type {_show(p["type"])} is not supported (only "text")')
        elif not isinstance(p.get("text"), str):
            probs.append(_bad(f"{at}.text", "a string", p.get("text")))
        else:
            texts.append(p["text"])
    return "\n".join(texts)  # what vLLM does with several text parts


def _sampling(src: dict, names: set[str], defaults: SamplingParams, probs: list[str], prefix: str,
              logprobs_style: str) -> SamplingParams:
    """Per-request overrides of `defaults`. A null value means "not given" (OpenAI clients send explicit nulls).

    logprobs_style: "completions" (logprobs = int k, OpenAI legacy), "chat" (logprobs = bool + top_logprobs = k,
    OpenAI chat) or "native" (either spelling)."""
    over = {}
    for name in (n for n in _CHECKS if n in names):
        v = src.get(name)
        if v is None:
            continue
        ok, expected = _CHECKS[name]
        if ok(v):
            over[name] = float(v) if name in _FLOATS else v
        else:
            probs.append(_bad(prefix + name, expected, v))
    if "max_completion_tokens" in over:  # OpenAI's newer name for the same limit
        mct = over.pop("max_completion_tokens")
        if over.setdefault("max_tokens", mct) != mct:
            probs.append(f'fields "{prefix}max_tokens" and "{prefix}max_completion_tokens" disagree; give one')

    stop = src.get("stop")
    if stop is not None:
        if _stop_ok(stop):
            over["stop"] = [stop] if isinstance(stop, str) else list(stop)
        else:
            probs.append(_bad(prefix + "stop", _STOP_EXPECTED, stop))

    lp, top = src.get("logprobs"), src.get("top_logprobs")
    k_range = f"an integer in [0, {MAX_LOGPROBS}]"
    top_ok = top is None or _logprobs_k_ok(top)
    if top is not None and not top_ok:
        probs.append(_bad(prefix + "top_logprobs", k_range, top))
    if lp is not None:
        if isinstance(lp, bool) and logprobs_style != "completions":
            # Chat spelling. With no top_logprobs, still return each chosen token's log-prob: k = 1 (our 0 = none).
            over["logprobs"] = (top if top is not None and top_ok else max(defaults.logprobs, 1)) if lp else 0
        elif _logprobs_k_ok(lp) and logprobs_style != "chat":
            over["logprobs"] = lp
        else:
            expected = {"completions": k_range, "chat": "true or false (with top_logprobs for alternatives)",
                        "native": f"{k_range}, or true/false with top_logprobs"}[logprobs_style]
            probs.append(_bad(prefix + "logprobs", expected, lp))
    if top is not None and top_ok and lp is not True:
        probs.append(f'field "{prefix}top_logprobs" needs "{prefix}logprobs": true')

    params = dataclasses.replace(defaults, **over)
    if "stop" not in over:
        params.stop = list(defaults.stop)  # no list shared between requests
    return params


# ----------------------------------------------------------------------------------------------------------------
# Input formats

_SAMPLING = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
             "logprobs", "top_logprobs", "ignore_eos"}
_NATIVE_FIELDS = {"id", "prompt", "messages", "metadata"} | _SAMPLING
_OPENAI_FIELDS = {"custom_id", "method", "url", "body", "metadata"}
_OPENAI_URLS = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}
_BODY_IGNORED = {"model", "user", "metadata", "store"}  # accepted; "model" is echoed back in the answer
# Recognised OpenAI parameters we don't implement: fine at their neutral value, an error otherwise.
_BODY_NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "stream": False,
                 "echo": False, "best_of": 1, "suffix": None, "tools": [], "tool_choice": "none",
                 "response_format": {"type": "text"}}
# vLLM-style extensions (top_k, min_p, repetition_penalty, ignore_eos) are accepted in bodies too.
_BODY_BASE = (_SAMPLING - {"top_logprobs"}) | {"max_completion_tokens"} | _BODY_IGNORED | _BODY_NEUTRAL.keys()


def _parse_native(obj: dict, defaults: SamplingParams, probs: list[str]):
    raw_id = _take_id(obj, "id", probs)
    _unknown_fields(obj, _NATIVE_FIELDS, probs)
    prompt = messages = None
    if ("prompt" in obj) == ("messages" in obj):
        probs.append('has both "prompt" and "messages"; give one' if "prompt" in obj
                     else 'needs "prompt" (text) or "messages" (chat)')
    elif "prompt" in obj:
        prompt = _prompt(obj["prompt"], "prompt", probs, allow_list=False)
    else:
        messages = _messages(obj["messages"], "messages", probs)
    params = _sampling(obj, _NATIVE_FIELDS, defaults, probs, "", "native")
    return raw_id, prompt, messages, params, None


def _parse_openai(obj: dict, defaults: SamplingParams, probs: list[str]):
    raw_id = _take_id(obj, "custom_id", probs)
    _unknown_fields(obj, _OPENAI_FIELDS, probs)
    method, url, body = obj.get("method"), obj.get("url"), obj.get("body")
    if method != "POST":
        probs.append('missing "method" (must be "POST")' if method is None else _bad("method", '"POST"', method))
    if url not in _OPENAI_URLS:
        probs.append('missing "url"' if url is None else
                     _bad("url", '"/v1/completions" or "/v1/chat/completions"', url))
    openai = {"custom_id": raw_id, "url": url, "method": method}
    if not isinstance(body, dict):
        probs.append('missing "body"' if body is None else _bad("body", "an object", body))
        return raw_id, None, None, dataclasses.replace(defaults), openai
    openai["model"] = body.get("model")
    # With a bad url, still check the body against what it appears to be, to report everything in one pass.
    kind = _OPENAI_URLS.get(url) or ("messages" if "messages" in body else "prompt")
    other = "prompt" if kind == "messages" else "messages"
    known = _BODY_BASE | {kind} | ({"top_logprobs"} if kind == "messages" else set())
    if other in body:
        probs.append(f'"{url}" takes "body.{kind}", not "body.{other}"' if url in _OPENAI_URLS
                     else 'has both "body.prompt" and "body.messages"; give one')
    _unknown_fields({k: v for k, v in body.items() if k != other}, known, probs, prefix="body.")
    prompt = messages = None
    if kind not in body:
        if other not in body:  # else already reported as the wrong one
            probs.append(f'missing "body.{kind}"')
    elif kind == "prompt":
        prompt = _prompt(body["prompt"], "body.prompt", probs, allow_list=True)
    else:
        messages = _messages(body["messages"], "body.messages", probs)
    for name, neutral in _BODY_NEUTRAL.items():
        v = body.get(name)
        if v is not None and not (v == neutral and isinstance(v, bool) == isinstance(neutral, bool)):
            probs.append(f'field "body.{name}": only n = 1 is supported, got {_show(v)}' if name == "n" else
                         f'field "body.{name}": not supported, got {_show(v)}')
    params = _sampling(body, known, defaults, probs, "body.", "chat" if kind == "messages" else "completions")
    return raw_id, prompt, messages, params, openai


class _JSONProblem(ValueError):
    pass


def _no_duplicate_keys(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):  # json would silently keep the last one: likely an editing mistake
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _JSONProblem(f'field "{dup}" appears twice in one object')
    return d


def _reject_constant(name):
    raise _JSONProblem(f"invalid JSON: {name} is not a JSON value")


def read_requests(path, defaults: SamplingParams, *, skip_invalid: bool = False
                  ) -> tuple[list[Request], list[tuple[int, str, object | None]]]:
    """Parse and validate the whole JSONL input before any model loads.

    Returns (valid requests in file order, invalid lines as InvalidLine (line_no, message, id-or-None)). The id of
    an invalid line is None when it is missing, malformed, or a duplicate (it belongs to the earlier line), so
    writing error records for invalid lines never repeats an id. Without skip_invalid any problem raises one
    InputError listing every bad line."""
    name = os.fspath(path)
    requests: list[Request] = []
    invalid: list[InvalidLine] = []
    problems: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}  # str(id) -> line it was first used on
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError([(0, f"cannot read: {e.strerror or e}")], name) from e
    with f:
        # Binary iteration splits on b"\n" only: JSON strings may hold raw U+2028 etc., which str.splitlines breaks.
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            probs: list[str] = []
            raw_id = openai = req = None
            try:
                obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                                 parse_constant=_reject_constant)
            except UnicodeDecodeError as e:
                probs.append(f"not valid UTF-8 (byte {e.start + 1})")
            except json.JSONDecodeError as e:
                probs.append(f"invalid JSON: {e.msg} at column {e.colno}")
                openai = {} if b'"custom_id"' in raw else None  # answer a broken batch line in batch shape
            except _JSONProblem as e:
                probs.append(str(e))
            else:
                if not isinstance(obj, dict):
                    probs.append(f"expected a JSON object, got {_json_type(obj)}")
                else:
                    is_openai = any(k in obj for k in ("custom_id", "body", "url", "method"))
                    raw_id, prompt, messages, params, openai = (_parse_openai if is_openai else _parse_native)(
                        obj, defaults, probs)
                    if raw_id is not None:
                        key = str(raw_id)
                        if key in first_line:
                            probs.append(f"duplicate id {_show(raw_id)} (first used on line {first_line[key]})")
                            raw_id = None
                            if openai:
                                openai["custom_id"] = None
                        else:
                            first_line[key] = line_no
                    if not probs:
                        req = Request(str(raw_id), raw_id, line_no, prompt, messages, params, openai,
                                      obj.get("metadata"))
            if req is not None:
                requests.append(req)
            else:
                problems.extend((line_no, p) for p in probs)
                invalid.append(InvalidLine(line_no, "; ".join(probs), raw_id, openai))
    if problems and not skip_invalid:
        raise InputError(problems, name)
    return requests, invalid


# ----------------------------------------------------------------------------------------------------------------
# Output records


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": int(prompt_tokens), "completion_tokens": int(completion_tokens),
            "total_tokens": int(prompt_tokens) + int(completion_tokens)}


def _lp(x) -> float:
    # -inf (a masked-out token) is not JSON; clamp like OpenAI/vLLM do. NaN stays NaN and is refused at write time.
    return max(float(x), -9999.0)


def _native_logprobs(lps: list) -> list:
    return [{"token_id": int(t["token_id"]), "token": t["token"], "logprob": _lp(t["logprob"]),
             "top_logprobs": [{"token_id": int(a["token_id"]), "token": a["token"], "logprob": _lp(a["logprob"])}
                              for a in t.get("top_logprobs") or []]} for t in lps]


def _completions_logprobs(lps: list) -> dict:
    offsets, pos = [], 0
    for t in lps:
        offsets.append(pos)
        pos += len(t["token"])
    return {"tokens": [t["token"] for t in lps], "token_logprobs": [_lp(t["logprob"]) for t in lps],
            "top_logprobs": [{a["token"]: _lp(a["logprob"]) for a in t.get("top_logprobs") or []} for t in lps],
            "text_offset": offsets}


def _chat_logprobs(lps: list) -> dict:
    def entry(t):
        return {"token": t["token"], "logprob": _lp(t["logprob"]),
                "bytes": list(t["token"].encode("utf-8", "replace"))}
    return {"content": [{**entry(t), "top_logprobs": [entry(a) for a in t.get("top_logprobs") or []]}
                        for t in lps], "refusal": None}


def _hex() -> str:
    return uuid.uuid4().hex


def result_record(result: Result, model_name: str) -> dict:
    """The output line for one finished request, in the shape of the format it came in."""
    req = result.request
    failed = result.finish_reason == "error"
    error = result.error or {"type": "error", "message": "request failed"}
    want_lp = req.params.logprobs > 0
    if req.openai is None:
        rec = {"id": req.raw_id, "text": result.text, "token_ids": [int(t) for t in result.token_ids],
               "finish_reason": result.finish_reason, "usage": _usage(result.prompt_tokens, result.completion_tokens)}
        if want_lp:
            rec["logprobs"] = None if result.logprobs is None else _native_logprobs(result.logprobs)
        if failed:
            rec["error"] = error
        if req.metadata is not None:
            rec["metadata"] = req.metadata
        return rec

    oa = req.openai
    rec = {"id": f"batch_req_{_hex()}", "custom_id": req.raw_id}
    if failed:  # not an HTTP-level answer: no response body, the reason goes in "error"
        rec.update(response=None, error={"code": error.get("type", "error"), "message": error.get("message", "")})
    else:
        chat = oa["url"] == "/v1/chat/completions"
        lps = None
        if want_lp and result.logprobs is not None:
            lps = (_chat_logprobs if chat else _completions_logprobs)(result.logprobs)
        choice = {"index": 0, **({"message": {"role": "assistant", "content": result.text}} if chat
                                 else {"text": result.text}), "logprobs": lps, "finish_reason": result.finish_reason}
        body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{_hex()}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": oa.get("model") or model_name, "choices": [choice],
                "usage": _usage(result.prompt_tokens, result.completion_tokens)}
        rec.update(response={"status_code": 200, "request_id": f"req_{_hex()}", "body": body}, error=None)
    if req.metadata is not None:
        rec["metadata"] = req.metadata
    return rec


def error_record(line_no: int, message: str, raw_id, openai: dict | None = None) -> dict:
    """The output line for an input line rejected under --skip-invalid (pass InvalidLine.openai as `openai`)."""
    if openai is None:
        return {"id": raw_id, "text": "", "token_ids": [], "finish_reason": "error", "usage": _usage(0, 0),
                "error": {"type": "invalid_request", "message": message, "line": line_no}}
    # As the Batch API answers a request it rejects: an HTTP 400 with an error body.
    msg = f"line {line_no}: {message}"
    return {"id": f"batch_req_{_hex()}", "custom_id": raw_id,
            "response": {"status_code": 400, "request_id": f"req_{_hex()}",
                         "body": {"error": {"message": msg, "type": "invalid_request_error", "param": None,
                                            "code": None}}},
            "error": {"code": "invalid_request", "message": msg}}


# ----------------------------------------------------------------------------------------------------------------
# Output file


def _record_id(record: dict) -> str | None:
    raw = record["custom_id"] if "custom_id" in record else record.get("id")
    return None if raw is None else str(raw)


def _fsync_dir(path: str) -> None:
    # Makes a newly created or renamed file's directory entry durable, not only its data.
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def scan_existing_output(path) -> tuple[set[str], int]:
    """For --resume: the ids an existing output already holds, and the byte length of its valid prefix.

    A torn tail (a last line with no newline, or unparsable final lines, as a kill or crash mid-write leaves) is
    left out of the prefix so it can be cut off. Anything unparsable before valid data, or an id seen twice, raises
    OutputError with the line number: resuming must never silently drop or duplicate data. A missing file is empty."""
    ids: dict[str, int] = {}
    good = offset = 0
    bad: tuple[int, str] | None = None  # an unparsable line: fine only if nothing but blank lines follows
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return set(), 0
    with f:
        for line_no, raw in enumerate(f, 1):
            offset += len(raw)
            if not raw.strip():
                continue
            if bad:
                raise OutputError(f"{os.fspath(path)}:{bad[0]}: {bad[1]}, and data follows it; refusing to resume "
                                  "(fix or remove that line)", bad[0])
            if not raw.endswith(b"\n"):
                break  # torn last line
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {_json_type(obj)}")
            except ValueError as e:
                bad = (line_no, f"unparsable line ({e})")
                continue
            key = _record_id(obj)
            if key is not None:
                if key in ids:
                    raise OutputError(f"{os.fspath(path)}:{line_no}: id {key!r} already on line {ids[key]}", line_no)
                ids[key] = line_no
            good = offset
    return set(ids), good


class OutputWriter:
    """Append-only JSONL writer, used by rank 0 only.

    Each record goes to the OS in one write() as one line as soon as it is given (a killed job keeps every
    finished line), and is fsync'd at most every `fsync_interval` seconds plus at close (a power loss loses at most
    that much). An id already in the file is refused, so the output never holds an id twice.
    Without resume an existing file is replaced; with resume it is scanned, its torn tail cut off, and appended to."""

    def __init__(self, path, *, resume: bool = False, fsync_interval: float = 1.0):
        self.path = os.fspath(path)
        self.fsync_interval = fsync_interval
        self.done_ids: set[str] = set()
        self.dropped_bytes = 0  # size of the torn tail cut off on resume, for the CLI to report
        if resume and os.path.exists(self.path):
            self.done_ids, keep = scan_existing_output(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            self.dropped_bytes = os.fstat(self._fd).st_size - keep
            if self.dropped_bytes:
                os.ftruncate(self._fd, keep)
                os.fsync(self._fd)
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
            _fsync_dir(os.path.dirname(self.path))
        self._last_sync = time.monotonic()

    def write(self, record: dict) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: writer is closed")
        key = _record_id(record)
        if key is not None and key in self.done_ids:
            raise ValueError(f"{self.path}: id {key!r} was already written")
        try:  # allow_nan=False: NaN/Infinity would make the line invalid JSON
            line = json.dumps(record, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (e.g. half a token): \u-escapes keep the line valid
            line = json.dumps(record, allow_nan=False).encode("ascii")
        view = memoryview(line + b"\n")
        while view:  # os.write may write less than asked
            view = view[os.write(self._fd, view):]
        if key is not None:
            self.done_ids.add(key)
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_interval:
            os.fsync(self._fd)
            self._last_sync = now

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# Manifest: what produced an output, so --resume can refuse to mix results from different settings


def manifest_path(output_path) -> str:
    return os.fspath(output_path) + ".manifest.json"


def write_manifest(output_path, manifest: dict) -> None:
    """Write OUT.jsonl.manifest.json atomically: readers see the old manifest or the new one, never half of one."""
    path = manifest_path(output_path)
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_manifest(output_path, manifest: dict, *, ignore=()) -> list[str]:
    """Differences between the stored manifest and `manifest`, one readable line each ("temperature: 0.0 -> 0.7",
    nested keys dotted); [] when they match or nothing is stored. Keys in `ignore` (or under them) are skipped,
    for fields like timestamps that legitimately change between runs."""
    path = manifest_path(output_path)
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return []
    except ValueError as e:
        return [f"stored manifest {path} is unreadable ({e})"]
    new = json.loads(json.dumps(manifest))  # compare as stored: tuples become lists, etc.
    a, b = _flatten(old), _flatten(new)
    missing = object()

    def show(v):
        return "(not set)" if v is missing else json.dumps(v, ensure_ascii=False, sort_keys=True)

    diffs = []
    for k in sorted(a.keys() | b.keys()):
        if any(k == i or k.startswith(i + ".") for i in ignore):
            continue
        va, vb = a.get(k, missing), b.get(k, missing)
        if show(va) != show(vb):  # by JSON text, so 1 vs true or 1 vs 1.0 count as changes
            diffs.append(f"{k}: {show(va)} -> {show(vb)}")
    return diffs


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
