"""train.py end to end on a tiny chat model: what trains, resume, the step-0 loss, overfitting, bad input."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_chat_model import demo_texts, make_tiny_chat_model, make_tiny_training_setup

import train
from clo.errors import CloError
from clo.pairs import load_pairs
from clo.train.schedule import DEFAULT_MODEL_LR, PAPER_LR
from clo.train.stages import group_of

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLO_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ChatML model whose tokenizer was trained on the Swahili demo set, and 8 of its examples."""
    return make_tiny_training_setup(tmp_path_factory.mktemp("tiny"))


def run(tiny, out, *extra):
    folder, data = tiny
    argv = ["--lang", "sw", "--model", str(folder), "--data", str(data), "--out", str(out), "--batch-size", "4", "--show-answers", "0", *extra]
    return train.main(argv)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    return load_file(folder / "model.safetensors")


AMP = pytest.mark.parametrize("amp", ["on", "off"])  # bf16 and fp32 compute, on every CPU whatever its default


@AMP
def test_step0_loss_is_nll_plus_log2(tiny, tmp_path, amp):
    """Policy == reference at step 0: every reward is 0, so L = λ·NLL + (1−λ)·log 2 (docs/paper.md "Loss")."""
    out = run(tiny, tmp_path / "run", "--max-steps", "1", "--lam", "0.3", "--amp", amp)
    first = metrics(out)[0]
    for key in ("en/chosen_reward", "en/rejected_reward", "t/chosen_reward", "t/rejected_reward"):
        assert abs(first[key]) < 1e-5
    assert first["loss"] == pytest.approx(0.3 * first["nll"] + 0.7 * math.log(2), abs=1e-5)


def test_only_the_stage_trains(tiny, tmp_path):
    folder, _ = tiny
    before = weights(folder)
    out = run(tiny, tmp_path / "run", "--max-steps", "2", "--lr", "1e-2", "--stages", "attn:1")
    after = weights(out / "model")
    assert before.keys() == after.keys()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == (group_of(key.removeprefix("model.")) == "attn"), key


def test_two_stages_rebuild_what_trains(tiny, tmp_path):
    folder, _ = tiny
    before = weights(folder)
    out = run(tiny, tmp_path / "run", "--lr", "1e-2", "--stages", "attn:1,mlp:1")
    after = weights(out / "model")
    groups = {group_of(k.removeprefix("model.")) for k in before if not torch.equal(before[k], after[k])}
    assert groups == {"attn", "mlp"}
    assert {row["stage"] for row in metrics(out)} == {0, 1}


@AMP
def test_resume_equals_uninterrupted(tiny, tmp_path, amp):
    # weight decay: stage 2 trains the norms too, so its AdamW has two parameter groups (clo/train/stages.py)
    args = ("--lr", "1e-3", "--stages", "attn:1,all:1", "--weight-decay", "0.1", "--save-every", "0", "--amp", amp)
    full = run(tiny, tmp_path / "full", *args)
    part = run(tiny, tmp_path / "part", *args, "--max-steps", "3")  # stops mid-stage-2 and checkpoints
    assert len(metrics(part)) == 3
    run(tiny, tmp_path / "part", *args, "--resume")
    a, b = metrics(full), metrics(part)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = weights(full / "model"), weights(part / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_reference_is_cached(tiny, tmp_path, capsys):
    run(tiny, tmp_path / "a", "--max-steps", "1")
    assert "reference log-probs: computed" in capsys.readouterr().err
    run(tiny, tmp_path / "b", "--max-steps", "1")
    assert "reference log-probs: cached" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_model_overfits_both_directions(tiny, tmp_path):
    out = run(tiny, tmp_path / "run", "--lr", "3e-3", "--stages", "all:40", "--warmup", "0.05")
    last = metrics(out)[-1]
    assert last["en/accuracy"] == 1.0 and last["t/accuracy"] == 1.0
    assert last["margin"] > metrics(out)[0]["margin"] + 1.0


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_baselines_run(tiny, tmp_path, method):
    out = run(tiny, tmp_path / "run", "--method", method, "--max-steps", "2")
    rows = metrics(out)
    assert len(rows) == 2 and (out / "model" / "config.json").is_file()
    assert ("margin" in rows[0]) == (method == "dpo")


# --- bad input: one line, non-zero exit, nothing written --------------------------------------------


def bad_data(tmp_path, tiny, mutate):
    lines = tiny[1].read_text(encoding="utf-8").splitlines()
    lines[2] = mutate(lines[2])
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def drop_field(line, field):
    record = json.loads(line)
    del record[field]
    return json.dumps(record)


def empty_field(line, field):
    return json.dumps({**json.loads(line), field: " "})


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda line: line[:-5], "bad.jsonl:3: invalid JSON"),
        (lambda line: drop_field(line, "prompt"), "bad.jsonl:3: missing field 'prompt'"),
        (lambda line: empty_field(line, "response"), "bad.jsonl:3: field 'response' is empty"),
    ],
)
def test_bad_data_line(tiny, tmp_path, mutate, message):
    path = bad_data(tmp_path, tiny, mutate)
    with pytest.raises(CloError, match=message):
        train.main(["--lang", "sw", "--model", str(tiny[0]), "--data", str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lang", "xx"], "unknown language 'xx'"),
        (["--stages", "attn-2"], "--stages: 'attn-2' is not GROUP:EPOCHS"),
        (["--stages", "attn:1,brain:1"], "unknown group 'brain'"),
    ],
)
def test_bad_flags(tiny, tmp_path, extra, message):
    argv = ["--lang", "sw", "--model", str(tiny[0]), "--data", str(tiny[1]), "--out", str(tmp_path / "out"), *extra]
    with pytest.raises(CloError, match=message):
        train.main(argv)
    assert not (tmp_path / "out").exists()


