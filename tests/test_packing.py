"""Packed, prefix-shared rows (clo/train/packing.py) against the padded path, which is the oracle:
the same four log-probs per example and the same gradients, segments that never see each other,
and a packed second answer with exactly the logits of its own sequence."""

import json

import pytest
import torch
from hf_models import write_hf_model
from safetensors.torch import load_file
from tiny_chat_model import make_tiny_training_setup

import clo.train.packing
import train
from clo.errors import CloError
from clo.eval.mc import choice_sequence_logps
from clo.eval.preference import four_way_logps
from clo.model.chat import detect_format
from clo.model.decoder import attend
from clo.model.gathered_attention import attend_gathered
from clo.model.hf_folder import load_model
from clo.model.tokenizer import load_tokenizer
from clo.pairs import demo_path, load_pairs
from clo.train.batching import encode_all, flat_sequences
from clo.train.packing import first_fit, pack, row_length, segments
from clo.train.scoring import Batching, packed_sequence_logps, sequence_logps
from clo.train.step import Objective, batch_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, data = make_tiny_training_setup(tmp_path_factory.mktemp("tiny"))
    tok = load_tokenizer(folder)
    examples, _ = encode_all(tok, detect_format(tok), load_pairs(data).examples, 512)
    return folder, tok, examples, data


def test_four_sequences_become_two_segments_packed_without_overlap():
    seqs = [([1, 2, 3], [7, 8]), ([1, 2, 3], [9]), ([4, 5], [6, 6, 6]), ([4, 5], [3])]
    segs = segments(seqs)
    assert [(s.prompt, [i for i, _ in s.answers]) for s in segs] == [([1, 2, 3], [0, 1]), ([4, 5], [2, 3])]
    assert first_fit([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]  # longest first, each into the first bin with room
    p = pack(seqs, pad_id=0, bucket=1)
    assert p.tokens.shape == (2, 6) and p.tokens[0].tolist() == [1, 2, 3, 7, 8, 9] and p.tokens[1].tolist() == [4, 5, 6, 6, 6, 3]
    assert p.positions[0].tolist() == [0, 1, 2, 3, 4, 3]  # the second answer continues from the prompt's end
    # each response token read from the position before it; an answer's first token from the prompt's last
    reads = sorted(zip(p.owners.tolist(), p.read_rows.tolist(), p.read_cols.tolist(), p.targets.tolist()))
    assert [r for r in reads if r[0] in (0, 1)] == [(0, 0, 2, 7), (0, 0, 3, 8), (1, 0, 2, 9)]


def test_one_row_holds_every_segment():
    """The per-sequence kernels' layout: the segments side by side in one row, positions as in rows."""
    seqs = [([1, 2, 3], [7, 8]), ([1, 2, 3], [9]), ([4, 5], [6, 6, 6]), ([4, 5], [3])]
    rows, one = pack(seqs, pad_id=0, bucket=1), pack(seqs, pad_id=0, bucket=1, one_row=True)
    assert rows.tokens.shape == (2, 6) and one.tokens.shape == (1, 12)
    assert one.tokens[0].tolist() == [1, 2, 3, 7, 8, 9, 4, 5, 6, 6, 6, 3]
    assert one.positions[0].tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4, 2]
    assert sorted(one.targets.tolist()) == sorted(rows.targets.tolist()) and one.read_rows.eq(0).all()


def test_past_row_tokens_one_row_becomes_rows_of_near_equal_length(monkeypatch):
    """FlexAttention's block mask is built from every [L, L] pair: a batch past ROW_TOKENS gets the fewest
    rows that hold it, of near-equal length (90 tokens, 32 a row: 3 rows of 30, not 32 + 32 + 26)."""
    monkeypatch.setattr(clo.train.packing, "ROW_TOKENS", 32)
    seqs = [([t] * 5, [t + 1] * 5) for t in range(3, 12)]  # 9 segments of 10 tokens
    p = pack(seqs, pad_id=0, bucket=1, one_row=True)
    assert p.tokens.shape == (3, 30) and (p.seg_id >= 0).all()


