import json
import math
import os
import pickle

import pytest

from mpillm.jobio import (InputError, OutputError, OutputWriter, Request, Result, SamplingParams, check_manifest,
                          error_record, file_sha256, manifest_path, read_requests, result_record,
                          scan_existing_output, write_manifest)

DEFAULTS = SamplingParams(max_tokens=64, temperature=0.5, stop=["\n\n"])


def write_lines(tmp_path, lines, name="prompts.jsonl", bom=False) -> str:
    """Lines may be dicts (dumped as JSON) or raw strings (written as they are)."""
    text = "\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n"
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return str(path)


def read_one(tmp_path, line, defaults=DEFAULTS) -> Request:
    reqs, invalid = read_requests(write_lines(tmp_path, [line]), defaults)
    assert invalid == [] and len(reqs) == 1
    return reqs[0]


def problems_of(tmp_path, lines) -> dict[int, str]:
    with pytest.raises(InputError) as ei:
        read_requests(write_lines(tmp_path, lines), DEFAULTS)
    by_line: dict[int, str] = {}
    for n, msg in ei.value.problems:
        by_line[n] = by_line.get(n, "") + msg + " | "
    return by_line


# ---------------------------------------------------------------------------------------------------------------
# Input formats


def test_native_prompt_keeps_defaults_and_int_id(tmp_path):
    r = read_one(tmp_path, {"id": 7, "prompt": "Once upon"})
    assert (r.id, r.raw_id, r.line_no, r.prompt, r.messages, r.openai) == ("7", 7, 1, "Once upon", None, None)
    assert r.params == DEFAULTS
    assert r.params.stop is not DEFAULTS.stop  # a request must not share the defaults' list


def test_native_overrides_every_sampling_field(tmp_path):
    r = read_one(tmp_path, {"id": "a", "prompt": "x", "max_tokens": 5, "temperature": 1, "top_p": 0.9, "top_k": 40,
                            "min_p": 0.05, "repetition_penalty": 1.1, "seed": 3, "stop": "END", "logprobs": 4,
                            "ignore_eos": True})
    assert r.params == SamplingParams(max_tokens=5, temperature=1.0, top_p=0.9, top_k=40, min_p=0.05,
                                      repetition_penalty=1.1, seed=3, stop=["END"], logprobs=4, ignore_eos=True)
    assert isinstance(r.params.temperature, float)


