"""Continuous batching across requests for the HTTP server, on the one decode engine.

One background thread owns the models and one :class:`~mavis_align.decoding.engine.DecodeState`.
Concurrent requests, each with its own objective weights lambda, beta, candidate count,
temperature (0 = greedy), min/max length, stop strings and seed, share decode steps: lambda and beta
only enter after the value forward, so one base forward and one forward per value trunk serve the
whole batch. New requests are prefilled on their own and merged into the running batch between
steps; finished or abandoned requests leave it. Sampler, stop rule and finish reasons are the
engine's, so a request gives the same text here as through ``MavisDecoder.generate`` with the
same seed, alone or beside other requests.

Memory is bounded by a :class:`MemoryBudget`: requests join the batch only while the batch's KV
positions, value-candidate positions and prefill stay within it (the rest wait in order), and a
request that could never fit is refused at submission (:class:`OverBudget`). :meth:`Scheduler.drain`
stops new submissions and lets the live requests finish, ending those still running after a grace
period with the finish reason ``"abort"``.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..decoding.engine import DecodedRow, DecodeState, RowSpec, row_generator
from ..decoding.steppers import CachedBase, CachedValueScorer
from ..generation import SamplingConfig, cut_at_stop, left_pad, stop_checker


@dataclass
class GenRequest:
    """One generation request and its live state.

    ``weights`` is None for plain sampling from pi_ref (top ``config.top_k``, 0 = full vocabulary);
    otherwise an [M] tensor summing to 1 and the token is drawn from pi_MAVIS over the top-k
    candidates. ``emit(event)`` is called from the engine thread with {"type": "token", "text":
    delta} and finally {"type": "done", ...}.
    """

    prompt_ids: list[int]
    config: SamplingConfig
    emit: Callable[[dict], None]
    weights: torch.Tensor | None = None
    beta: float = 1.0
    seed: int | None = None
    id: str = ""
    reward_names: tuple[str, ...] = ()
    reward_prompt: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    record: DecodedRow = field(default_factory=DecodedRow)
    text: str = ""
    finish_reason: str | None = None
    created: float = field(default_factory=time.time)

    @property
    def tokens(self) -> list[int]:
        return self.record.token_ids

    @property
    def need(self) -> int:
        """Positions this request may occupy at its end: prompt + max_tokens."""
        return len(self.prompt_ids) + self.config.max_new_tokens

    @property
    def logprobs_ref(self) -> list[float]:
        return self.record.logprobs_ref

    @property
    def logprobs_gen(self) -> list[float]:
        return self.record.logprobs_gen


class OverBudget(ValueError):
    """A request that could never fit the server's :class:`MemoryBudget`, even alone."""


class ShuttingDown(RuntimeError):
    """The scheduler is draining (:meth:`Scheduler.drain`) and takes no new requests."""


def kv_bytes_per_position(model) -> int:
    """Bytes one sequence position takes in ``model``'s KV cache: 2 (keys, values) x layers x KV heads
    x head size x the parameters' element size (from the transformers config)."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    size = next(model.parameters()).element_size()
    return 2 * int(cfg.num_hidden_layers) * kv_heads * head_dim * size


def total_memory_bytes(device) -> int:
    """Physical memory of ``device``: the GPU's own memory on CUDA, else the machine's RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass(frozen=True)