def test_few_shapes_rounds_lengths_to_four_per_doubling():
    """Compiled blocks build a graph per shape: lengths a multiple of the bucket, under 1/4 more than the
    tokens (or one bucket), and at most 4 of them between consecutive powers of two."""
    lengths = set()
    for n in range(1, 40000):
        L = row_length(n, 128, few_shapes=True)
        assert n <= L < n + max(128, n / 4) and L % 128 == 0, (n, L)
        lengths.add(L)
    assert all(len({L for L in lengths if 2**k < L <= 2 ** (k + 1)}) <= 4 for k in range(7, 16))
    assert row_length(1000, 8) == 1000 and row_length(1001, 8) == 1008  # without few_shapes: the bucket only


def test_the_resolved_layout_and_its_cache_key():
    """The per-sequence kernels get one row, the dense mask rows; compiled runs get few lengths; each layout
    (its float rounding) is its own reference cache key."""
    cpu = torch.device("cpu")
    gathered = Batching.resolve(0, 0, 0, cpu, compiled=False)
    dense = Batching.resolve(0, 0, 0, cpu, compiled=False, attention="sdpa")
    flex = Batching.resolve(0, 0, 0, cpu, compiled=True, attention="flex")  # as CUDA resolves --packing on --compile auto
    assert (gathered.attention, gathered.one_row, gathered.few_shapes) == ("gathered", True, False)
    assert (dense.attention, dense.one_row) == ("sdpa", False)
    assert (flex.attention, flex.one_row, flex.few_shapes, flex.bucket) == ("flex", True, True, 128)
    seqs = [([t] * 5, [t + 1] * (t % 7 + 1)) for t in range(3, 40)]
    assert gathered.pack(seqs).tokens.shape[0] == 1 < dense.pack(seqs).tokens.shape[0]
    keys = {b.describe() for b in (gathered, dense, flex, Batching(0, 8, 4), Batching(0, 8, 4, packing=True, attention="gathered"))}
    assert len(keys) == 5


def test_the_mask_by_hand():
    p = pack([([1, 2], [3]), ([1, 2], [4, 5]), ([6], [7])], pad_id=0, bucket=8)
    assert p.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 7, 0]]  # one row of 8: two segments and a tail
    expected = [
        # 1  2  3  4  5  6  7  pad
        [1, 0, 0, 0, 0, 0, 0, 0],  # 1  prompt
        [1, 1, 0, 0, 0, 0, 0, 0],  # 2  prompt
        [1, 1, 1, 0, 0, 0, 0, 0],  # 3  answer 1
        [1, 1, 0, 1, 0, 0, 0, 0],  # 4  answer 2: the prompt and itself, not answer 1
        [1, 1, 0, 1, 1, 0, 0, 0],  # 5  answer 2
        [0, 0, 0, 0, 0, 1, 0, 0],  # 6  the next segment starts afresh
        [0, 0, 0, 0, 0, 1, 1, 0],  # 7
        [0, 0, 0, 0, 0, 0, 0, 1],  # the tail sees only itself
    ]
    assert p.mask[0, 0].int().tolist() == expected
    assert p.positions[0].tolist() == [0, 1, 2, 2, 3, 0, 1, 0]


def test_the_mask_is_built_where_the_rows_are():
    """The dense mask (--attention sdpa) is built on the rows' device: on CUDA, a causal part made on the
    CPU stopped every packed SDPA step (H200, 2026-12-04). The meta device stands in for CUDA here."""
    p = pack([([1, 2], [3]), ([1, 2], [4, 5]), ([6], [7])], pad_id=0, bucket=8).to("meta")
    assert p.mask.device.type == "meta" and p.mask.shape == (1, 1, 8, 8)
    windowed = pack([([1, 2], [3]), ([6], [7])], pad_id=0, bucket=8, window=2).to("meta")
    assert windowed.mask.device.type == "meta"


def assert_logps_close(got: torch.Tensor, want: torch.Tensor, what=None) -> None:
    """Sequence log-prob sums equal up to fp32 rounding: 1e-4 for sums of hundreds of nats; these reach
    ~1000, where one fp32 step is 1.2e-4, so two steps more are allowed."""
    tol = 1e-4 + 2 * torch.finfo(torch.float32).eps * want.abs()
    assert got.shape == want.shape and ((got - want).abs() <= tol).all(), (what, (got - want).abs().max(), want.abs().max())