def test_native_chat_with_content_parts_and_chat_style_logprobs(tmp_path):
    r = read_one(tmp_path, {"id": "c", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}],
         "name": "bob"}], "logprobs": True, "top_logprobs": 3, "stop": ["a", "b"]})
    assert r.prompt is None
    assert r.messages == [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hello\nworld", "name": "bob"}]
    assert (r.params.logprobs, r.params.stop) == (3, ["a", "b"])


def test_empty_prompt_is_valid_and_null_means_default_and_metadata_kept(tmp_path):
    meta = {"source": ["x", 1], "k": None}
    r = read_one(tmp_path, {"id": "e", "prompt": "", "temperature": None, "metadata": meta})
    assert r.prompt == "" and r.params.temperature == 0.5 and r.metadata == meta


def test_bom_blank_lines_crlf_and_line_numbers(tmp_path):
    path = write_lines(tmp_path, [{"id": 1, "prompt": "a"}, "", "   ", '{"id": 2, "prompt": "b\\u2028"}\r'],
                       bom=True)
    reqs, _ = read_requests(path, DEFAULTS)
    assert [(r.raw_id, r.line_no) for r in reqs] == [(1, 1), (2, 4)]
    assert reqs[1].prompt == "b\u2028"


def test_openai_completions_line(tmp_path):
    r = read_one(tmp_path, {"custom_id": "req-1", "method": "POST", "url": "/v1/completions",
                            "body": {"model": "gpt-x", "prompt": ["Say hi"], "max_tokens": 9, "temperature": 0.2,
                                     "seed": 1, "stop": None, "logprobs": 2, "n": 1, "presence_penalty": 0}})
    assert (r.id, r.raw_id, r.prompt, r.messages) == ("req-1", "req-1", "Say hi", None)
    assert r.openai == {"custom_id": "req-1", "url": "/v1/completions", "method": "POST", "model": "gpt-x"}
    assert (r.params.max_tokens, r.params.temperature, r.params.seed, r.params.logprobs) == (9, 0.2, 1, 2)
    assert r.params.stop == ["\n\n"]  # null stop keeps the default


def test_openai_chat_line(tmp_path):
    r = read_one(tmp_path, {"custom_id": "req-2", "method": "POST", "url": "/v1/chat/completions",
                            "body": {"model": "m", "messages": [{"role": "user", "content": [
                                {"type": "text", "text": "Hi"}]}], "max_completion_tokens": 12, "logprobs": True,
                                     "top_k": 5}})
    assert r.messages == [{"role": "user", "content": "Hi"}] and r.prompt is None
    assert (r.params.max_tokens, r.params.top_k) == (12, 5)
    assert r.params.logprobs == 1  # chat logprobs: true without top_logprobs still returns the chosen token's


# ---------------------------------------------------------------------------------------------------------------
# Validation


def test_many_bad_lines_give_one_error_with_every_line(tmp_path):
    lines = [
        {"id": "ok", "prompt": "fine"},                                    # 1
        '{"id": "j", "prompt": "x",}',                                     # 2 invalid JSON
        '["not", "an", "object"]',                                         # 3
        {"prompt": "no id"},                                               # 4
        {"id": 1.5, "prompt": "x"},                                        # 5
        {"id": "n"},                                                       # 6 neither
        {"id": "b", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},  # 7 both
        {"id": "t", "prompt": "x", "temperature": -0.1},                   # 8
        {"id": "p", "prompt": "x", "top_p": 0},                            # 9
        {"id": "k", "prompt": "x", "top_k": -1},                           # 10
        {"id": "mp", "prompt": "x", "min_p": 1.5},                         # 11
        {"id": "mt", "prompt": "x", "max_tokens": -1},                     # 12
        {"id": "mf", "prompt": "x", "max_tokens": 10.0},                   # 13
        {"id": "rp", "prompt": "x", "repetition_penalty": 0},              # 14
        {"id": "s", "prompt": "x", "seed": "42"},                          # 15
        {"id": "em", "messages": []},                                      # 16
        {"id": "lp", "prompt": "x", "logprobs": 21},                       # 17
        {"id": "st", "prompt": "x", "stop": [1]},                          # 18
        {"id": "ie", "prompt": "x", "ignore_eos": 1},                      # 19
        {"id": "mr", "messages": [{"content": "no role"}, "str"]},         # 20
        {"id": "pt", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},  # 21
        {"id": "zz", "prompt": "x", "colour": "red"},                      # 22 unknown, no suggestion
        '{"id": "nan", "prompt": "x", "temperature": NaN}',               # 23
        '{"id": "dk", "prompt": "x", "prompt": "y"}',                      # 24 duplicate key
        {"id": True, "prompt": "x"},                                       # 25
        {"id": "", "prompt": "x"},                                         # 26 empty id
        {"id": "ok2", "prompt": ""},                                       # 27 fine: empty prompt
    ]
    with pytest.raises(InputError) as ei:
        read_requests(write_lines(tmp_path, lines), DEFAULTS)
    err = ei.value
    bad = set(range(2, 27))
    assert {n for n, _ in err.problems} == bad
    msg = str(err)
    for n in bad:
        assert f"prompts.jsonl:{n}: " in msg
    assert "25 invalid lines" in msg
    p = problems_of(tmp_path, lines)
    expect = {2: "invalid JSON", 3: "expected a JSON object, got a list", 4: 'missing "id"', 5: 'field "id"',
              6: 'needs "prompt"', 7: "both", 8: 'field "temperature": expected a number >= 0, got -0.1',
              9: '"top_p"', 10: '"top_k"', 11: '"min_p"',
              12: 'field "max_tokens": expected a positive integer, got -1', 13: '"max_tokens"',
              14: '"repetition_penalty"', 15: '"seed"', 16: '"messages": expected a non-empty list',
              17: '"logprobs"', 18: '"stop"', 19: '"ignore_eos"', 20: 'messages[0]: missing "role"',
              21: 'part type "image_url" is not supported', 22: 'unknown field "colour" |', 23: "NaN",
              24: 'field "prompt" appears twice', 25: 'field "id"', 26: '"id": must not be empty'}
    for n, words in expect.items():
        assert words in p[n], (n, p[n])
    assert "column 27" in p[2] and 'messages[1]' in p[20]


def test_typo_suggestions(tmp_path):
    p = problems_of(tmp_path, [{"id": 1, "prompt": "x", "max_token": 3, "temprature": 1},
                               {"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                "body": {"prompt": "x", "max_tokns": 3}}])
    assert 'unknown field "max_token" (did you mean "max_tokens"?)' in p[1]
    assert '(did you mean "temperature"?)' in p[1]
    assert 'unknown field "body.max_tokns" (did you mean "body.max_tokens"?)' in p[2]


def test_duplicate_ids_name_both_lines_and_compare_as_strings(tmp_path):
    p = problems_of(tmp_path, [{"id": "a", "prompt": "x"}, {"id": 5, "prompt": "x"}, {"id": "a", "prompt": "y"},
                               {"id": "5", "prompt": "z"}])
    assert set(p) == {3, 4}
    assert 'duplicate id "a"' in p[3] and "line 1" in p[3]
    assert "duplicate id" in p[4] and "line 2" in p[4]


def test_openai_validation(tmp_path):
    p = problems_of(tmp_path, [
        {"custom_id": "a", "method": "GET", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "n": 2}},
        {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"messages": []}},
        {"custom_id": "d", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "x"}], "logprobs": 3, "top_logprobs": 2}},
        {"custom_id": "e", "method": "POST", "url": "/v1/completions", "body": {"prompt": [1, 2, 3]}},
        {"custom_id": "f", "method": "POST", "url": "/v1/completions", "body": {"prompt": ["a", "b"]}},
        {"custom_id": "g", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "x", "max_tokens": 5, "max_completion_tokens": 6, "stream": True}},
        {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},
        {"custom_id": "i", "method": "POST", "url": "/v1/completions"},
    ])
    assert '"method"' in p[1] and '"url"' in p[1] and 'unknown field "body.input"' in p[1]
    assert "only n = 1 is supported, got 2" in p[2]
    assert '"/v1/completions" takes "body.prompt", not "body.messages"' in p[3]
    assert 'field "body.logprobs": expected true or false' in p[4] and '"body.top_logprobs" needs' in p[4]
    assert "token-id prompts are not supported" in p[5]
    assert "one prompt string" in p[6]
    assert "disagree" in p[7] and '"body.stream": not supported' in p[7]
    assert 'missing "custom_id"' in p[8]
    assert 'missing "body"' in p[9]


