"""Mixed batches (issue 34): a row's cost and text do not depend on its neighbours' settings.

A plain pi_ref row (whole vocabulary) beside a tilted row used to make every row's candidates the
whole vocabulary, all of them scored by the value models. These tests look at what the scorer
receives and at each row's tokens against the same row decoded alone.
"""

from __future__ import annotations

import pytest
import torch

from mavis_align.decoding.engine import DecodeState, RowSpec, row_generator, step_distribution, RowTensors
from mavis_align.decoding.steppers import CachedBase, CachedValueScorer, bind_objectives
from mavis_align.generation import SamplingConfig, left_pad
from mavis_align.values import ValueModel, tiny_llama_backbone, tokenizer_fingerprint


def _value_model(tok, objectives, seed):
    backbone = tiny_llama_backbone(len(tok), hidden_size=32, num_layers=2, num_heads=4, seed=seed)
    vm = ValueModel(backbone, objectives, tokenizer_fingerprint(tok))
    with torch.no_grad():
        vm.head.weight.copy_(torch.randn(vm.head.weight.shape, generator=torch.Generator().manual_seed(seed + 100)))
    return vm.eval()


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    return [_value_model(tiny_tokenizer, ["a"], 1), _value_model(tiny_tokenizer, ["b"], 2)]


class RecordingScorer(CachedValueScorer):
    """A cached scorer that records the rows it starts with and the candidate blocks it scores."""

    log: list = []

    def start(self, input_ids, attention_mask):
        RecordingScorer.log.append(("start", tuple(input_ids.shape)))
        super().start(input_ids, attention_mask)

    def score(self, candidates, weights=None):
        RecordingScorer.log.append(("score", tuple(candidates.shape)))
        return super().score(candidates, weights)


PROMPTS = ["hello world the cat sat on the mat", "why", "what is a good dog ?", "the dog ran", "yes no", "how is the cat"]
W = torch.tensor([0.7, 0.3])


def _specs():
    """(prompt, spec, wave) of a mix of every kind of row; wave 1 joins after two steps."""
    def cfg(**kw):
        return SamplingConfig(**{"max_new_tokens": 7, **kw})

    return [
        (0, RowSpec(cfg(top_k=0), generator=row_generator(1)), 0),                                   # plain, whole vocabulary
        (1, RowSpec(cfg(top_k=0, greedy=True)), 0),                                                  # plain greedy
        (2, RowSpec(cfg(top_k=5, beta=4.0), weights=W, generator=row_generator(3)), 1),              # tilted, sampled
        (3, RowSpec(cfg(top_k=3, temperature=0.7), generator=row_generator(4)), 1),                  # plain top-3, temperature
        (4, RowSpec(cfg(top_k=4, beta=9.0, greedy=True, min_new_tokens=3), weights=torch.tensor([0.0, 1.0])), 1),  # tilted greedy
        (5, RowSpec(cfg(top_k=5, beta=2.0, max_new_tokens=3), weights=W, generator=row_generator(6)), 0),  # tilted, leaves early
        (1, RowSpec(cfg(top_k=0), forced=[5, 6, 7, 8]), 1),                                          # plain, teacher-forced
    ]


def _state(tiny_lm, tok, models):
    bindings = bind_objectives(models)
    return DecodeState(lambda: CachedBase(tiny_lm), lambda: RecordingScorer(models, bindings), len(bindings), tok.eos_token_id)


def _admit(state, tok, rows, keys):
    ids, mask = left_pad([tok(PROMPTS[p], add_special_tokens=False)["input_ids"] for p, _ in rows], tok.pad_token_id, torch.device("cpu"))
    state.admit(ids, mask, [s for _, s in rows], keys)


def _run_mixed(tiny_lm, tok, models):
    rows = _specs()
    state = _state(tiny_lm, tok, models)
    out = {}
    _admit(state, tok, [(p, s) for p, s, wave in rows if wave == 0], [i for i, r in enumerate(rows) if r[2] == 0])
    steps = 0
    while len(state) or steps < 3:
        if steps == 2:
            _admit(state, tok, [(p, s) for p, s, wave in rows if wave == 1], [i for i, r in enumerate(rows) if r[2] == 1])
        for key, rec in state.step():
            out[key] = rec
        steps += 1
    return out