def loss_and_grads(model, batch, ref_rows, objective: Objective, batching: Batching, trains=lambda name: True):
    """One micro-batch's loss (`batch_loss`: train.py's step on one process without accumulation) and the
    gradients of the weights `trains(name)` selects (fresh ones: earlier gradients are dropped)."""
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name))
        p.grad = None
    loss, _ = batch_loss(model, batch, ref_rows, objective, batching)
    loss.backward()
    return loss.item(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


LAYOUTS = {"sdpa-rows": ("sdpa", False), "sdpa-one-row": ("sdpa", True), "gathered-one-row": ("gathered", True), "gathered-rows": ("gathered", False)}


@pytest.mark.parametrize(("layout", "method"), [*((k, "clo") for k in LAYOUTS), ("gathered-one-row", "sft")])
def test_packed_logps_loss_and_gradients_equal_the_padded_batch(tiny, layout, method):
    """Six examples' 24 sequences packed (in rows or one row, through the dense mask or per sequence) vs
    padded: the same log-probs, the same CLO (or SFT) loss, and the same gradient of every weight."""
    folder, tok, examples, _ = tiny
    attention, one_row = LAYOUTS[layout]
    batch, seqs = examples[:6], flat_sequences(examples[:6])
    padded_rows, packed_rows = Batching(tok.pad_id, 8, 1), Batching(tok.pad_id, 8, 1, packing=True, attention=attention, one_row=one_row)
    assert (packed_rows.pack(seqs).tokens.shape[0] == 1) == one_row  # the layouts differ here
    assert packed_rows.pack(seqs).tokens.numel() < sum(len(x) + len(y) for x, y in seqs)  # fewer tokens than the sequences: prompts shared
    model = load_model(folder)
    with torch.no_grad():
        padded, n_padded = padded_rows.logps(model, seqs)
        packed, n_packed = packed_rows.logps(model, seqs)
    assert torch.equal(n_packed, n_padded)
    assert_logps_close(packed, padded)

    # a reference a little off the policy, so that both preference directions pull
    ref_rows = padded.view(4, -1).T + torch.linspace(-2, 2, 24).view(6, 4)
    objective = Objective(method)
    loss_padded, g_padded = loss_and_grads(model, batch, ref_rows, objective, padded_rows)
    loss_packed, g_packed = loss_and_grads(model, batch, ref_rows, objective, packed_rows)
    assert abs(loss_packed - loss_padded) <= 1e-6 * abs(loss_padded), (loss_packed, loss_padded)
    assert g_packed.keys() == g_padded.keys() == dict(model.named_parameters()).keys()  # every weight, the embedding too
    assert all(g is not None for g in g_padded.values())
    for k in g_padded:
        assert torch.allclose(g_packed[k], g_padded[k], atol=1e-6, rtol=1e-4), (k, (g_packed[k] - g_padded[k]).abs().max())
    assert min(g.abs().max() for g in g_padded.values()) > 1e-4  # every gradient could have differed


def test_flexattention_gives_the_dense_masks_logps(tiny):
    """The packed rows through FlexAttention's block mask (CUDA's kernel, compiled here for the CPU) vs
    SDPA with the dense boolean mask: the same rule, so the same log-probs up to rounding. (FlexAttention
    has no backward on CPU: its gradients are checked in tests/test_cuda.py.)"""
    folder, tok, examples, _ = tiny
    model = load_model(folder)
    seqs = flat_sequences(examples[:6])
    with torch.no_grad():
        dense, n_dense = packed_sequence_logps(model, seqs, tok.pad_id, 8, "sdpa")
        flex, n_flex = packed_sequence_logps(model, seqs, tok.pad_id, 8, "flex")
    assert torch.equal(n_flex, n_dense) and model.cfg.n_kv_heads < model.cfg.n_heads  # grouped-query heads too
    assert_logps_close(flex, dense)


@pytest.mark.parametrize(("head_dim", "lengths"), [(16, range(1, 17)), (64, (17,))])
def test_flexattention_on_cpu_equals_the_dense_mask_at_every_row_length(head_dim, lengths):
    """Packed rows of 8 x n tokens (two answers to one prompt, a sliding window of 8) through `attend`'s
    BlockMask vs SDPA with the dense mask. Head dim 64: the compiled CPU kernel, block indices and all
    (136 tokens: a full block of 128, then a partial one; each length compiles anew, so one).
    Head dim 16 (the test models'): that kernel gave NaN or errors of ~2 at 6 of the 10 of these lengths
    tried on an AVX2-only EPYC (torch 2.13; causal rows, one-off script), so `attend` runs it unfused there."""
    g = torch.Generator().manual_seed(0)
    for n in lengths:
        prompt, first, second = (torch.randint(3, 128, (m,), generator=g).tolist() for m in (3 * n, 3 * n, 2 * n))
        p = pack([(prompt, first), (prompt, second)], pad_id=0, bucket=8, window=8)
        R, L = p.tokens.shape
        assert L == 8 * n
        q, k, v = torch.randn(R, 4, L, head_dim, generator=g), *(torch.randn(R, 2, L, head_dim, generator=g) for _ in "kv")
        flex, dense = attend(q, k, v, p.block_mask(), gqa=True), attend(q, k, v, p.mask, gqa=True)
        assert (flex - dense).abs().max() <= 1e-5, (n, (flex - dense).abs().max())


def test_training_with_flexattention_on_cpu_stops_with_one_line(tiny, tmp_path):
    folder, _, _, data = tiny
    with pytest.raises(CloError, match="--attention flex: FlexAttention has no backward pass on CPU"):
        train.main(["--lang", "sw", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "run"), "--attention", "flex",
                    "--device", "cpu"])
    assert not (tmp_path / "run").exists()