def test_skip_invalid_returns_valid_and_invalid(tmp_path):
    path = write_lines(tmp_path, [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "x", "top_k": "5"},
                                  {"id": "a", "prompt": "dup"}, "{oops", {"id": "c", "messages": [
                                      {"role": "user", "content": "hi"}]},
                                  '{"custom_id": "z", "method": "POST", broken'])
    reqs, invalid = read_requests(path, DEFAULTS, skip_invalid=True)
    assert [r.id for r in reqs] == ["a", "c"]
    assert [(n, i) for n, _, i in invalid] == [(2, "b"), (3, None), (4, None), (6, None)]  # dup id not reused
    assert '"top_k"' in invalid[0][1] and "duplicate" in invalid[1][1]
    assert invalid[0].openai is None and invalid[3].openai == {}  # broken batch line still answered as batch
    assert pickle.loads(pickle.dumps(invalid[3])).openai == {}


def test_unreadable_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        read_requests(tmp_path / "missing.jsonl", DEFAULTS)


def test_sampling_params_problems():
    assert SamplingParams().problems() == []
    probs = SamplingParams(temperature=-1, top_p=2.0, stop=[""], logprobs=50).problems()
    assert len(probs) == 4 and any('"top_p"' in p for p in probs)


# ---------------------------------------------------------------------------------------------------------------
# Output records

LPS = [{"token_id": 5, "token": "Hi", "logprob": -0.1,
        "top_logprobs": [{"token_id": 5, "token": "Hi", "logprob": -0.1},
                         {"token_id": 9, "token": "Yo", "logprob": float("-inf")}]},
       {"token_id": 6, "token": "!", "logprob": -0.5, "top_logprobs": []}]


def make_result(tmp_path, line, **kw) -> Result:
    req = read_one(tmp_path, line)
    args = dict(text="Hi!", token_ids=[5, 6], finish_reason="stop", prompt_tokens=3, completion_tokens=2)
    args.update(kw)
    return Result(req, **args)