def test_resume_from_another_model_is_refused(tiny, tmp_path):
    run(tiny, tmp_path / "run", "--max-steps", "1")
    other = make_tiny_chat_model(tmp_path / "other", ["some other text"] * 10, seed=1)
    with pytest.raises(CloError, match="made with --model"):
        train.main(["--lang", "sw", "--model", str(other), "--data", str(tiny[1]), "--out", str(tmp_path / "run"), "--batch-size", "4", "--resume"])


# --- LoRA: the reference is the adapter-disabled model; adapters are saved in PEFT's format --------


def test_reference_with_adapters_disabled_equals_base(tiny):
    from clo.model.chat import detect_format
    from clo.model.hf_folder import load_model
    from clo.model.lora import apply_lora, disable_adapters, lora_layers
    from clo.model.tokenizer import load_tokenizer
    from clo.train.batching import encode_all
    from clo.train.reference import compute_reference_logps
    from clo.train.scoring import Batching

    folder, data = tiny
    tok = load_tokenizer(folder)
    examples, _ = encode_all(tok, detect_format(tok), load_pairs(data).examples, 512)
    base = compute_reference_logps(load_model(folder), examples, Batching(tok.pad_id, 64, 1), 4)
    model = load_model(folder)
    apply_lora(model, r=4)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_()  # a trained adapter: it must not leak into the reference
    with disable_adapters(model):
        off = compute_reference_logps(model, examples, Batching(tok.pad_id, 64, 1), 4)
    on = compute_reference_logps(model, examples, Batching(tok.pad_id, 64, 1), 4)
    assert torch.allclose(off, base, atol=1e-5)
    assert not torch.allclose(on, base, atol=1e-3)


def test_lora_run_saves_peft_adapter_and_merged_model(tiny, tmp_path):
    import transformers
    from peft import PeftModel

    folder, _ = tiny
    out = run(tiny, tmp_path / "run", "--lora", "--lr", "1e-2", "--max-steps", "3", "--save-merged")
    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    peft_model = PeftModel.from_pretrained(load(folder), out / "adapter").eval()  # injects into its base
    base = load(folder)
    merged = load(out / "model")
    x = torch.randint(3, 300, (2, 16))
    with torch.no_grad():
        a, b, c = peft_model(x).logits, merged(x).logits, base(x).logits
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-4  # the adapter learned something
    assert weights(out / "model")["model.embed_tokens.weight"].equal(weights(folder)["model.embed_tokens.weight"])