def visible_pairs(plan, R: int, L: int) -> torch.Tensor:
    """(query, key) flat positions that a `Gathered` plan lets attend, padding left out, as sorted unique
    codes query * (R*L + 1) + key."""
    zero, pairs, q_at, k_at = R * L, [], 0, 0
    for c in plan.calls:
        queries, keys = plan.queries[q_at : q_at + c.n * c.Tq].view(c.n, c.Tq), plan.keys[k_at : k_at + c.n * c.S].view(c.n, c.S)
        mask = (torch.ones(c.Tq, c.S, dtype=torch.bool).tril() if c.mask is None else c.mask).expand(c.n, 1, c.Tq, c.S)
        e, t, j = mask[:, 0].nonzero().unbind(1)
        query, key = queries[e, t], keys[e, j]
        real = query != zero
        assert (key[real] != zero).all()  # a real query never sees padding
        pairs.append(query[real] * (zero + 1) + key[real])
        q_at, k_at = q_at + c.n * c.Tq, k_at + c.n * c.S
    return torch.cat(pairs).unique()


@pytest.mark.parametrize("window", [None, 4])
def test_the_gathered_calls_let_through_exactly_the_dense_masks_pairs(tiny, window):
    """Every (query, key) pair the calls compute is one the dense mask allows, and every allowed pair is
    computed; every token but the tail gets its output from exactly one call."""
    _, tok, examples, _ = tiny
    p = pack(flat_sequences(examples[:6]), tok.pad_id, 8, window)
    R, L = p.tokens.shape
    r, _, i, j = p.mask.nonzero().unbind(1)
    real = p.seg_id[r, i] >= 0
    dense = ((r * L + i) * (R * L + 1) + r * L + j)[real].unique()
    for groups in (1, 3):
        plan = p.gathered(groups)
        assert torch.equal(visible_pairs(plan, R, L), dense)
        real = (p.seg_id >= 0).flatten()
        n_out = len(plan.queries)
        assert (plan.back[~real] == n_out).all() and len(set(plan.back[real].tolist())) == int(real.sum())  # the tail reads the zero row
        assert torch.equal(plan.queries[plan.back[real]], torch.arange(R * L)[real])  # each output goes back where its query came from
    assert len(p.gathered(3).calls) > len(p.gathered(1).calls) == 2  # one causal call, one call of second answers


def test_under_cpu_autocast_the_gathered_calls_compute_in_fp32(tiny):
    """Under bf16 autocast (q, k fp32 from RoPE, v bf16 from its projection) the calls compute in fp32 on
    every CPU kind, AMX or not (short bf16 calls cost more there, BENCHMARKS.md): bit for bit the fp32
    calls on the same bf16 values of v, and not the bf16 calls."""
    _, tok, examples, _ = tiny
    p = pack(flat_sequences(examples[:6]), tok.pad_id, 8)
    plan = p.gathered()
    R, L = p.tokens.shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(R, h, L, 16, generator=g) for h in (4, 2, 2))
    v = v.bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        out = attend_gathered(q, k, v, plan, gqa=True)
    fp32 = attend_gathered(q, k, v.float(), plan, gqa=True)
    bf16 = attend_gathered(q.bfloat16(), k.bfloat16(), v, plan, gqa=True)
    assert out.dtype == torch.float32 and torch.equal(out, fp32)
    assert not torch.equal(out, bf16.float())  # the check tells the two precisions apart


