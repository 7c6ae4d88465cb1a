"""Continuous batching across requests for the HTTP server.

One background thread owns the models. Concurrent requests, each with its own objective weights
lambda, beta, candidate count, temperature, length and seed, share decode steps: lambda and beta
only enter after the value forward, so one base forward and one forward per value model serve the
whole batch. New requests are prefilled on their own and merged into the running batch between
steps (their KV caches are left-padded to the batch's width); finished or abandoned requests
leave it (their cache rows are dropped).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..decoding.steppers import CachedBase, CachedValueScorer
from ..decoding.tilt import combine_values, tilted_logprobs

NEG_INF = float("-inf")


def sample_index(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from ``probs`` ([n], sums to 1) by inverting the CDF with a single uniform.

    Unlike ``torch.multinomial`` it consumes exactly one random number however long ``probs`` is,
    so a request samples the same tokens whether it is decoded alone or next to requests with
    more candidates (zero-probability padding does not change the draw).
    """
    u = torch.rand((), generator=generator, device=probs.device, dtype=torch.float64)
    cdf = torch.cumsum(probs.double(), dim=0)
    idx = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    idx = min(idx, probs.shape[0] - 1)
    while probs[idx] <= 0 and idx > 0:  # never land on a zero-probability entry at the top edge
        idx -= 1
    return idx


@dataclass
class GenRequest:
    """One generation request and its live state.

    ``weights`` is None for plain sampling from pi_ref (full vocabulary); otherwise an [M] tensor
    summing to 1 and the token is drawn from pi_MAVIS over the top ``top_k`` candidates.
    ``emit(event)`` is called from the engine thread with {"type": "token", "text": delta, ...}
    and finally {"type": "done", ...}.
    """

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[dict], None]
    weights: torch.Tensor | None = None
    beta: float = 1.0
    top_k: int = 15
    temperature: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    id: str = ""
    reward_names: tuple[str, ...] = ()
    reward_prompt: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    logprobs_ref: list[float] = field(default_factory=list)
    logprobs_gen: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    created: float = field(default_factory=time.time)