def test_weight_decay_shrinks_matrices_not_norm_gains(tiny):
    """--weight-decay: an AdamW step with zero gradients moves each matrix by -lr·wd·w and leaves the RMSNorm
    gains (1-D) as they are; without weight decay the optimizer keeps one parameter group."""
    from clo.model.hf_folder import load_model
    from clo.train.stages import begin_stage

    model = load_model(tiny[0])
    optimizer, trainable, _ = begin_stage(model, ("all",), lora=False, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            assert torch.allclose(p.detach(), before[name] * (1 - 0.1 * 0.5)), name
        else:
            assert "norm" in name and torch.equal(p.detach(), before[name]), name
    assert len(begin_stage(load_model(tiny[0]), ("all",), lora=False, lr=0.1, weight_decay=0.0)[0].param_groups) == 1


def test_gradients_reach_only_the_stage(tiny):
    from clo.model.chat import detect_format
    from clo.model.hf_folder import load_model
    from clo.model.tokenizer import load_tokenizer
    from clo.train.batching import collate, encode_all
    from clo.train.loss import response_logps
    from clo.train.stages import set_trainable

    folder, data = tiny
    tok = load_tokenizer(folder)
    examples, _ = encode_all(tok, detect_format(tok), load_pairs(data).examples, 512)
    model = load_model(folder)
    for groups in (("attn",), ("mlp", "norm"), ("all",)):
        model.zero_grad(set_to_none=True)
        set_trainable(model, groups)
        tokens, labels = collate(examples[:2], tok.pad_id)
        logps, _ = response_logps(model.hidden(tokens), model.lm_head.weight, labels)
        logps.sum().backward()
        for name, p in model.named_parameters():
            should = "all" in groups or group_of(name) in groups
            assert (p.grad is not None and p.grad.abs().sum() > 0) == should, (groups, name)


@pytest.mark.parametrize("method", ["clo", "sft", "dpo"])
@pytest.mark.parametrize("packing", ["on", "off"])
def test_accumulated_micro_batches_step_as_one_batch(tiny, method, packing):
    """--grad-accum: micro-batches of 4 + 1 examples (an epoch's short last one) give the gradient and the
    metrics of the same 5 examples in one micro-batch: the NLL a mean over all 5 examples' response tokens, the
    DPO terms over all 5 examples (a short micro-batch weighs by its size, not as much as a full one)."""
    from clo.model.chat import detect_format
    from clo.model.hf_folder import load_model
    from clo.model.tokenizer import load_tokenizer
    from clo.train.batching import encode_all
    from clo.train.precision import training_precision
    from clo.train.scoring import Batching, example_logps
    from clo.train.stages import set_trainable
    from clo.train.step import Objective, optimizer_step

    folder, data = tiny
    tok = load_tokenizer(folder)
    examples, _ = encode_all(tok, detect_format(tok), load_pairs(data).examples[:5], 512)
    cpu = torch.device("cpu")
    batching = Batching.resolve(tok.pad_id, 0, 0, cpu, False, packing)
    precision = training_precision(cpu, "float32", "off")
    objective = Objective(method, lam=0.3)
    ref = None
    if objective.needs_reference:  # the starting model's log-probs, moved so that every DPO term has a gradient of its own
        ref = example_logps(load_model(folder), examples, batching, 5) + torch.linspace(-3, 3, 20).view(5, 4)

    def step(sizes):
        model = load_model(folder)
        set_trainable(model, ("attn",))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=1.0)  # the update is minus the gradient
        start, micro = 0, []
        for n in sizes:
            micro.append((examples[start : start + n], None if ref is None else ref[start : start + n]))
            start += n
        before = [p.detach().clone() for p in trainable]
        row, tokens = optimizer_step(model, optimizer, trainable, micro, 1.0, objective, batching, precision, 0.0)
        return [b - p.detach() for b, p in zip(before, trainable)], row, tokens

    whole, row, tokens = step([5])
    for sizes in ([4, 1], [2, 3]):
        grads, row_k, tokens_k = step(sizes)
        diff = max(float((g - w).abs().max()) for g, w in zip(grads, whole))
        scale = max(float(w.abs().max()) for w in whole)
        assert diff <= 1e-5 * scale, (sizes, diff, scale)
        assert tokens_k == tokens and row_k.keys() == row.keys()
        for key in row:  # rewards are β times differences of sums of tens of nats, computed in other calls: ~1e-6
            assert row_k[key] == pytest.approx(row[key], rel=1e-5, abs=1e-5), (sizes, key)


@pytest.mark.slow
def test_default_command_runs_one_step(smollm2_dir, tmp_path):
    """`python train.py --lang sw` itself (default model, demo data), cut to one step of 4 of its examples
    (the whole demo set's reference pass alone takes ~100 s on 2 cores); it ends with the preview, of one
    prompt of its 4 (each answers 64 tokens twice: ~5 s on 2 cores; batched generation on this model is
    checked against transformers in test_sources.py)."""
    import os

    env = {**os.environ, "CLO_CACHE": str(smollm2_dir.parent)}  # the default model's cache, not the tmp one
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "--lang", "sw", "--max-steps", "1", "--max-examples", "4", "--batch-size", "4", "--show-answers", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"model saved to {out / 'model'}" in proc.stderr
    assert len(metrics(out)) == 1
    assert json.loads((out / "run.json").read_text())["summary"]["steps"] == 1
    assert json.loads((out / "run.json").read_text())["lr"] == DEFAULT_MODEL_LR  # --lr auto on the default model
    assert re.search(r"answered in Swahili: [01]/1 before training \([01] not degenerate\), [01]/1 after \([01] not degenerate\)", proc.stderr)
    assert proc.stderr.count("  before [") == proc.stderr.count("  after  [") == 1


def test_preview_answers_the_same_prompts_before_and_after(tiny, tmp_path, capsys):
    """--show-answers N: N held-out demo prompts, answered by the starting and the trained model; 0: none;
    by default 4."""
    from clo.eval.preview import preview_prompts

    run(tiny, tmp_path / "shown", "--max-steps", "1", "--show-answers", "2")
    err = capsys.readouterr().err
    assert json.loads((tmp_path / "shown" / "run.json").read_text())["lr"] == PAPER_LR  # --lr auto on any other model
    prompts = preview_prompts("sw", 2)
    assert [p.text for p in prompts] == [ex.prompt for ex in load_pairs(REPO / "data/demo/sw.heldout.jsonl").examples[:2]]
    for p in prompts:
        assert f"  prompt        {' '.join(p.text.split())[:99]}" in err
    assert err.count("  before [") == err.count("  after  [") == 2
    assert re.search(r"answered in Swahili: [0-2]/2 before training \([0-2] not degenerate\), [0-2]/2 after \([0-2] not degenerate\)", err)
    run(tiny, tmp_path / "hidden", "--max-steps", "1", "--show-answers", "0")
    assert "answered in Swahili" not in capsys.readouterr().err
    folder, data = tiny
    train.main(["--lang", "sw", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "default"), "--batch-size", "4", "--max-steps", "1"])
    assert capsys.readouterr().err.count("  before [") == 4


