"""Length groups: the same per-sequence log-probs and gradients as one padded batch, from fewer tokens."""

import pytest
import torch
from tiny_chat_model import make_tiny_training_setup

from clo.model.chat import detect_format
from clo.model.hf_folder import load_model
from clo.model.tokenizer import load_tokenizer
from clo.pairs import load_pairs
from clo.train.batching import collate, encode_all, flat_sequences
from clo.train.loss import response_logps
from clo.train.scoring import length_groups, sequence_logps

pytestmark = pytest.mark.usefixtures("one_thread")


def test_length_groups_partition_sorted_rows():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    groups = length_groups(lengths, 3)
    assert sorted(i for g in groups for i in g) == list(range(7))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths) and [len(g) for g in groups] == [2, 3, 2]
    assert length_groups(lengths, 100) == [[i] for i in sorted(range(7), key=lengths.__getitem__)]
    assert length_groups([], 4) == []


def test_grouped_logps_and_gradients_equal_one_padded_batch(tmp_path):
    folder, data = make_tiny_training_setup(tmp_path)
    tok = load_tokenizer(folder)
    examples, _ = encode_all(tok, detect_format(tok), load_pairs(data).examples, 512)
    seqs = flat_sequences(examples[:6])
    lengths = [len(p) + len(r) for p, r in seqs]
    assert len(set(lengths)) > 4  # rows of many lengths: grouping changes the padded shapes

    def run(groups):
        model = load_model(folder)
        for name, p in model.named_parameters():
            p.requires_grad_(".self_attn." in name)
        logps, n = sequence_logps(model, seqs, tok.pad_id, bucket=8, groups=groups)
        (logps.sum() / n.sum()).backward()
        return logps.detach(), n, {k: p.grad for k, p in model.named_parameters() if p.requires_grad}

    model = load_model(folder)
    tokens, labels = collate(examples[:6], tok.pad_id, 8)
    with torch.no_grad():
        direct, _ = response_logps(model.hidden(tokens), model.lm_head.weight, labels)  # the padded batch, by hand
    one, n1, g1 = run(1)
    four, n4, g4 = run(4)
    assert torch.allclose(one, direct, atol=1e-5)
    assert torch.allclose(four, one, atol=1e-5) and torch.equal(n1, n4)
    assert all(torch.allclose(g4[k], g1[k], atol=1e-6, rtol=1e-4) for k in g1)
    assert any(g1[k].abs().max() > 1e-4 for k in g1)  # gradients that could have differed