class MemoryBudget:
    """What the live batch may hold at once (all in token positions).

    Attributes:
        kv_tokens: rows x the longest row's final length (prompt + max_tokens). A left-padded batch
            is as wide as its longest live row, so this bounds every KV cache (base model and value
            trunks) over the batch's whole life.
        candidates: tilted rows x (1 + the largest tilted top-k): the positions of one value-model
            forward (each tilted row's chosen token and its candidates).
        prefill_tokens: new prompts x the longest of them: the positions prefilled in one go.
    """

    kv_tokens: int
    candidates: int = 4096
    prefill_tokens: int = 16384

    def __post_init__(self):
        for name in ("kv_tokens", "candidates", "prefill_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"memory budget {name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def for_models(cls, model, value_models: Sequence = (), *, fraction: float = 0.25, at_least: int = 0, **kw) -> "MemoryBudget":
        """KV positions filling ``fraction`` of the device's memory with the caches of ``model`` and of
        every distinct value trunk (at least ``at_least``: one request of the largest legal size)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"the memory fraction must be in (0, 1], got {fraction}")
        trunks = {vm.trunk_key or f"own-{i}": vm.backbone for i, vm in enumerate(value_models)}
        per_position = kv_bytes_per_position(model) + sum(kv_bytes_per_position(b) for b in trunks.values())
        device = next(model.parameters()).device
        return cls(kv_tokens=max(int(at_least), int(fraction * total_memory_bytes(device)) // per_position), **kw)

    def usage(self, rows: Sequence["GenRequest"], new: Sequence["GenRequest"] = ()) -> dict[str, int]:
        """The positions ``rows`` (the live batch and ``new`` joining it) take, per budget item."""
        every = list(rows) + list(new)
        tilted = [r.config.top_k for r in every if r.weights is not None]
        return {
            "kv_tokens": len(every) * max((r.need for r in every), default=0),
            "candidates": len(tilted) * (1 + max(tilted)) if tilted else 0,
            "prefill_tokens": len(new) * max((len(r.prompt_ids) for r in new), default=0),
        }

    def fits(self, rows: Sequence["GenRequest"], new: Sequence["GenRequest"] = ()) -> bool:
        use = self.usage(rows, new)
        return all(use[k] <= getattr(self, k) for k in use)

    def check_alone(self, req: "GenRequest") -> None:
        """Raise :class:`OverBudget` (one line) if ``req`` could not run even in an empty batch."""
        use = self.usage([], [req])
        over = [k for k in use if use[k] > getattr(self, k)]
        if over:
            k = over[0]
            what = {"kv_tokens": f"prompt + max_tokens = {req.need} tokens", "candidates": f"top_k {req.config.top_k} (+1)",
                    "prefill_tokens": f"a prompt of {len(req.prompt_ids)} tokens"}[k]
            raise OverBudget(f"{what} exceeds this server's memory budget of {getattr(self, k)} {k.replace('_', ' ')}")


class Scheduler:
    """Runs the shared decode loop in a daemon thread.

    Args:
        model, tokenizer: pi_ref.
        value_models, bindings: from a :class:`~mavis_align.decoding.decoder.MavisDecoder`.
        max_batch: most requests decoded together; others wait in the queue.
        max_queue: most requests waiting; :meth:`submit` raises ``queue.Full`` beyond (HTTP 429).
        rewards: {name: reward function} for requests that ask for their rewards.
        budget: the memory bound (default :meth:`MemoryBudget.for_models`: a quarter of the
            device's memory for KV caches).
    """

    def __init__(self, model, tokenizer, value_models: Sequence = (), bindings: Sequence = (), *, max_batch: int = 16,
                 max_queue: int = 64, rewards: dict | None = None, start_thread: bool = True, budget: MemoryBudget | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.value_models, self.bindings = list(value_models), list(bindings)
        self.max_batch = max_batch
        self.budget = budget or MemoryBudget.for_models(model, self.value_models)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        self.inbox: queue.Queue[GenRequest] = queue.Queue(maxsize=max_queue)
        self.waiting: collections.deque[GenRequest] = collections.deque()  # taken from the inbox, waiting for room
        self.state: DecodeState | None = None
        self.stats = {"steps": 0, "tokens": 0, "requests": 0, "max_batch_seen": 0, "steps_waiting_for_memory": 0}
        self.drain_deadline: float | None = None
        self._seed_counter = itertools.count(1)
        self.rewards = dict(rewards or {})
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.thread = None
        if start_thread:
            self.thread = threading.Thread(target=self.run, name="mavis-scheduler", daemon=True)
            self.thread.start()

    @property
    def active(self) -> list[GenRequest]:
        return [] if self.state is None else list(self.state.keys)

    # ------------------------------------------------------------------ API

    def submit(self, req: GenRequest) -> None:
        """Queue a request; raises ``queue.Full`` when ``max_queue`` requests already wait,
        :class:`OverBudget` when it could never fit the memory budget, :class:`ShuttingDown` while draining."""
        if self.drain_deadline is not None:
            raise ShuttingDown("the server is shutting down")
        self.budget.check_alone(req)
        self.inbox.put_nowait(req)
        self._wake.set()

    @property
    def queued(self) -> int:
        return self.inbox.qsize() + len(self.waiting)

    def drain(self, grace_s: float) -> None:
        """Take no new requests; :meth:`run` returns once the accepted ones are done, ending those still
        running after ``grace_s`` seconds with the finish reason ``"abort"`` (a second call can shorten it)."""
        deadline = time.monotonic() + max(0.0, float(grace_s))
        self.drain_deadline = deadline if self.drain_deadline is None else min(self.drain_deadline, deadline)
        self._wake.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    # ------------------------------------------------------------------ engine thread

    def run(self) -> None:
        """The decode loop; runs until :meth:`shutdown`. Call it from the thread that loaded the
        models when possible: on small CPUs, a second thread running torch ops creates a second
        OpenMP team and roughly halves throughput (measured: 23 -> 13.5 tok/s on 2 cores)."""
        while not self._stop.is_set():
            try:
                if self.drain_deadline is not None:
                    if time.monotonic() >= self.drain_deadline:
                        for req in self.active + self._take_queued():
                            if req.finish_reason is None:
                                self._finish(req, "abort")
                        self.state = None
                    if not self.active and not self.queued:
                        return
                self._admit()
                if not self.active:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._step()
            except Exception as err:  # never leave clients hanging: fail every live request
                for req in self.active + self._take_queued():
                    req.finish_reason = "error"
                    req.emit({"type": "error", "message": f"{type(err).__name__}: {err}"})
                self.state = None

    def _take_queued(self) -> list[GenRequest]:
        out = list(self.waiting)
        self.waiting.clear()
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except queue.Empty:
                return out

    def _spec(self, req: GenRequest) -> RowSpec:
        seed = req.seed if req.seed is not None else next(self._seed_counter) * 7919
        return RowSpec(req.config, weights=req.weights, beta=req.beta, generator=row_generator(seed),
                       stop_check=stop_checker(self.tokenizer, req.config.stop_strings))

    def _next(self) -> GenRequest | None:
        if self.waiting:
            return self.waiting.popleft()
        try:
            return self.inbox.get_nowait()
        except queue.Empty:
            return None

    @torch.no_grad()
    def _admit(self) -> None:
        """Move waiting requests into the batch, in order, while they fit ``max_batch`` and the budget."""
        live = self.active
        room = self.max_batch - len(live)
        new = []
        while room > 0:
            req = self._next()
            if req is None:
                break
            if req.cancelled.is_set():
                continue
            if not self.budget.fits(live, new + [req]):
                self.waiting.appendleft(req)  # first in line: it joins when rows leave
                if not new:
                    self.stats["steps_waiting_for_memory"] += 1
                break
            new.append(req)
            room -= 1
        if not new:
            return
        device = next(self.model.parameters()).device
        ids, mask = left_pad([r.prompt_ids for r in new], self.pad_id, device)
        if self.state is None:
            make_scorer = (lambda: CachedValueScorer(self.value_models, self.bindings)) if self.value_models else None
            self.state = DecodeState(lambda: CachedBase(self.model), make_scorer, len(self.bindings), self.eos_id)
        n0 = len(self.state)
        try:
            self.state.admit(ids, mask, [self._spec(r) for r in new], new)
        except Exception:
            for r in new:  # find the culprit: admit one by one, fail only the requests that cannot start
                self._admit_alone(r, device)
        for r, rec in zip(self.state.keys[n0:], self.state.records[n0:]):
            r.record = rec
        self.stats["requests"] += len(new)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(self.state))

    def _admit_alone(self, req: GenRequest, device) -> None:
        """Admit one request; if it cannot start, it alone gets the error (its neighbours go on)."""
        try:
            self.state.admit(*left_pad([req.prompt_ids], self.pad_id, device), [self._spec(req)], [req])
        except Exception as err:
            req.finish_reason = "error"
            req.emit({"type": "error", "message": f"{type(err).__name__}: {err}"})

    def _publish(self, req: GenRequest) -> None:
        """Emit the text that is new since the last step (cut before any stop string)."""
        text, _ = cut_at_stop(self.tokenizer.decode(req.tokens, skip_special_tokens=True), req.config.stop_strings)
        delta = text[len(req.text):] if text.startswith(req.text) else ""
        req.text = text
        if delta:
            req.emit({"type": "token", "text": delta})

    def _finish(self, req: GenRequest, reason: str) -> None:
        req.finish_reason = reason
        scores = {}
        for name in req.reward_names:
            if name in self.rewards:  # scored here: torch work stays on the engine thread
                scores[name] = float(self.rewards[name]([req.reward_prompt], [req.text.strip()])[0])
        req.emit({"type": "done", "rewards": scores})

    @torch.no_grad()
    def _step(self) -> None:
        state = self.state
        gone = [r for r in state.keys if r.cancelled.is_set()]
        if gone:
            state.select([i for i, r in enumerate(state.keys) if not r.cancelled.is_set()])
            for r in gone:
                self._finish(r, "cancelled")
            if not len(state):
                self.state = None
                return
        live = list(state.keys)
        done = state.step()
        self.stats["steps"] += 1
        self.stats["tokens"] += len(live)
        for r in live:
            self._publish(r)
        for r, rec in done:
            self._finish(r, rec.finish_reason)
        if not len(state):
            self.state = None
