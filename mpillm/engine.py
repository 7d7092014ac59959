"""The generation loop of one model replica: requests in, finished results out, one scheduler step at a time.

The engine tokenizes, asks the scheduler what runs next, hands the step to a runner (which does the forward
pass and the sampling, on CPU or GPU, alone or for a tensor-parallel group) and turns the sampled ids into
text, stop checks and finish reasons. It never touches tensors itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mpillm.batch import StepInput
from mpillm.block_manager import BlockManager
from mpillm.jobio import Request, Result
from mpillm.sampler import request_seed
from mpillm.scheduler import Scheduler, Sequence
from mpillm.tokenizer import IncrementalDecoder


@dataclass
class EngineConfig:
    max_model_len: int
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefix_caching: bool = True
    global_seed: int = 0


@dataclass(slots=True)
class SampleSpec:
    """What a runner needs to pick one sequence's next token."""
    params: object                 # jobio.SamplingParams
    seed: int
    step: int                      # index of the token being generated
    history: np.ndarray | None     # prompt + output ids, only when a repetition penalty needs them


@dataclass
class _State:
    request: Request
    seed: int
    decoder: IncrementalDecoder | None   # only with stop strings, which need the text as it grows
    text: str = ""
    logprobs: list = field(default_factory=list)


class RequestError(ValueError):
    """A request this model cannot serve (empty, longer than the context): reported, the job goes on."""


class Engine:
    def __init__(self, runner, tokenizer, cfg: EngineConfig):
        self.runner, self.tokenizer, self.cfg = runner, tokenizer, cfg
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.eos = tokenizer.eos_ids
        self._next_id = 0
        self.prompt_tokens = self.completion_tokens = 0

    # ---------------------------------------------------------------------------------------------- intake
    def tokenize(self, req: Request) -> list[int]:
        if req.messages is not None:
            return self.tokenizer.encode_chat(req.messages)
        return self.tokenizer.encode(req.prompt, add_special_tokens=True)

    def add(self, req: Request, prompt_ids: list[int] | None = None) -> Result | None:
        """Queue a request (already tokenized when `prompt_ids` is given); a request that cannot run returns
        its error result at once."""
        try:
            ids = list(prompt_ids) if prompt_ids is not None else self.tokenize(req)
        except ValueError as e:
            return self._error(req, "invalid_request", str(e), 0)
        if not ids:
            return self._error(req, "invalid_request", "prompt is empty (no tokens to condition on)", 0)
        room = self.cfg.max_model_len - len(ids)
        if room <= 0:
            return self._error(req, "context_length_exceeded",
                               f"prompt has {len(ids)} tokens; the context holds {self.cfg.max_model_len} "
                               f"(--max-model-len) and at least one must be generated", len(ids))
        need = min(len(ids) + req.params.max_tokens, self.cfg.max_model_len)
        if self.blocks.blocks_needed(need) > self.cfg.num_blocks:
            return self._error(req, "kv_cache_too_small",
                               f"the request needs KV cache for {need} tokens; the cache holds "
                               f"{self.cfg.num_blocks * self.cfg.block_size}", len(ids))
        # Without stop strings nobody reads the text before the end: one decode then, instead of two small
        # decodes per token (with a real tokenizer, 1.9 against 0.13 us per token on SmolLM2's).
        state = _State(req, request_seed(req.params.seed, self.cfg.global_seed, req.id),
                       IncrementalDecoder(self.tokenizer) if req.params.stop else None)
        # max_tokens past the context is not an error: generation stops at the context end with "length".
        seq = Sequence(self._next_id, list(ids), len(ids), min(req.params.max_tokens, room), state)
        self._next_id += 1
        self.scheduler.add(seq)
        return None

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------------------------------------ step
    def step(self) -> list[Result]:
        plan = self.scheduler.schedule()
        if not plan:
            return []
        bs = self.cfg.block_size
        sampling, samplers = [], []
        rows = []
        for seq, n in plan:
            tokens, done = seq.token_ids, seq.num_computed
            done_prefill = done + n == len(tokens)
            rows.append((tokens[done: done + n], done, seq.block_table, done_prefill))
            if done_prefill:
                st: _State = seq.payload
                p = st.request.params
                hist = np.asarray(tokens, np.int64) if p.repetition_penalty != 1.0 else None
                samplers.append(seq)
                sampling.append(SampleSpec(p, st.seed, len(tokens) - seq.num_prompt, hist))
        step = StepInput.build(rows, bs)
        picks = self.runner.execute(step, sampling)
        publish = self.blocks.mark_computed if self.blocks.prefix_caching else None
        for seq, n in plan:
            seq.num_computed += n
            if publish is not None:
                publish(seq.block_table, seq.block_hashes, seq.token_ids, seq.num_computed)
        finished = []
        for seq, (token, lp) in zip(samplers, picks):
            if seq.num_generated == 0:
                self.prompt_tokens += seq.num_prompt
            result = self._append(seq, int(token), lp)
            if result is not None:
                self.scheduler.finish(seq)
                finished.append(result)
        return finished

    def _append(self, seq: Sequence, token: int, lp) -> Result | None:
        st: _State = seq.payload
        p = st.request.params
        seq.token_ids.append(token)
        self.completion_tokens += 1
        if lp is not None:
            st.logprobs.append(lp)
        if token in self.eos and not p.ignore_eos:
            return self._result(seq, "stop", eos=True)
        if st.decoder is not None:
            st.decoder.step(token)
            text = st.decoder.text
            # Only the tail can hold a new match: the last token's text plus the longest stop string.
            window = len(text) - len(st.text) + max(map(len, p.stop))
            tail_start = max(0, len(text) - window)
            hits = [i for i in (text.find(s, tail_start) for s in p.stop) if i >= 0]
            if hits:
                st.text = text[: min(hits)]
                return self._result(seq, "stop", truncated=True)
            st.text = text
        if seq.num_generated >= seq.max_tokens:
            return self._result(seq, "length")
        return None

    def _result(self, seq: Sequence, reason: str, truncated: bool = False, eos: bool = False) -> Result:
        """eos: the last token is the EOS that ended the sequence; it is in token_ids, not in the text."""
        st: _State = seq.payload
        out = seq.token_ids[seq.num_prompt:]
        if truncated:
            text = st.text
        elif st.decoder is not None:
            st.decoder.flush()   # a cut mid-character shows as U+FFFD, exactly as a full decode would
            text = st.decoder.text
        else:
            text = self.tokenizer.decode(out[:-1] if eos else out, True)
        return Result(request=st.request, text=text, token_ids=list(out), finish_reason=reason,
                      prompt_tokens=seq.num_prompt, completion_tokens=len(out),
                      logprobs=self._logprobs(st) if st.request.params.logprobs else None)

    def _logprobs(self, st: _State):
        dec = self.tokenizer.decode
        return [{"token_id": t, "token": dec([t], skip_special_tokens=False), "logprob": lp,
                 "top_logprobs": [{"token_id": i, "token": dec([i], skip_special_tokens=False), "logprob": v}
                                  for i, v in top]}
                for t, lp, top in st.logprobs]

    def _error(self, req: Request, kind: str, message: str, prompt_tokens: int) -> Result:
        return Result(request=req, text="", token_ids=[], finish_reason="error", prompt_tokens=prompt_tokens,
                      completion_tokens=0, error={"type": kind, "message": message})

    def abort_all(self) -> list[Request]:
        """Drop every unfinished request (preemption); returns them so the caller can report them."""
        return [seq.payload.request for seq in self.scheduler.drop_all()]
