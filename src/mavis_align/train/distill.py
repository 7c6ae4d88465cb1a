"""Distillation of M single-objective value models into one multi-head model (paper App. E).

The student has one backbone and one head per objective; on the tokens of generated completions
(every response position of the full sequences stored in tree files), each head regresses onto
its teacher's value at that position. MSE over heads and positions. The decoder then runs one
value forward per step for all objectives.

When the teachers already share one frozen trunk (same weights, same pool and pool centre, heads
of one shape), they are one multi-head model in all but the file: :func:`stack_teachers` puts
their heads side by side on that trunk, exactly (no training, no gap), and :func:`distill_auto`
does so whenever it can and trains a student otherwise.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..collect.store import read_trees
from ..values import ValueModel, heads_state


@dataclass
class DistillConfig:
    lr: float = 1e-3
    weight_decay: float = 0.002
    warmup_steps: int = 20
    batch_size: int = 8
    epochs: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.batch_size < 1 or not self.epochs > 0:
            raise ValueError(f"invalid distillation config {self}")


def completion_sequences(tree_files: Sequence[str | Path], split: str | None = None) -> list[tuple[list[int], int]]:
    """(prompt ids + full response ids, prompt length) of every leaf of every tree."""
    out = []
    for f in tree_files:
        data, _, _ = read_trees(f)
        for ti, tree in enumerate(data.trees):
            if split is not None and data.splits[ti] != {"train": 0, "val": 1}[split]:
                continue
            for leaf in tree.leaves():
                resp = tree.response(leaf)
                if resp:
                    out.append((tree.prompt_ids + resp, len(tree.prompt_ids)))
    return out


def _batch(seqs, pad_id: int):
    """Right-padded ids and mask [B, T], response positions [B, T] (bool), prompt lengths [B]."""
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    resp = torch.zeros_like(ids, dtype=torch.bool)  # positions whose prefix ends in a response token
    for i, (s, p) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        resp[i, p : len(s)] = True
    return ids, mask, resp, torch.tensor([p for _, p in seqs], dtype=torch.long)


@torch.no_grad()
def _teacher_values(teachers: Sequence[ValueModel], ids, mask, prompt_lengths) -> torch.Tensor:
    return torch.cat([t(ids, attention_mask=mask, prompt_lengths=prompt_lengths).values for t in teachers], dim=-1)  # [B, T, M]


@torch.no_grad()
def fit_student_centre(student: ValueModel, seqs: Sequence[tuple[list[int], int]], pad_id: int, *, batch_size: int = 16) -> None:
    """Centre a "prompt+response" student's interaction features on its own states over the
    training sequences (mean prompt state per sequence, mean running response state per response
    position), as value training does on its examples; other pools and fitted students are left alone."""
    from ..values import prompt_response_means

    if not student.needs_pool_centre:
        return
    device = next(student.parameters()).device
    sum_p = sum_r = None
    n_p = n_r = 0
    for s in range(0, len(seqs), batch_size):
        ids, mask, resp, plen = (t.to(device) for t in _batch(seqs[s : s + batch_size], pad_id))
        hidden = student.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        prompt, response = prompt_response_means(hidden, mask, plen)
        p = prompt[torch.arange(len(plen), device=device), plen - 1].sum(0)
        r = response[resp].sum(0)
        sum_p, sum_r = (p, r) if sum_p is None else (sum_p + p, sum_r + r)
        n_p, n_r = n_p + len(plen), n_r + int(resp.sum())
    student.set_pool_centre(sum_p / max(n_p, 1), sum_r / max(n_r, 1))


def stack_teachers(teachers: Sequence[ValueModel]) -> ValueModel:
    """One multi-head value model equal to ``teachers`` (heads in teacher order), when they share a
    frozen trunk: every teacher frozen, one trunk fingerprint, one tokenizer, one pool (and pool
    centre), heads of one kind and width, none preference-conditioned. The trunk is shared, not
    copied; the heads' parameters are concatenated along their objective axis.

    Raises:
        ValueError: naming the first property the teachers do not share.
    """
    if not teachers:
        raise ValueError("stacking needs at least one teacher")
    first = teachers[0]
    for i, t in enumerate(teachers):
        if not t.frozen_backbone or t.trunk_key is None:
            raise ValueError(f"teacher {i} ({', '.join(t.objectives)}) trains its backbone: only models on one frozen trunk stack exactly")
        checks = [
            ("trunk weights", t.trunk_key, first.trunk_key), ("tokenizer", t.tokenizer_fingerprint, first.tokenizer_fingerprint),
            ("pool", t.pool, first.pool), ("head width (head_hidden)", t.head_hidden, first.head_hidden),
        ]
        for what, a, b in checks:
            if a != b:
                raise ValueError(f"teacher {i} ({', '.join(t.objectives)}) differs from teacher 0 in its {what}: {a!r} vs {b!r}")
        if t.conditioned:
            raise ValueError(f"teacher {i} is preference-conditioned: its heads read the weights and do not stack")
        if t.pool == "prompt+response" and (t.needs_pool_centre or not torch.equal(t.pool_centre.cpu(), first.pool_centre.cpu())):
            raise ValueError(f"teacher {i} ({', '.join(t.objectives)}) reads features centred differently from teacher 0 (pool centre)")
    names = [o for t in teachers for o in t.objectives]
    meta = {k: v for k, v in first.meta.items() if k in {"frozen_backbone", "trunk_fingerprint", "pool_centre_fitted", "backbone", "base_model"}}
    stacked = ValueModel(first.backbone, names, first.tokenizer_fingerprint, {**meta, "distilled_from": names, "distill_method": "stacked"},
                         first.tokenizer, head_hidden=first.head_hidden, pool=first.pool)
    states = [heads_state(t.head) for t in teachers]
    stacked.head.load_state_dict({k: torch.cat([st[k] for st in states], dim=0) for k in states[0]})
    if first.pool == "prompt+response":
        stacked.pool_centre = first.pool_centre.detach().float().clone()
    device = next(first.head.parameters()).device
    return stacked.to(device).eval()


@torch.no_grad()
def _mse_vs_teachers(student: ValueModel, teachers: Sequence[ValueModel], seqs, pad: int) -> dict[str, float] | None:
    """Mean squared difference student − teacher per objective over every response position of ``seqs``."""
    if not seqs:
        return None
    names = [o for t in teachers for o in t.objectives]
    device = next(student.parameters()).device
    sq, n = torch.zeros(len(names)), 0
    for s in range(0, len(seqs), 16):
        ids, mask, resp, plen = (t.to(device) for t in _batch(seqs[s : s + 16], pad))
        d = (student(ids, attention_mask=mask, prompt_lengths=plen).values - _teacher_values(teachers, ids, mask, plen)) ** 2
        sq += d[resp].sum(0).cpu()
        n += int(resp.sum())
    return dict(zip(names, (sq / max(n, 1)).tolist()))


def _finish(student: ValueModel, teachers: Sequence[ValueModel], tree_files, out: Path, result: dict, progress: bool, tracker, step: int) -> dict:
    """Save ``out/student``, score it and its teachers on held-out trees, write ``out/result.json``."""
    from .regression import held_out_quality

    student.save(out / "student")
    quality = held_out_quality(student, tree_files)
    teacher_quality = {}
    for t in teachers:
        teacher_quality.update(held_out_quality(t, tree_files)["per_objective"])
    result = {**result, "quality": quality, "teacher_quality": teacher_quality}
    if progress and quality["per_objective"]:
        from .quality import format_quality

        print("student:\n" + format_quality(quality))
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if tracker is not None:
        tracker.log({"quality": quality["per_objective"], "val_mse_vs_teachers": result.get("val_mse_vs_teachers") or {}}, step=step)
    return result


def _pad_id(model: ValueModel) -> int:
    return model.tokenizer.pad_token_id if model.tokenizer is not None and model.tokenizer.pad_token_id is not None else 0


def distill_stacked(teachers: Sequence[ValueModel], tree_files: Sequence[str | Path], out: str | Path, *, progress: bool = True, tracker=None,
                    student: ValueModel | None = None) -> dict:
    """:func:`stack_teachers` saved to ``out/student`` with the same ``result.json`` as :func:`distill`
    (the student − teacher MSE on held-out sequences is measured, not assumed). ``student``: the
    teachers' stack when the caller has already built it."""
    from ..provenance import write_run_record

    t0 = time.perf_counter()
    student = student if student is not None else stack_teachers(teachers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(student.objectives)
    write_run_record(out, {"distill": {"method": "stacked"}, "teachers": names}, 0)
    val = completion_sequences(tree_files, "val")
    result = {"objectives": names, "method": "stacked", "steps": 0, "sequences": 0, "val_mse_vs_teachers": _mse_vs_teachers(student, teachers, val, _pad_id(student)),
              "seconds": round(time.perf_counter() - t0, 2)}
    return _finish(student, teachers, tree_files, out, result, progress, tracker, 0)


def distill_auto(teachers: Sequence[ValueModel], make_student, tree_files: Sequence[str | Path], out: str | Path,
                 config: "DistillConfig | None" = None, *, method: str = "auto", progress: bool = True, tracker=None) -> dict:
    """``method`` "stack" (:func:`distill_stacked`, an error if the teachers do not share a frozen trunk),
    "train" (:func:`distill` into ``make_student()``), or "auto": stack when possible, else train."""
    if method not in ("auto", "stack", "train"):
        raise ValueError(f"method must be 'auto', 'stack' or 'train', got {method!r}")
    if method != "train":
        try:
            stacked = stack_teachers(teachers)
        except ValueError as err:
            if method == "stack":
                raise
            if progress:
                print(f"distill: training a student ({err})")
        else:
            return distill_stacked(teachers, tree_files, out, progress=progress, tracker=tracker, student=stacked)
    return distill(teachers, make_student(), tree_files, out, config or DistillConfig(), progress=progress, tracker=tracker)


def distill(
    teachers: Sequence[ValueModel],
    student: ValueModel,
    tree_files: Sequence[str | Path],
    out: str | Path,
    config: DistillConfig = DistillConfig(),
    *,
    progress: bool = True,
    tracker=None,
) -> dict:
    """Train ``student`` (heads = the teachers' objectives, in order) and save it to ``out/student``.

    ``tracker``: a :class:`mavis_align.tracking.Tracker` mirroring metrics.jsonl (``--report-to``)."""
    from transformers.optimization import Adafactor, get_linear_schedule_with_warmup

    from ..provenance import write_run_record

    names = [o for t in teachers for o in t.objectives]
    if list(student.objectives) != names:
        raise ValueError(f"student heads {student.objectives} must be the teachers' objectives in order: {names}")
    for t in teachers:
        if t.tokenizer_fingerprint != student.tokenizer_fingerprint:
            raise ValueError("teachers and student must read the same tokenizer")
        t.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = completion_sequences(tree_files, "train") or completion_sequences(tree_files, None)
    val = completion_sequences(tree_files, "val")
    device = next(student.parameters()).device  # teachers and student on one placement (mavis_align.placement)
    pad = _pad_id(student)
    fit_student_centre(student, train, pad)
    steps = max(1, math.ceil(len(train) / config.batch_size * config.epochs))
    opt = Adafactor([p for p in student.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay,
                    scale_parameter=False, relative_step=False, warmup_init=False)
    sched = get_linear_schedule_with_warmup(opt, min(config.warmup_steps, steps - 1), steps)
    torch.manual_seed(config.seed)
    write_run_record(out, {"distill": asdict(config), "teachers": names, "sequences": len(train)}, config.seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="distill", unit="step")
    per_epoch = max(1, math.ceil(len(train) / config.batch_size))
    t0 = time.perf_counter()
    log = (out / "metrics.jsonl").open("w")
    student.train()
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 31 + epoch)).tolist()
        chunk = [train[i] for i in order[pos * config.batch_size : (pos + 1) * config.batch_size]]
        ids, mask, resp, plen = (t.to(device) for t in _batch(chunk, pad))
        target = _teacher_values(teachers, ids, mask, plen)
        pred = student(ids, attention_mask=mask, prompt_lengths=plen).values
        loss = ((pred - target) ** 2)[resp].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.write(json.dumps({"step": step + 1, "loss": float(loss.detach())}) + "\n")
        if tracker is not None:
            tracker.log({"loss": float(loss.detach())}, step=step + 1)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    log.close()
    if bar is not None:
        bar.close()
    student.eval()
    student.meta["distilled_from"] = names
    student.meta["distill_method"] = "trained"
    result = {"objectives": names, "method": "trained", "steps": steps, "sequences": len(train),
              "val_mse_vs_teachers": _mse_vs_teachers(student, teachers, val, pad), "seconds": round(time.perf_counter() - t0, 2)}
    return _finish(student, teachers, tree_files, out, result, progress, tracker, steps)
