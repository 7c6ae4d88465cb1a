"""Continuous batching across requests for the HTTP server, on the one decode engine.

One background thread owns the models and one :class:`~mavis_align.decoding.engine.DecodeState`.
Concurrent requests, each with its own objective weights lambda, beta, candidate count,
temperature (0 = greedy), min/max length, stop strings and seed, share decode steps: lambda and beta
only enter after the value forward, so one base forward and one forward per value trunk serve the
whole batch. New requests are prefilled on their own and merged into the running batch between
steps; finished or abandoned requests leave it. Sampler, stop rule and finish reasons are the
engine's, so a request gives the same text here as through ``MavisDecoder.generate`` with the
same seed, alone or beside other requests.
"""

from __future__ import annotations

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
    def logprobs_ref(self) -> list[float]:
        return self.record.logprobs_ref

    @property
    def logprobs_gen(self) -> list[float]:
        return self.record.logprobs_gen


class Scheduler:
    """Runs the shared decode loop in a daemon thread.

    Args:
        model, tokenizer: pi_ref.
        value_models, bindings: from a :class:`~mavis_align.decoding.decoder.MavisDecoder`.
        max_batch: most requests decoded together; others wait in the queue.
        max_queue: most requests waiting; :meth:`submit` raises ``queue.Full`` beyond (HTTP 429).
        rewards: {name: reward function} for requests that ask for their rewards.
    """

    def __init__(self, model, tokenizer, value_models: Sequence = (), bindings: Sequence = (), *, max_batch: int = 16,
                 max_queue: int = 64, rewards: dict | None = None, start_thread: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.value_models, self.bindings = list(value_models), list(bindings)
        self.max_batch = max_batch
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        self.inbox: queue.Queue[GenRequest] = queue.Queue(maxsize=max_queue)
        self.state: DecodeState | None = None
        self.stats = {"steps": 0, "tokens": 0, "requests": 0, "max_batch_seen": 0}
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
        """Queue a request; raises ``queue.Full`` when ``max_queue`` requests already wait."""
        self.inbox.put_nowait(req)
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
                self._admit()
                if not self.active:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._step()
            except Exception as err:  # never leave clients hanging: fail every live request
                for req in self.active + self._drain():
                    req.finish_reason = "error"
                    req.emit({"type": "error", "message": f"{type(err).__name__}: {err}"})
                self.state = None

    def _drain(self) -> list[GenRequest]:
        out = []
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except queue.Empty:
                return out

    def _spec(self, req: GenRequest) -> RowSpec:
        seed = req.seed if req.seed is not None else next(self._seed_counter) * 7919
        return RowSpec(req.config, weights=req.weights, beta=req.beta, generator=row_generator(seed),
                       stop_check=stop_checker(self.tokenizer, req.config.stop_strings))

    @torch.no_grad()
    def _admit(self) -> None:
        room = self.max_batch - len(self.active)
        new = []
        while room > 0:
            try:
                req = self.inbox.get_nowait()
            except queue.Empty:
                break
            if req.cancelled.is_set():
                continue
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
