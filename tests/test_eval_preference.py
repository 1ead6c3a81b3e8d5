"""Held-out preference and NLL (clo/eval/preference.py): log-probs against transformers, metrics by hand."""

import math

import pytest
import torch
from tiny_chat_model import make_tiny_chat_model

from clo.eval.preference import four_way_logps, preference_metrics
from clo.model.chat import detect_format
from clo.model.hf_folder import load_model
from clo.model.tokenizer import load_tokenizer
from clo.pairs import demo_path, load_pairs
from clo.train.batching import EncodedExample, encode_all


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    examples = load_pairs(demo_path("sw", heldout=True)).examples
    texts = [t for ex in examples for t in (ex.prompt_en, ex.response_en, ex.prompt, ex.response)]
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny"), texts), examples


def test_four_way_logps_match_transformers(tiny):
    import transformers

    folder, examples = tiny
    tok = load_tokenizer(folder)
    encoded, dropped = encode_all(tok, detect_format(tok), examples[:5], max_length=4096)
    assert dropped == 0
    ours = four_way_logps(load_model(folder), encoded, tok.pad_id, batch_size=2)

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for i, ex in enumerate(encoded):
        for k, (prompt, response) in enumerate(ex.sequences):
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + response])).logits[0].float()
            logprobs = logits.log_softmax(-1)[len(prompt) - 1 : -1]  # the positions predicting the response
            expected = logprobs.gather(1, torch.tensor(response)[:, None]).sum()
            assert ours[i, k].item() == pytest.approx(expected.item(), abs=1e-3)


def test_metrics_by_hand():
    # two examples; sequences (en_en, en_t, t_t, t_en) with response lengths (2, 4, 4, 2)
    ex = EncodedExample("x", [([1], [0] * 2), ([1], [0] * 4), ([1], [0] * 4), ([1], [0] * 2)])
    logps = torch.tensor([
        [-2.0, -6.0, -8.0, -3.0],  # en: -2 > -6 (prefers y_en); t: -8 < -3 (sum prefers y_en) but per token -2 < -1.5
        [-4.0, -2.0, -4.0, -6.0],  # en: -4 < -2; t: -4 > -6
    ])  # fmt: skip
    m = preference_metrics(logps, [ex, ex])
    assert m["pref_t"] == 0.5 and m["margin_t"] == pytest.approx(((-8 + 3) + (-4 + 6)) / 2)
    assert m["pref_t_per_token"] == 0.5  # -2 vs -1.5 (no), -1 vs -3 (yes)
    assert m["pref_en"] == 0.5 and m["margin_en"] == pytest.approx(((-2 + 6) + (-4 + 2)) / 2)
    assert m["pref_en_per_token"] == 0.5  # -1 vs -1.5 (yes), -2 vs -0.5 (no)
    assert m["nll_t"] == pytest.approx(12 / 8) and m["ppl_t"] == pytest.approx(math.exp(1.5))
    assert m["nll_en"] == pytest.approx(6 / 4)