def test_preview_counts_degenerate_answers_apart():
    import io

    from clo.eval.preview import preview_prompts, print_preview

    prompts = preview_prompts("sw", 3)
    before = [("Hello there.", "en", None), ("Habari yako, rafiki.", "sw", None), ("", "und", "empty")]
    after = [("Habari, rafiki yangu.", "sw", None), ("kwa kwa kwa kwa kwa kwa", "sw", "repeat"), ("Asante sana kwa swali.", "sw", None)]
    out = io.StringIO()
    print_preview(prompts, before, after, "sw", file=out)
    text = out.getvalue()
    assert "answered in Swahili: 1/3 before training (1 not degenerate), 3/3 after (2 not degenerate)" in text
    assert "  before [und, empty]  (empty)" in text and "  after  [sw, repeat]  kwa kwa" in text


@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_saves_a_checkpoint_that_resumes(tiny, tmp_path, signame, code):
    import os
    import signal
    import time

    folder, data = tiny
    out = tmp_path / "run"
    argv = [sys.executable, "train.py", "--lang", "sw", "--model", str(folder), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--stages", "all:200", "--save-every", "0", "--show-answers", "0"]
    env = {**os.environ, "CLO_CACHE": str(tmp_path / "cache")}
    # a shell's background job (as CI may run us) starts with SIGINT ignored; Python then never raises
    # KeyboardInterrupt, so give the child the default disposition back
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=restore)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-1000:]
    assert "continue with --resume" in err
    done = len(metrics(out))
    assert 3 <= done < 400
    resumed = train.main(["--lang", "sw", "--model", str(folder), "--data", str(data), "--out", str(out), "--batch-size", "4", "--stages", "all:200", "--save-every", "0", "--show-answers", "0", "--resume", "--max-steps", str(done + 2)])
    assert [r["step"] for r in metrics(resumed)] == list(range(1, done + 3))