def test_native_record(tmp_path):
    rec = result_record(make_result(tmp_path, {"id": 3, "prompt": "x", "metadata": {"k": 1}}), "smol")
    assert rec == {"id": 3, "text": "Hi!", "token_ids": [5, 6], "finish_reason": "stop",
                   "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, "metadata": {"k": 1}}
    rec = result_record(make_result(tmp_path, {"id": "l", "prompt": "x", "logprobs": 2}, logprobs=LPS), "smol")
    assert rec["logprobs"][0]["top_logprobs"][1]["logprob"] == -9999.0  # -inf is not JSON
    assert rec["logprobs"][1]["token"] == "!"


def test_native_error_record_and_no_logprobs_unless_asked(tmp_path):
    res = make_result(tmp_path, {"id": "f", "prompt": ""}, text="", token_ids=[], finish_reason="error",
                      completion_tokens=0, logprobs=LPS, error={"type": "empty_prompt", "message": "empty"})
    rec = result_record(res, "smol")
    assert rec["finish_reason"] == "error" and rec["error"] == {"type": "empty_prompt", "message": "empty"}
    assert "logprobs" not in rec and "metadata" not in rec and rec["usage"]["total_tokens"] == 3


def test_openai_completions_record(tmp_path):
    line = {"custom_id": "q1", "method": "POST", "url": "/v1/completions",
            "body": {"model": "asked-model", "prompt": "x", "logprobs": 2}}
    rec = result_record(make_result(tmp_path, line, finish_reason="length", logprobs=LPS), "smol")
    assert rec["id"].startswith("batch_req_") and rec["custom_id"] == "q1" and rec["error"] is None
    resp = rec["response"]
    assert resp["status_code"] == 200 and resp["request_id"]
    body = resp["body"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "asked-model"
    assert isinstance(body["created"], int)
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    (choice,) = body["choices"]
    assert (choice["index"], choice["text"], choice["finish_reason"]) == (0, "Hi!", "length")
    assert choice["logprobs"] == {"tokens": ["Hi", "!"], "token_logprobs": [-0.1, -0.5],
                                  "top_logprobs": [{"Hi": -0.1, "Yo": -9999.0}, {}], "text_offset": [0, 2]}


def test_openai_chat_record_and_failure(tmp_path):
    line = {"custom_id": 42, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "x"}]}, "metadata": "m"}
    rec = result_record(make_result(tmp_path, line, logprobs=LPS), "smol")
    body = rec["response"]["body"]
    assert rec["custom_id"] == 42 and rec["metadata"] == "m"
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "smol"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi!"}
    assert body["choices"][0]["logprobs"] is None  # not asked for
    failed = make_result(tmp_path, line, finish_reason="error", error={"type": "too_long", "message": "4096 > 2048"})
    rec = result_record(failed, "smol")
    assert rec["response"] is None and rec["error"] == {"code": "too_long", "message": "4096 > 2048"}


def test_openai_chat_logprobs_shape(tmp_path):
    line = {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2}}
    lp = result_record(make_result(tmp_path, line, logprobs=LPS), "smol")["response"]["body"]["choices"][0]["logprobs"]
    first = lp["content"][0]
    assert (first["token"], first["logprob"], first["bytes"]) == ("Hi", -0.1, [72, 105])
    assert [a["token"] for a in first["top_logprobs"]] == ["Hi", "Yo"]


