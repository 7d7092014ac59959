"""The generation loop of one model replica: requests in, finished results out, one scheduler step at a time.

The engine tokenizes, asks the scheduler what runs next, hands the step to a runner (which does the forward
pass and the sampling, on CPU or GPU, alone or for a tensor-parallel group) and turns the sampled ids into
text, stop checks and finish reasons. It never touches tensors itself.

With a runner that can launch a step and collect its ids later (launch/collect), the engine runs one step
ahead: step n + 1 is scheduled and launched before step n's ids are read back, so the host's scheduling,
staging and launch overlap the GPU's work instead of leaving it idle between steps (at batch 1 on SmolLM2
that gap was 14% of a step, on Llama-3-8B 5%). A token still on the device is PENDING in its sequence; the
next step's input for it is fed on the device (StepInput ids < 0 name a row of the previous step's samples).
A sequence that stops on EOS or a stop string is found one step late, and that one extra token is dropped;
max_tokens is known ahead, so a sequence at its limit is not scheduled again (Sequence.stopping).
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


PENDING = -1    # a sampled token not yet read back from the device (never a real id)


@dataclass
class EngineConfig:
    max_model_len: int
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefix_caching: bool = True
    global_seed: int = 0
    pipeline: bool = True          # one step ahead when the runner has launch/collect (see the module doc)


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
        self.pipelined = cfg.pipeline and hasattr(runner, "launch")
        # The step launched last and not yet read back: (runner handle, [(sequence, index of its PENDING)]).
        self._inflight = None

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
        return self.scheduler.has_work() or self._inflight is not None

    # ------------------------------------------------------------------------------------------------ step
    def step(self) -> list[Result]:
        plan = self.scheduler.schedule()
        if not plan:
            return self._resolve()       # nothing to launch: what is in flight finishes its sequences
        finished = []
        # Logprobs and repetition penalties are sampled on the host from logits: their step is run and read
        # back at once, and it needs the real ids of every sequence (its history), so what is in flight first.
        host = any(seq.num_computed + n == len(seq.token_ids) and _host_sampled(seq) for seq, n in plan)
        if host or not self.pipelined:
            finished += self._resolve()
            plan = [(seq, n) for seq, n in plan if not seq.finished]
            if not plan:
                return finished
        fed = {seq: j for j, (seq, _) in enumerate(self._inflight[1])} if self._inflight else {}
        bs = self.cfg.block_size
        sampling, samplers = [], []
        rows = []
        for seq, n in plan:
            tokens, done = seq.token_ids, seq.num_computed
            chunk = tokens[done: done + n]
            if chunk[-1] == PENDING:           # the last token, sampled by the step in flight: fed on the device
                chunk[-1] = -1 - fed[seq]
            done_prefill = done + n == len(tokens)
            rows.append((chunk, done, seq.block_table, done_prefill))
            if done_prefill:
                st: _State = seq.payload
                p = st.request.params
                hist = np.asarray(tokens, np.int64) if p.repetition_penalty != 1.0 else None
                samplers.append(seq)
                sampling.append(SampleSpec(p, st.seed, len(tokens) - seq.num_prompt, hist))
        step = StepInput.build(rows, bs)
        slots = []
        for seq in samplers:
            seq.token_ids.append(PENDING)
            slots.append((seq, len(seq.token_ids) - 1))
            seq.stopping = seq.num_generated >= seq.max_tokens    # its last token: not scheduled again
        if self.pipelined:
            handle = self.runner.launch(step, sampling)
            for seq, n in plan:
                seq.num_computed += n
            previous, self._inflight = self._inflight, (handle, slots)
            finished += self._accept(previous)
            if host:                         # already on the host: nothing may be fed from it
                finished += self._resolve()
        else:
            picks = self.runner.execute(step, sampling)
            for seq, n in plan:
                seq.num_computed += n
            finished += self._accept((picks, slots))
        if self.blocks.prefix_caching:
            # Every token below num_computed is real by now: the inputs fed this step were read back above.
            for seq, n in plan:
                if not seq.finished:
                    self.blocks.mark_computed(seq.block_table, seq.block_hashes, seq.token_ids, seq.num_computed)
        return finished

    def _resolve(self) -> list[Result]:
        """Read back the step in flight, if any."""
        inflight, self._inflight = self._inflight, None
        return self._accept(inflight)

    def _accept(self, launched) -> list[Result]:
        """Put a launched step's sampled ids in place of its PENDING tokens (a handle is collected first); returns
        the results of the sequences that finished."""
        if launched is None:
            return []
        handle, slots = launched
        picks = handle if isinstance(handle, list) else self.runner.collect(handle)
        finished = []
        for (seq, index), (token, lp) in zip(slots, picks):
            if seq.finished:                 # stopped on the token before (read back one step late)
                continue
            result = self._append(seq, index, int(token), lp)
            if result is not None:
                seq.finished = True
                self.scheduler.finish(seq)
                finished.append(result)
        return finished

    def _append(self, seq: Sequence, index: int, token: int, lp) -> Result | None:
        """token_ids[index] becomes `token`; checks whether the sequence ends there."""
        st: _State = seq.payload
        p = st.request.params
        seq.token_ids[index] = token
        if index == seq.num_prompt:
            self.prompt_tokens += seq.num_prompt
        self.completion_tokens += 1
        if lp is not None:
            st.logprobs.append(lp)

        def end(reason: str, **kw) -> Result:
            del seq.token_ids[index + 1:]    # a PENDING token of the step after, launched before we knew
            return self._result(seq, reason, **kw)
        if token in self.eos and not p.ignore_eos:
            return end("stop", eos=True)
        if st.decoder is not None:
            st.decoder.step(token)
            text = st.decoder.text
            # Only the tail can hold a new match: the last token's text plus the longest stop string.
            window = len(text) - len(st.text) + max(map(len, p.stop))
            tail_start = max(0, len(text) - window)
            hits = [i for i in (text.find(s, tail_start) for s in p.stop) if i >= 0]
            if hits:
                st.text = text[: min(hits)]
                return end("stop", truncated=True)
            st.text = text
        if index + 1 - seq.num_prompt >= seq.max_tokens:
            return end("length")
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

    def flush(self) -> list[Result]:
        """Read back the step in flight (if any) and return the results it finishes: a job stopping early
        keeps the work its last launched step completed."""
        return self._resolve()

    def abort_all(self) -> list[Request]:
        """Drop every unfinished request (preemption); returns them so the caller can report them. A step in
        flight is not waited for: its tokens belong to requests being dropped."""
        self._inflight = None
        return [seq.payload.request for seq in self.scheduler.drop_all()]


def _host_sampled(seq: Sequence) -> bool:
    p = seq.payload.request.params
    return bool(p.logprobs) or p.repetition_penalty != 1.0