@pytest.mark.slow
@pytest.mark.parametrize("option", [("--checkpoint-activations",), ("--compile", "on", "--bucket", "512")], ids=["checkpointing", "compiled-blocks"])
def test_speed_options_train_the_same(tiny, tmp_path, monkeypatch, option):
    """Activation checkpointing and per-block torch.compile change how a step runs, not what it computes.

    fp32 (--amp off) so that only the order of floating-point operations could differ: the metrics
    of 2 steps match the plain run to fp32 rounding. Checkpointing recomputes the same ops, so its
    weights match to 1e-5; compiled kernels sum in another order, and Adam turns a gradient that is
    ~0 into a ±lr step, so theirs match to 5% of how far the weights moved (a wrong gradient: ~100%).
    Compiled, both steps' packed batches are one row of 512 tokens, and the 2nd step, other sequences
    of other lengths, builds no graph (the per-sequence attention calls stay outside the graphs).
    """
    from torch._dynamo.utils import counters

    import clo.train.scoring

    graphs, shapes, pack = [], [], clo.train.scoring.pack

    def recording_step(self, *a, **k):  # after each step's forward and backward
        graphs.append(counters["stats"]["unique_graphs"])
        return real_step(self, *a, **k)

    def recording_pack(*a, **k):
        packed = pack(*a, **k)
        if torch.is_grad_enabled():  # training steps, not the (eager, no-grad) reference pass
            shapes.append(tuple(packed.tokens.shape))
        return packed

    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    monkeypatch.setattr(clo.train.scoring, "pack", recording_pack)
    args = ("--max-steps", "2", "--lr", "1e-3", "--amp", "off", "--dtype", "float32", "--device", "cpu")
    plain = run(tiny, tmp_path / "plain", *args)
    torch._dynamo.reset()
    counters.clear()
    graphs.clear()
    shapes.clear()
    other = run(tiny, tmp_path / "other", *args, *option)
    for a, b in zip(metrics(plain), metrics(other), strict=True):
        for key in ("loss", "nll", "margin", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    wa, wb, w0 = weights(plain / "model"), weights(other / "model"), weights(tiny[0])
    moved = max((wa[k] - w0[k]).abs().max().item() for k in wa)
    assert moved > 1e-3  # the steps changed the weights, so equal weights mean equal updates
    tolerance = 1e-5 if "--checkpoint-activations" in option else 0.05 * moved
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < tolerance
    if "--compile" in option:
        assert len(set(shapes)) == 1 and len(shapes) >= 2, shapes
        assert len(graphs) == 2 and 0 < graphs[0] == graphs[1], graphs


def test_weights_held_in_bf16_are_saved_exactly(tiny, tmp_path):
    """Frozen weights held in bf16 never reach the output rounded: with lr 0 every saved weight equals
    the fp32 checkpoint's, bit for bit — the frozen ones (restored before saving) and the trained
    ones (restored before their stage made fp32 master copies of them)."""
    folder, _ = tiny
    out = run(tiny, tmp_path / "run", "--dtype", "bfloat16", "--amp", "on", "--lr", "0", "--stages", "attn:1,mlp:1", "--max-steps", "3")
    before, after = weights(folder), weights(out / "model")
    assert all(t.dtype == torch.float32 for t in before.values())
    assert all(torch.equal(before[k], after[k]) for k in before)
    rounded = {k: t.bfloat16().float() for k, t in before.items()}
    assert any(not torch.equal(rounded[k], before[k]) for k in before)  # so bf16 rounding would have shown


def test_the_saved_dtype_is_the_files_whatever_config_json_says(tiny, tmp_path):
    """A checkpoint whose config.json says bfloat16 over fp32 files (it happens): the untrained weights are saved
    as the files hold them, bit for bit, not rounded to the config's word."""
    import shutil

    folder = tmp_path / "says-bf16"
    shutil.copytree(tiny[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    out = train.main(["--lang", "sw", "--model", str(folder), "--data", str(tiny[1]), "--out", str(tmp_path / "run"),
                      "--batch-size", "4", "--show-answers", "0", "--max-steps", "1"])
    before, after = weights(folder), weights(out / "model")
    assert all(after[k].dtype == torch.float32 and torch.equal(before[k], after[k]) for k in before if ".self_attn." not in k)


def test_restore_originals_only_where_memory_is_narrower(tiny):
    from clo.model.hf_folder import load_model
    from clo.train.precision import restore_originals

    folder, _ = tiny
    model = load_model(folder, "cpu", torch.bfloat16)
    names = ["layers.0.mlp.up_proj.weight", "embed_tokens.weight"]
    assert sorted(restore_originals(model, folder, names)) == sorted(names)
    params = dict(model.named_parameters())
    for name in names:
        assert params[name].dtype == torch.float32
        assert torch.equal(params[name], weights(folder)["model." + name])
    assert params["layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16  # not asked for: untouched
    assert model.lm_head.weight is model.embed_tokens.weight  # tied: restored together
    assert restore_originals(load_model(folder, "cpu", torch.float32), folder, names) == []  # fp32 holds fp32 exactly


@pytest.mark.slow
def test_compiled_blocks_build_two_graphs_per_batch_shape(tiny, tmp_path, monkeypatch):
    """--compile on: lengths are bucketed, and the blocks share their graphs (regional compilation):
    two per padded batch shape whatever the depth, one for block 0 (its input, the frozen embedding,
    needs no gradient) and one for every later block; a later batch of that shape builds none."""
    from torch._dynamo.utils import counters

    shapes = []

    import clo.train.scoring

    def recording_collate(*args, **kwargs):
        tokens, labels = collate(*args, **kwargs)
        if torch.is_grad_enabled():  # training steps, not the (eager, no-grad) reference pass
            shapes.append(tuple(tokens.shape))
        return tokens, labels

    collate = clo.train.scoring.collate_sequences
    monkeypatch.setattr(clo.train.scoring, "collate_sequences", recording_collate)
    deep = make_tiny_chat_model(tmp_path / "deep", demo_texts("sw"), num_hidden_layers=5)  # one graph per block would be 5 per shape
    torch._dynamo.reset()
    counters.clear()
    run((deep, tiny[1]), tmp_path / "run", "--compile", "on", "--amp", "off", "--batch-size", "4", "--bucket", "256", "--max-steps", "2", "--packing", "off", "--length-groups", "1")
    assert len(shapes) == 2 and len(set(shapes)) == 1, shapes  # 8 examples: two batches of 4, each one padded tensor of one shape
    assert counters["stats"]["unique_graphs"] == 2


def test_bf16_weights_need_autocast(tiny, tmp_path):
    """--dtype bfloat16 --amp off would meet bf16 activations with fp32 master weights: refused before any work.
    --amp auto with --dtype bfloat16 turns autocast on, on every CPU (it used to crash without AMX)."""
    with pytest.raises(CloError, match="--dtype bfloat16 with --amp off"):
        run(tiny, tmp_path / "off", "--dtype", "bfloat16", "--amp", "off")
    assert not (tmp_path / "off").exists()
    out = run(tiny, tmp_path / "auto", "--dtype", "bfloat16", "--max-steps", "1")
    assert json.loads((out / "run.json").read_text())["summary"]["steps"] == 1


# --- interrupts and resume: an update is never saved without its position ---------------------------


def test_signal_right_after_an_update_is_saved_with_its_position(tiny, tmp_path, monkeypatch):
    """SIGINT landing just after the 2nd AdamW.step() (before the step's host sync and the position
    update): the checkpoint holds step 2 with its update, and the resumed run equals an uninterrupted one."""
    import os
    import signal

    args = ("--lr", "1e-3", "--stages", "attn:1", "--save-every", "0", "--amp", "off")
    full = run(tiny, tmp_path / "full", *args, "--max-steps", "4")
    real_step, calls = torch.optim.AdamW.step, []

    def step_then_signal(self, *a, **k):
        result = real_step(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    # a shell starts background jobs with SIGINT ignored, and train.py keeps an ignored signal ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as stopped:
            run(tiny, tmp_path / "part", *args, "--max-steps", "4")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.value.code == 130
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    saved = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    adam_steps = {float(s["step"]) for s in saved["optimizer"]["state"].values()}
    assert saved["position"]["step"] == 2 and adam_steps == {2.0}
    run(tiny, tmp_path / "part", *args, "--max-steps", "4", "--resume")
    assert [r["loss"] for r in metrics(tmp_path / "part")] == [r["loss"] for r in metrics(full)]
    wa, wb = weights(full / "model"), weights(tmp_path / "part" / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_signal_during_the_last_save_waits_for_it(tiny, tmp_path, monkeypatch):
    """SIGINT while the run's one checkpoint (--save-every 0) is being written: the save completes, then the
    run stops with 130 and a checkpoint at its last step (it was killed with nothing saved)."""
    import os
    import signal

    import clo.train.run

    real_save = clo.train.run.save_checkpoint

    def signal_then_save(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*a, **k)

    monkeypatch.setattr(clo.train.run, "save_checkpoint", signal_then_save)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal gives it (not a background job)
    try:
        with pytest.raises((SystemExit, KeyboardInterrupt)) as stopped:
            run(tiny, tmp_path / "run", "--stages", "attn:1", "--save-every", "0", "--max-steps", "2", "--amp", "off")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.type is SystemExit and stopped.value.code == 130
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["position"]["step"] == 2


@pytest.mark.parametrize(
    "flags, flag",
    [
        (("--lam", "0.3"), "--lam"),
        (("--beta", "0.2"), "--beta"),
        (("--directions", "sum"), "--directions"),
        (("--warmup", "0.5"), "--warmup"),
        (("--grad-clip", "0.5"), "--grad-clip"),
        (("--weight-decay", "0.1"), "--weight-decay"),
        (("--chat-format", "plain"), "--chat-format"),
        (("--bucket", "16"), "--bucket"),
        (("--packing", "off"), "--packing"),  # the CPU default packs
        (("--amp", "on"), "precision"),
        (("--lora", "--lora-r", "4"), "--lora"),
    ],
)
def test_resume_refuses_changed_settings(tiny, tmp_path, flags, flag):
    run(tiny, tmp_path / "run", "--max-steps", "1", "--amp", "off")
    with pytest.raises(CloError, match=f"made with {flag} "):
        run(tiny, tmp_path / "run", "--max-steps", "2", "--amp", "off", "--resume", *flags)  # a later --amp wins


def test_resume_refuses_other_lora_rank_and_other_data(tiny, tmp_path):
    """--lora-r 4 after an r=8 run used to swap in r=8 tensors under r=4 scaling; an edited data file
    at the same path used to resume silently."""
    run(tiny, tmp_path / "run", "--max-steps", "1", "--lora", "--lora-r", "8")
    with pytest.raises(CloError, match="made with --lora-r 8, this one has 4"):
        run(tiny, tmp_path / "run", "--max-steps", "2", "--lora", "--lora-r", "4", "--resume")
    folder, data = tiny
    edited = tmp_path / "edited.jsonl"
    lines = data.read_text(encoding="utf-8").splitlines()
    edited.write_text("\n".join(lines[1:] + lines[:1]) + "\n", encoding="utf-8")  # same examples, another order
    run((folder, edited), tmp_path / "data", "--max-steps", "1")
    edited.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CloError, match="made with --data"):
        run((folder, edited), tmp_path / "data", "--max-steps", "2", "--resume")
    run((folder, edited), tmp_path / "steps", "--max-steps", "1")  # --max-steps only says where to stop
    run((folder, edited), tmp_path / "steps", "--max-steps", "2", "--resume")
    assert len(metrics(tmp_path / "steps")) == 2


def test_checkpoint_with_a_pickle_payload_is_refused_unrun(tiny, tmp_path):
    run(tiny, tmp_path / "run", "--max-steps", "1")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    ckpt["settings"]["lam"] = Payload()
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CloError, match="cannot read checkpoint"):
        run(tiny, tmp_path / "run", "--max-steps", "2", "--resume")
    assert not marker.exists()


def test_reference_cache_follows_the_weights_content(tiny, tmp_path, capsys):
    """Weights rewritten with the same size and mtime (as cp -p, rsync -a, tar leave them) are a new
    model: the reference is computed again, so step-1 rewards stay 0. --recompute-reference forces it."""
    import os

    from safetensors.torch import save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny[0], folder)
    fp32 = ("--amp", "off")  # the property is the cache key, not bf16 rounding: fp32 on every CPU
    run((folder, tiny[1]), tmp_path / "a", "--max-steps", "1", *fp32)
    path = folder / "model.safetensors"
    st = path.stat()
    w = weights(folder)
    w["model.layers.0.self_attn.q_proj.weight"] = w["model.layers.0.self_attn.q_proj.weight"] * 1.5
    save_file(w, path, metadata={"format": "pt"})
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    capsys.readouterr()
    out = run((folder, tiny[1]), tmp_path / "b", "--max-steps", "1", *fp32)
    assert "reference log-probs: computed" in capsys.readouterr().err
    first = metrics(out)[0]
    assert max(abs(first[k]) for k in ("en/chosen_reward", "en/rejected_reward", "t/chosen_reward", "t/rejected_reward")) < 1e-5
    run((folder, tiny[1]), tmp_path / "c", "--max-steps", "1", *fp32)
    assert "reference log-probs: cached" in capsys.readouterr().err
    run((folder, tiny[1]), tmp_path / "d", "--max-steps", "1", "--recompute-reference", *fp32)
    assert "reference log-probs: computed" in capsys.readouterr().err


def test_model_folder_records_its_chat_format(tiny, tmp_path):
    """Trained with --chat-format plain on a ChatML checkpoint: eval.py and clo.model.generate (both through
    detect_format's auto) serve the saved model in plain."""
    from clo.model.chat import detect_format
    from clo.model.tokenizer import load_tokenizer

    assert detect_format(load_tokenizer(tiny[0])).name == "chatml"
    out = run(tiny, tmp_path / "run", "--max-steps", "1", "--chat-format", "plain")
    assert detect_format(load_tokenizer(out / "model")).name == "plain"
    assert detect_format(load_tokenizer(out / "model"), "chatml").name == "chatml"  # a flag still overrides
    out = run(tiny, tmp_path / "auto", "--max-steps", "1")
    assert detect_format(load_tokenizer(out / "model")).name == "chatml"


def test_sft_dpo_is_one_command_with_the_sft_model_as_reference(tiny, tmp_path, capsys):
    out = run(tiny, tmp_path / "run", "--method", "sft-dpo", "--lr", "1e-2", "--stages", "attn:1", "--amp", "off")
    sft, dpo = metrics(out / "sft"), metrics(out)
    assert "margin" not in sft[0] and "margin" in dpo[0]
    assert json.loads((out / "run.json").read_text())["model"] == str(out / "sft" / "model")
    # the DPO phase starts at its reference: the SFT model (the base model would give rewards far from 0)
    assert max(abs(dpo[0][k]) for k in ("en/chosen_reward", "t/chosen_reward", "en/rejected_reward", "t/rejected_reward")) < 1e-5
    assert (out / "model" / "config.json").is_file()
    capsys.readouterr()
    run(tiny, tmp_path / "run", "--method", "sft-dpo", "--lr", "1e-2", "--stages", "attn:1", "--amp", "off", "--resume")
    assert "SFT phase already finished" in capsys.readouterr().err
    # while one sft-dpo command runs (its DPO phase reads <out>/sft/model), another on the same --out is refused
    # before its SFT phase rewrites that model
    from clo.lock import output_lock

    sft_model = {p.name: p.read_bytes() for p in (out / "sft" / "model").iterdir()}
    with output_lock(out):
        with pytest.raises(CloError, match="in use by another run"):
            run(tiny, tmp_path / "run", "--method", "sft-dpo", "--stages", "attn:1", "--amp", "off", "--overwrite")
    assert {p.name: p.read_bytes() for p in (out / "sft" / "model").iterdir()} == sft_model


def test_sft_dpo_with_lora_starts_dpo_from_the_merged_sft_model(tiny, tmp_path):
    """--lora: the SFT phase writes its merged model (the DPO phase's start and reference) beside its adapter,
    even without --save-merged; the DPO phase's adapter names that model as its base."""
    out = run(tiny, tmp_path / "run", "--method", "sft-dpo", "--lora", "--lr", "1e-2", "--stages", "attn:1", "--amp", "off")
    assert (out / "sft" / "model" / "config.json").is_file() and (out / "sft" / "adapter").is_dir()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(out / "sft" / "model")
    assert not (out / "model").exists()  # the final merged model only with --save-merged
    dpo = metrics(out)
    assert max(abs(dpo[0][k]) for k in ("en/chosen_reward", "t/chosen_reward")) < 1e-5


# --- bad input for train.py: one line, before any work, nothing changed ------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--batch-size", "-1"], "--batch-size -1"),
        (["--grad-accum", "0"], "--grad-accum 0"),
        (["--lr", "-1"], "--lr -1.0"),
        (["--lr", "nan"], "--lr nan"),
        (["--max-steps", "-1"], "--max-steps -1"),
        (["--max-examples", "-1"], "--max-examples -1"),
        (["--warmup", "2"], "--warmup 2.0"),
        (["--lam", "1.5"], "--lam 1.5"),
        (["--beta", "0"], "--beta 0.0"),
        (["--max-length", "0"], "--max-length 0"),
        (["--lora-r", "0"], "--lora-r 0"),
        (["--lora-dropout", "1"], "--lora-dropout 1.0"),
        (["--device", "bogus"], "--device 'bogus'"),
        (["--resume", "--overwrite"], "choose one"),
    ],
)
def test_bad_numeric_flags(tiny, tmp_path, extra, message):
    cache = tmp_path / "cache"
    with pytest.raises(CloError, match=re.escape(message)):
        run(tiny, tmp_path / "out", *extra)
    assert not (tmp_path / "out").exists() and not (cache / "reference").exists()


def test_a_finished_run_is_refused_not_damaged(tiny, tmp_path):
    out = run(tiny, tmp_path / "run", "--max-steps", "1")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CloError, match="holds a run"):
        run(tiny, out, "--max-steps", "2")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    run(tiny, out, "--max-steps", "2", "--overwrite")
    assert len(metrics(out)) == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(CloError, match="is not a folder"):
        run(tiny, tmp_path / "file")