def test_second_answers_of_other_lengths_share_a_windowed_call(tmp_path):
    """Two second answers in one call (a sliding window of 8): the long prompt's short answer padded to the
    other's length, whose padding queries have no key in their window but the one they are given (CPU SDPA
    would give them zeros anyway, torch 2.13; the given key keeps other kernels off NaN): the dense mask's
    logits and finite gradients."""
    write_hf_model(tmp_path, "mistral")
    model = load_model(tmp_path)
    for p in model.parameters():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    a, b = ids(2), ids(30)
    seqs = [(a, ids(3)), (a, ids(20)), (b, ids(2)), (b, ids(1))]
    p = pack(seqs, pad_id=0, bucket=8, window=model.cfg.sliding_window)
    plan = p.gathered(groups=1)
    dense = model(p.tokens, positions=p.positions, mask=p.mask)
    out = model(p.tokens, positions=p.positions, mask=plan)
    real = p.seg_id >= 0
    assert torch.allclose(out[real], dense[real], atol=1e-5)
    out[real].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("attention", ["sdpa", "gathered", "flex"])
def test_a_segment_never_sees_another(tiny, attention):
    """Changing one example's tokens (same lengths) leaves every other sequence's log-prob bit for bit."""
    folder, tok, examples, _ = tiny
    model = load_model(folder)
    seqs = flat_sequences(examples[:4])
    changed = [((p[:-2] + [(t + 1) % 300 + 3 for t in p[-2:]]), [(t + 5) % 300 + 3 for t in r]) if i % 4 == 1 else (p, r)
               for i, (p, r) in enumerate(seqs)]  # example 1's four sequences (rows 1, 5, 9, 13)
    assert pack(seqs, tok.pad_id).tokens.shape == pack(changed, tok.pad_id).tokens.shape
    with torch.no_grad():
        before, _ = packed_sequence_logps(model, seqs, tok.pad_id, 8, attention)
        after, _ = packed_sequence_logps(model, changed, tok.pad_id, 8, attention)
    others = [i for i in range(len(seqs)) if i % 4 != 1]
    assert torch.equal(before[others], after[others])
    assert not torch.equal(before[1::4], after[1::4])


@pytest.mark.parametrize(("family", "attention"), [("llama", "sdpa"), ("llama", "gathered"), ("mistral", "sdpa"), ("mistral", "gathered"),
                                                   ("mistral", "flex")])  # mistral: a sliding window of 8
def test_a_second_answer_gets_the_logits_of_its_own_sequence(tmp_path, family, attention):
    write_hf_model(tmp_path, family)
    model = load_model(tmp_path)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    prompt, first, second = ids(7), ids(9), ids(6)
    p = pack([(prompt, first), (prompt, second)], pad_id=0, bucket=8, window=model.cfg.sliding_window)
    with torch.no_grad():
        packed = model(p.tokens, positions=p.positions, mask=p.attention(attention))[0]
        alone = model(torch.tensor([prompt + second]))[0]
    start = len(prompt) + len(first)
    assert torch.allclose(packed[start : start + len(second)], alone[len(prompt) :], atol=1e-5)
    assert torch.allclose(packed[: len(prompt)], alone[: len(prompt)], atol=1e-5)


