"""Generation: batched, KV-cached greedy equals transformers' greedy and our own no-cache recompute."""

import pytest
import torch
from hf_models import write_hf_model

from clo.model.generate import generate, sample_next
from clo.model.hf_folder import load_model

PROMPTS = [[5, 9, 17, 33, 4], [7, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def models(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    # a window of 8 is shorter than prompt + answer, so the cached sliding-window mask is exercised
    hf = write_hf_model(folder, request.param, **({"sliding_window": 8} if request.param == "mistral" else {}))
    return hf, load_model(folder)


def hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_batched_cached_greedy_equals_transformers(models):
    hf, ours = models
    got = generate(ours, PROMPTS, max_new_tokens=12, stop_ids=set(), pad_id=0)
    for prompt, ids in zip(PROMPTS, got):
        assert ids == hf_greedy(hf, prompt, 12)


def test_cache_equals_no_cache(models):
    _, ours = models
    cached = generate(ours, PROMPTS, max_new_tokens=10, stop_ids=set(), use_cache=True)
    recomputed = generate(ours, PROMPTS, max_new_tokens=10, stop_ids=set(), use_cache=False)
    assert cached == recomputed


def test_stops_at_stop_id(models):
    _, ours = models
    free = generate(ours, PROMPTS, max_new_tokens=10, stop_ids=set())
    stop = free[0][3]  # make the 4th token of the first row a stop token
    got = generate(ours, PROMPTS, max_new_tokens=10, stop_ids={stop})
    assert got[0] == free[0][: free[0].index(stop)]
    for full, cut in zip(free, got):
        assert stop not in cut and full[: len(cut)] == cut


def test_an_empty_prompt_is_refused(models):
    _, ours = models
    for prompts in ([[], PROMPTS[0]], [[]], []):
        with pytest.raises(ValueError, match="every prompt needs at least one token"):
            generate(ours, prompts, max_new_tokens=2, stop_ids=set())


def test_sampling_is_seeded_and_top_p_narrows_to_argmax():
    logits = torch.randn(4, 50)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(sample_next(logits, 1.0, 0.9, g1), sample_next(logits, 1.0, 0.9, g2))
    assert torch.equal(sample_next(logits, 1.0, 1e-6), logits.argmax(-1))
    # top_p=0.5 on a distribution with a 0.6 token always picks it
    peaked = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    assert all(sample_next(peaked, 1.0, 0.5).item() == 0 for _ in range(20))


@pytest.mark.slow
def test_compiled_decode_equals_eager(models):
    """`compile=True` (static-shape decode step, the cache kept between calls) gives the eager tokens.

    Two calls with different prompt sets and lengths share one compiled graph: the cache length is
    bucketed and the kept cache's stale slots must stay masked.
    """
    _, ours = models
    try:
        for prompts, n in ((PROMPTS, 9), ([[3, 4, 5], [6] * 9, [11, 12]], 5)):
            eager = generate(ours, prompts, max_new_tokens=n, stop_ids=set())
            assert generate(ours, prompts, max_new_tokens=n, stop_ids=set(), compile=True) == eager
    finally:
        ours.clear_cache()