def test_mixed_batch_scores_only_tilted_rows_at_their_own_k(tiny_lm, tiny_tokenizer, models):
    """Fails before issue 34's fix: the plain whole-vocabulary rows made the scorer see [B, V]."""
    RecordingScorer.log = []
    _run_mixed(tiny_lm, tiny_tokenizer, models)
    scored = [shape for kind, shape in RecordingScorer.log if kind == "score"]
    started = [shape for kind, shape in RecordingScorer.log if kind == "start"]
    assert scored, "the tilted rows were never scored"
    # the scorer holds tilted rows only (at most 3 live at once here), each with at most the largest tilted k (5) candidates
    assert max(rows for rows, _ in scored) <= 3
    assert max(k for _, k in scored) <= 5
    assert all(rows <= 2 for rows, _ in started)  # prefilled on tilted rows' prompts only (1 in wave 0, 2 in wave 1)


def test_each_row_of_a_mixed_batch_decodes_as_it_does_alone(tiny_lm, tiny_tokenizer, models):
    mixed = _run_mixed(tiny_lm, tiny_tokenizer, models)
    fresh = _specs()  # fresh generators: the same draws as the mixed run's
    for key, (p, spec, _) in enumerate(fresh):
        state = _state(tiny_lm, tiny_tokenizer, models)
        _admit(state, tiny_tokenizer, [(p, spec)], [key])
        alone = None
        while len(state):
            for _, rec in state.step():
                alone = rec
        assert mixed[key].token_ids == alone.token_ids, f"row {key}"
        assert mixed[key].logprobs_gen == pytest.approx(alone.logprobs_gen, abs=1e-5)
        assert mixed[key].logprobs_ref == pytest.approx(alone.logprobs_ref, abs=1e-5)
        assert mixed[key].kl == pytest.approx(alone.kl, abs=1e-5)
        assert mixed[key].finish_reason == alone.finish_reason
        assert len(mixed[key].values) == (len(alone.token_ids) if spec.weights is not None else 0)


def test_step_distribution_untilted_rows_keep_their_own_support(tiny_models_logits=None):
    """[B, V] table when a plain row samples the whole vocabulary; the tilted row's mass stays on its top-k."""
    torch.manual_seed(0)
    logits = torch.randn(3, 40)

    class Fixed:  # values = the candidate id (so the tilt prefers high ids); records what it is asked
        asked: list = []

        def score(self, cand, weights):
            Fixed.asked.append(tuple(cand.shape))
            return cand.float()[..., None] / 40

    specs = [RowSpec(SamplingConfig(top_k=0), generator=row_generator(0)),
             RowSpec(SamplingConfig(top_k=6, beta=3.0), weights=torch.tensor([1.0]), generator=row_generator(1)),
             RowSpec(SamplingConfig(top_k=2), generator=row_generator(2))]
    rows = RowTensors.pack(specs, 1, "cpu")
    dist = step_distribution(logits, rows, scorer=Fixed())
    assert Fixed.asked == [(1, 6)]
    assert dist.ids is None and dist.logp.shape == (3, 40)
    p = dist.logp.exp()
    torch.testing.assert_close(p[0], torch.softmax(logits[0], -1))
    assert int((p[1] > 0).sum()) == 6 and int((p[2] > 0).sum()) == 2
    assert set(torch.nonzero(p[1] > 0).squeeze(-1).tolist()) == set(torch.topk(logits[1], 6).indices.tolist())
    alone = step_distribution(logits[1:2], rows.select(torch.tensor([1])), scorer=Fixed())
    torch.testing.assert_close(dist.logp[1].gather(-1, alone.ids[0]), alone.logp[0])
    assert torch.isnan(dist.values[0]).all() and int(torch.isfinite(dist.values[1]).sum()) == 6