def test_error_records(tmp_path):
    rec = error_record(4, 'field "top_k": bad', "b")
    assert rec["id"] == "b" and rec["finish_reason"] == "error" and rec["error"]["line"] == 4
    assert rec["usage"]["total_tokens"] == 0 and rec["token_ids"] == []
    rec = error_record(6, "invalid JSON", None, openai={})
    assert rec["custom_id"] is None and rec["response"]["status_code"] == 400
    assert rec["error"]["code"] == "invalid_request" and "line 6" in rec["error"]["message"]
    assert rec["response"]["body"]["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------------------------------------------
# Output file


def lines_of(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f]


def test_writer_lines_on_disk_before_close_and_no_duplicates(tmp_path):
    out = tmp_path / "out.jsonl"
    w = OutputWriter(out)
    w.write({"id": 1, "text": "a"})
    assert lines_of(out) == [{"id": 1, "text": "a"}]  # visible immediately, writer still open
    w.write({"custom_id": "x", "response": None})
    assert len(lines_of(out)) == 2
    with pytest.raises(ValueError, match="already written"):
        w.write({"id": "1", "text": "again"})  # ids compare as str
    w.write({"id": None})  # error records without an id are not tracked
    w.write({"id": None})
    assert w.done_ids == {"1", "x"} and len(lines_of(out)) == 4
    with pytest.raises(ValueError):
        w.write({"id": 2, "bad": math.nan})  # would be invalid JSON
    w.write({"id": 3, "text": "h\u00e9 \ud800"})  # lone surrogate still gives a valid line
    w.close()
    assert lines_of(out)[-1]["text"] == "h\u00e9 \ud800"
    with pytest.raises(ValueError, match="closed"):
        w.write({"id": 9})


def test_writer_without_resume_replaces_file(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "old"}\n')
    with OutputWriter(out) as w:
        assert w.done_ids == set()
        w.write({"id": "new"})
    assert lines_of(out) == [{"id": "new"}]


def test_resume_truncates_torn_line_and_appends(tmp_path):
    out = tmp_path / "out.jsonl"
    good = b'{"id": 1, "text": "a"}\n{"custom_id": "b", "response": null}\n'
    out.write_bytes(good + b'{"id": 3, "te')  # killed mid-write
    assert scan_existing_output(out) == ({"1", "b"}, len(good))
    with OutputWriter(out, resume=True) as w:
        assert w.done_ids == {"1", "b"} and w.dropped_bytes == len(b'{"id": 3, "te')
        with pytest.raises(ValueError):
            w.write({"id": 1})
        w.write({"id": 3, "text": "c"})
    assert [r.get("id") for r in lines_of(out)] == [1, None, 3]
    assert out.read_bytes().endswith(b'"c"}\n')


def test_resume_unparsable_tail_with_newline_and_complete_file(tmp_path):
    out = tmp_path / "out.jsonl"
    good = b'{"id": 1}\n'
    out.write_bytes(good + b'\x00\x00\x00\n\n')  # zero-filled tail after a crash
    assert scan_existing_output(out) == ({"1"}, len(good))
    out.write_bytes(good)
    assert scan_existing_output(out) == ({"1"}, len(good))
    out.write_bytes(good + b'{"id": 2}')  # parses, but without its newline appending would glue lines together
    assert scan_existing_output(out) == ({"1"}, len(good))
    assert scan_existing_output(tmp_path / "none.jsonl") == (set(), 0)
    with OutputWriter(tmp_path / "fresh.jsonl", resume=True) as w:  # resume with no file yet = start
        w.write({"id": 1})
    assert lines_of(tmp_path / "fresh.jsonl") == [{"id": 1}]


def test_resume_refuses_corrupt_middle_line_and_duplicate_ids(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": 1}\n{"id": 2, oops\n{"id": 3}\n')
    with pytest.raises(OutputError, match=r"out.jsonl:2:") as ei:
        scan_existing_output(out)
    assert ei.value.line_no == 2
    with pytest.raises(OutputError):
        OutputWriter(out, resume=True)
    assert out.read_bytes().count(b"\n") == 3  # nothing was truncated
    out.write_bytes(b'{"id": 1}\n{"id": 2}\n{"id": "1"}\n')
    with pytest.raises(OutputError, match="line 1") as ei:
        scan_existing_output(out)
    assert ei.value.line_no == 3


def test_manifest_roundtrip_and_differences(tmp_path):
    out = tmp_path / "out.jsonl"
    assert check_manifest(out, {"temperature": 0.0}) == []  # nothing stored yet
    m = {"model": {"name": "smol", "sha256": "ab"}, "temperature": 0.0, "stop": ("a",), "mpillm": "0.1.0",
         "created": 1}
    write_manifest(out, m)
    assert os.path.exists(manifest_path(out)) and str(manifest_path(out)).endswith("out.jsonl.manifest.json")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert check_manifest(out, m) == []
    changed = {**m, "temperature": 0.7, "model": {"name": "smol", "sha256": "cd"}, "seed": 1, "created": 2}
    diffs = check_manifest(out, changed, ignore=("created",))
    assert diffs == ['model.sha256: "ab" -> "cd"', "seed: (not set) -> 1", "temperature: 0.0 -> 0.7"]
    assert "created: 1 -> 2" in check_manifest(out, changed)
    write_manifest(out, changed)  # replaces atomically
    assert check_manifest(out, changed) == []
    with open(manifest_path(out), "w") as f:
        f.write("{torn")
    assert "unreadable" in check_manifest(out, changed)[0]


def test_file_sha256(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert file_sha256(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_writer_fsyncs_at_most_every_interval_and_at_close(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    w = OutputWriter(tmp_path / "a.jsonl", fsync_interval=3600)
    synced.clear()  # creating the file syncs its directory
    for i in range(5):
        w.write({"id": i})
    assert synced == []
    w.close()
    assert len(synced) == 1
    w = OutputWriter(tmp_path / "b.jsonl", fsync_interval=0)
    synced.clear()
    for i in range(3):
        w.write({"id": i})
    assert len(synced) == 3
    w.close()


def test_input_error_message_is_capped_but_problems_complete(tmp_path):
    path = write_lines(tmp_path, [{"id": i, "prompt": "x", "top_k": -1} for i in range(150)])
    with pytest.raises(InputError) as ei:
        read_requests(path, DEFAULTS)
    assert len(ei.value.problems) == 150 and ei.value.problems[-1][0] == 150
    assert "... and 50 more problems" in str(ei.value) and "150 invalid lines" in str(ei.value)