def test_overwrite_deletes_only_a_run_and_never_its_inputs(tiny, tmp_path):
    """--overwrite replaces a run; it refuses to start from the model it would delete (--model <out>/model),
    and a folder that holds a `model/` but no run.json is not a run (a source tree, a downloaded model)."""
    out = run(tiny, tmp_path / "run", "--max-steps", "1")
    saved = {p.name: p.read_bytes() for p in (out / "model").iterdir()}
    with pytest.raises(CloError, match=r"--model .*model: inside .*which --overwrite would delete"):
        train.main(["--lang", "sw", "--model", str(out / "model"), "--data", str(tiny[1]), "--out", str(out), "--overwrite", "--show-answers", "0"])
    assert {p.name: p.read_bytes() for p in (out / "model").iterdir()} == saved
    (out / "run.json").unlink()
    with pytest.raises(CloError, match="no run.json, so not a train.py run"):
        run(tiny, out, "--max-steps", "1", "--overwrite")
    assert {p.name: p.read_bytes() for p in (out / "model").iterdir()} == saved


def test_run_files_that_are_links_are_refused(tiny, tmp_path):
    """A run prunes checkpoint-shards/ and replaces model/: never through a link planted in --out."""
    out = run(tiny, tmp_path / "run", "--max-steps", "1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "README.txt").write_text("not a run's")
    (out / "checkpoint-shards").symlink_to(elsewhere)
    for extra in (("--resume",), ("--overwrite",)):
        with pytest.raises(CloError, match="checkpoint-shards is a link"):
            run(tiny, out, "--max-steps", "2", *extra)
    assert [p.name for p in elsewhere.iterdir()] == ["README.txt"]


def test_a_diverged_step_is_logged_as_standard_json_with_a_warning(tiny, tmp_path, monkeypatch, capsys):
    """A NaN loss (a learning rate too high) is written as null in metrics.jsonl and run.json, which strict JSON
    readers (jq, JavaScript) refuse as NaN, and said once."""
    from clo.train.step import Objective

    real = Objective.loss

    def diverging(self, *a, **k):  # the step's metrics report a NaN loss (its gradient stays finite)
        loss, metrics = real(self, *a, **k)
        return loss, {**metrics, "loss": torch.tensor(float("nan"))}

    monkeypatch.setattr(Objective, "loss", diverging)
    out = run(tiny, tmp_path / "run", "--max-steps", "2")

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    rows = [strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [None, None]
    assert strict((out / "run.json").read_text())["summary"]["last_loss"] is None
    said = capsys.readouterr()
    assert (said.out + said.err).count("the run diverged") == 1


def test_one_run_per_out(tiny, tmp_path):
    from clo.lock import output_lock

    with output_lock(tmp_path / "run"):
        with pytest.raises(CloError, match="in use by another run"):
            run(tiny, tmp_path / "run", "--max-steps", "1")


def test_leftovers_of_a_killed_save_are_removed(tiny, tmp_path):
    """A kill during a save leaves `.checkpoint.pt.tmp<pid>` (as large as the checkpoint) or a
    `.model.XXXX/` folder; the next run on the folder removes them."""
    out = run(tiny, tmp_path / "run", "--max-steps", "1")
    (out / ".checkpoint.pt.tmp99999").write_bytes(b"\0" * 1000)
    (out / ".model.abc123").mkdir()
    (out / ".model.abc123" / "model.safetensors").write_bytes(b"\0" * 10)
    run(tiny, out, "--max-steps", "2", "--resume")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "model", "run.json"]
    # under torchrun a process writes its part into checkpoint-shards/step-S/, where a later save may reuse the folder
    from clo.train.run import remove_leftovers

    torn = out / "checkpoint-shards" / "step-00000004" / ".rank-00001-of-00002.pt.x1y2z3"
    torn.parent.mkdir(parents=True)
    torn.write_bytes(b"\0" * 10)
    (torn.parent / "rank-00000-of-00002.pt").write_bytes(b"kept")
    assert remove_leftovers(out) == [torn] and [p.name for p in torn.parent.iterdir()] == ["rank-00000-of-00002.pt"]


def test_torn_metrics_line_is_dropped_on_resume(tiny, tmp_path):
    out = run(tiny, tmp_path / "run", "--max-steps", "1")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')  # killed mid-write
    run(tiny, out, "--max-steps", "2", "--resume")
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_kill_during_a_save_then_resume_leaves_no_temporary_file(tiny, tmp_path):
    """SIGKILL between writing the 2nd checkpoint's temporary file and renaming it (a real kill, in
    a child process): the temporary file is left behind; the next --resume removes it, continues
    from the 1st checkpoint, and ends like an uninterrupted run."""
    import os
    import textwrap

    folder, data = tiny
    args = ["--lang", "sw", "--model", str(folder), "--data", str(data), "--batch-size", "4", "--lr", "1e-3", "--save-every", "1", "--max-steps", "3", "--amp", "off",
            "--show-answers", "0"]
    full = train.main([*args, "--out", str(tmp_path / "full")])
    out = tmp_path / "run"
    child = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        import train
        real_save, saves = torch.save, []
        def save_then_die(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            saves.append(f)
            if len(saves) == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # after the temp file is written, before os.replace
        torch.save = save_then_die
        train.main({[*args, "--out", str(out)]!r})
    """)
    env = {**os.environ, "CLO_CACHE": os.environ["CLO_CACHE"]}
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in out.glob(".checkpoint.pt.*")]  # the kill left it
    assert torch.load(out / "checkpoint.pt", weights_only=True)["position"]["step"] == 1
    train.main([*args, "--out", str(out), "--resume"])
    assert not list(out.glob(".*")) and not list(tmp_path.glob(".*.lock"))
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(full)]