def test_packed_equals_padded_on_the_real_default_model(smollm2_dir, all_threads):
    """SmolLM2-135M on three demo examples: the packed log-probs of both CPU kernels, and the CLO loss and
    the gradient of every attention weight (train.py's default stage) through CPU's default kernel, equal
    the padded batch's."""
    tok = load_tokenizer(smollm2_dir)
    batch, _ = encode_all(tok, detect_format(tok), load_pairs(demo_path("sw")).examples[:3], 512)
    seqs = flat_sequences(batch)
    model = load_model(smollm2_dir)
    padded_rows = Batching(tok.pad_id, 8, 1)
    with torch.no_grad():
        padded, _ = padded_rows.logps(model, seqs)
        packed = {kind: packed_sequence_logps(model, seqs, tok.pad_id, 8, kind)[0] for kind in ("sdpa", "gathered")}
    assert padded.abs().min() > 10  # sums of many nats
    for kind, logps in packed.items():
        assert_logps_close(logps, padded, kind)

    ref_rows = padded.view(4, -1).T + torch.tensor([1.0, -1.0, -1.0, 1.0])  # a reference a little off the policy
    packed_rows = Batching.resolve(tok.pad_id, 0, 0, torch.device("cpu"), compiled=False)
    assert packed_rows.packing
    attention_only = lambda name: ".self_attn." in name  # noqa: E731
    loss_padded, g_padded = loss_and_grads(model, batch, ref_rows, Objective("clo"), padded_rows, attention_only)
    loss_packed, g_packed = loss_and_grads(model, batch, ref_rows, Objective("clo"), packed_rows, attention_only)
    assert abs(loss_packed - loss_padded) <= 1e-6 * abs(loss_padded), (loss_packed, loss_padded)
    assert len(g_padded) == 4 * model.cfg.n_layers and all(g.abs().max() > 1e-4 for g in g_padded.values())
    for k in g_padded:
        assert torch.allclose(g_packed[k], g_padded[k], atol=1e-6, rtol=1e-4), (k, (g_packed[k] - g_padded[k]).abs().max())


def test_eval_scores_in_the_layout_training_uses(tiny, monkeypatch):
    """eval.py's held-out log-probs and its multiple-choice scores (a context shared by four choices) go
    through the packed layout training resolves on the CPU (its kernel and rows) and equal the padded batch's."""
    folder, tok, examples, _ = tiny
    model = load_model(folder)
    seen, real = [], Batching.logps
    monkeypatch.setattr(Batching, "logps", lambda self, m, seqs: seen.append(self) or real(self, m, seqs))
    items = [(ex.sequences[0][0], [ex.sequences[k][1] for k in range(4)]) for ex in examples[:3]]  # a context, 4 continuations
    with torch.no_grad():
        held_out = four_way_logps(model, examples[:6], tok.pad_id, batch_size=3)
        choices = choice_sequence_logps(model, items, tok.pad_id)
        training = Batching.resolve(tok.pad_id, 0, 0, torch.device("cpu"), compiled=False)
        assert training.packing and len(seen) == 3
        assert all((b.packing, b.attention, b.one_row, b.few_shapes) == (True, training.attention, training.one_row, False) for b in seen)
        padded, _ = sequence_logps(model, flat_sequences(examples[:6]), tok.pad_id, 8, 1)
        padded_choices, _ = sequence_logps(model, [(x, conts[k]) for k in range(4) for x, conts in items], tok.pad_id, 8, 1)
    assert_logps_close(held_out, padded.view(4, -1).T, "held-out")
    assert_logps_close(choices, padded_choices.view(4, -1).T, "multiple choice")


def test_training_packed_equals_padded(tiny, tmp_path, monkeypatch):
    """train.py --packing on vs off, through a stage change: the same reference table (under two cache
    keys), losses, margins and final weights, up to float rounding."""
    monkeypatch.setenv("CLO_CACHE", str(tmp_path / "cache"))
    folder, _, _, data = tiny
    runs = {}
    for packing in ("on", "off"):
        runs[packing] = train.main(["--lang", "sw", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / packing), "--batch-size", "4",
                                    "--lr", "1e-3", "--amp", "off", "--stages", "attn:1,all:1", "--save-every", "0", "--packing", packing,
                                    "--show-answers", "0"])
    tables = [torch.load(f, weights_only=True) for f in sorted((tmp_path / "cache" / "reference").glob("ref-*.pt"))]
    assert len(tables) == 2 and (tables[0] - tables[1]).abs().max() <= 1e-4
    rows = {k: [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] for k, out in runs.items()}
    assert len(rows["on"]) == len(rows["off"]) == 4
    for a, b in zip(rows["on"], rows["off"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["margin"] - b["margin"]) <= 1e-4, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * b["grad_norm"]
    wa, wb = (load_file(out / "model" / "model.safetensors") for out in runs.values())
    diffs = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert (diffs > 1e-5).float().mean() <= 1e-3 and diffs.max() <= 1e-3  # Adam's first step on near-zero gradients: at most lr
    assert json.loads((runs["on"] / "run.json").read_text())["packing"] is True