class Scheduler:
    """Runs the shared decode loop in a daemon thread.

    Args:
        model, tokenizer: pi_ref.
        value_models, bindings: from a :class:`~mavis_align.decoding.decoder.MavisDecoder`.
        max_batch: most requests decoded together; others wait in the queue.
        normalize: min-max normalise combined values (paper eq. 14).
    """

    def __init__(self, model, tokenizer, value_models: Sequence = (), bindings: Sequence = (), *, max_batch: int = 16, normalize: bool = True,
                 rewards: dict | None = None, start_thread: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.value_models, self.bindings = list(value_models), list(bindings)
        self.max_batch, self.normalize = max_batch, normalize
        self.eos_id = tokenizer.eos_token_id
        self.inbox: queue.Queue[GenRequest] = queue.Queue()
        self.active: list[GenRequest] = []
        self.generators: list[torch.Generator] = []
        self.base: CachedBase | None = None
        self.scorer: CachedValueScorer | None = None
        self.logits: torch.Tensor | None = None
        self.steps = 0
        self.stats = {"steps": 0, "tokens": 0, "requests": 0, "max_batch_seen": 0}
        self._seed_counter = itertools.count(1)
        self.rewards = dict(rewards or {})
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.thread = None
        if start_thread:
            self.thread = threading.Thread(target=self.run, name="mavis-scheduler", daemon=True)
            self.thread.start()

    # ------------------------------------------------------------------ API

    def submit(self, req: GenRequest) -> None:
        self.inbox.put(req)
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
                self.active, self.generators, self.base, self.scorer, self.logits = [], [], None, None, None

    def _drain(self) -> list[GenRequest]:
        out = []
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except queue.Empty:
                return out

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
        width = max(len(r.prompt_ids) for r in new)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self.eos_id or 0)
        ids = torch.full((len(new), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(new):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        base = CachedBase(self.model)
        logits = base.start(ids.to(device), mask.to(device))
        scorer = None
        if self.value_models:
            scorer = CachedValueScorer(self.value_models, self.bindings)
            scorer.start(ids.to(device), mask.to(device))
        if self.base is None:
            self.base, self.scorer, self.logits = base, scorer, logits
        else:
            self.base.merge(base)
            if scorer is not None:
                self.scorer.merge(scorer)
            self.logits = torch.cat([self.logits, logits])
        for r in new:
            seed = r.seed if r.seed is not None else next(self._seed_counter) * 7919
            self.generators.append(torch.Generator(device=device).manual_seed(seed))
        self.active += new
        self.stats["requests"] += len(new)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(self.active))

    @torch.no_grad()
    def _step(self) -> None:
        reqs, logits = self.active, self.logits
        b = len(reqs)
        device = logits.device
        logp_ref_full = torch.log_softmax(logits, dim=-1)
        temps = torch.tensor([r.temperature for r in reqs], dtype=torch.float32, device=device)[:, None]
        tilted = [i for i, r in enumerate(reqs) if r.weights is not None]
        choice = [0] * b
        lp_gen = [0.0] * b
        gen_logp = torch.log_softmax(logits / temps, dim=-1)
        if tilted and self.scorer is not None:
            k_max = max(reqs[i].top_k for i in tilted)
            cand_logp, cand_ids = torch.topk(gen_logp, min(k_max, logits.shape[-1]), dim=-1)
            valid = torch.arange(cand_ids.shape[1], device=device)[None, :] < torch.tensor([r.top_k for r in reqs], device=device)[:, None]
            weights = torch.stack([r.weights if r.weights is not None else torch.zeros(len(self.bindings)) for r in reqs]).to(device)
            combined = combine_values(self.scorer.score(cand_ids), weights)
            betas = torch.tensor([r.beta for r in reqs], dtype=torch.float32, device=device)
            tlp = tilted_logprobs(cand_logp, combined, betas, normalize=self.normalize, valid=valid)
            for i in tilted:
                pos = sample_index(tlp[i].exp(), self.generators[i])
                choice[i], lp_gen[i] = int(cand_ids[i, pos]), float(tlp[i, pos])
        for i, r in enumerate(reqs):
            if r.weights is None or self.scorer is None:
                tok = sample_index(gen_logp[i].exp(), self.generators[i])
                choice[i], lp_gen[i] = tok, float(gen_logp[i, tok])
        chosen = torch.tensor(choice, device=device)
        lp_ref = logp_ref_full.gather(-1, chosen[:, None]).squeeze(-1).tolist()
        keep = []
        for i, r in enumerate(reqs):
            r.tokens.append(choice[i])
            r.logprobs_ref.append(lp_ref[i])
            r.logprobs_gen.append(lp_gen[i])
            text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
            cut = min((text.find(s) for s in r.stop if s and s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
            delta = text[len(r.text):] if text.startswith(r.text) else ""
            r.text = text
            if choice[i] == self.eos_id:
                r.finish_reason = "stop"
            elif cut >= 0:
                r.finish_reason = "stop"
            elif len(r.tokens) >= r.max_tokens:
                r.finish_reason = "length"
            elif r.cancelled.is_set():
                r.finish_reason = "cancelled"
            if delta:
                r.emit({"type": "token", "text": delta})
            if r.finish_reason is None:
                keep.append(i)
            else:
                scores = {}
                for name in r.reward_names:
                    if name in self.rewards:  # scored here: torch work stays on the engine thread
                        scores[name] = float(self.rewards[name]([r.reward_prompt], [r.text.strip()])[0])
                r.emit({"type": "done", "rewards": scores})
        self.stats["steps"] += 1
        self.stats["tokens"] += b
        if not keep:
            self.active, self.generators, self.base, self.scorer, self.logits = [], [], None, None, None
            return
        if len(keep) < b:
            idx = torch.tensor(keep, device=device)
            self.base.reorder(idx)
            if self.scorer is not None:
                self.scorer.reorder(idx)
            chosen = chosen.index_select(0, idx)
            self.active = [reqs[i] for i in keep]
            self.generators = [self.generators[i] for i in keep]
        self.logits = self.base.step(chosen)
        if self.scorer is not None:
            self.scorer.append(chosen)
