import pytest
import torch

from mavis_align.sampling import sample_from_logits, top_k_logits


def test_top_k_keeps_k_largest_and_leaves_input_alone():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [0.0, -1.0, 2.0, 1.0]])
    before = logits.clone()
    out = top_k_logits(logits, 2)
    assert torch.equal(logits, before)
    assert torch.isinf(out).sum(-1).tolist() == [2, 2]
    assert out[0, 1] == 5.0 and out[0, 3] == 4.0 and torch.isinf(out[0, 0])
    assert out[1, 2] == 2.0 and out[1, 3] == 1.0


def test_top_k_bad_k():
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_k_logits(torch.zeros(1, 3), 0)


def test_greedy_is_argmax_and_sampling_is_seeded():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_from_logits(logits, generator=None, greedy=True), logits.argmax(-1))
    a = sample_from_logits(logits, generator=torch.Generator().manual_seed(7))
    b = sample_from_logits(logits, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="Generator"):
        sample_from_logits(logits, generator=None)


def test_sampling_frequencies_follow_softmax():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(20000, 1)
    draws = sample_from_logits(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015)
