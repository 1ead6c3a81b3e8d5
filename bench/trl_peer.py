"""The TRL side of bench_train.py: DPOTrainer's training step on the very token ids clo's step trains on.

`DPOTrainer` with `loss_type=["sigmoid", "sft"]`, `loss_weights=[1-λ, λ]`, reference log-probs
precomputed, only q/k/v/o trainable (requires_grad set by hand, no PEFT, fp32 master copies as clo
keeps), the same weights, in the dtype and autocast of clo's precision policy. Each example is two
preference pairs (x_en: y_en ≻ y_t, x_t: y_t ≻ y_en), fed as clo's token ids, so each TRL batch of
2B pairs is the same [4B, T] tokens. Timed between consecutive `on_step_end` callbacks inside
`trainer.train()`: its fetch, collate, step and logging. The worker answers the parent's ("run", n)
with n steps' times and ("stop",) with its peak memory, as the clo worker does.
"""

import os
import tempfile
import time
import warnings

import torch
from common import hf_model, quiet_transformers, sync
from workload import bench_batches, final_memory, precision_policy, start_peak

from clo.model.decoder import ATTENTION_PROJECTIONS

# What still differs between the two steps: printed under the table and kept in the JSON (`notes`).
NOTES = [
    "NLL term: TRL's `sft` loss is the token mean over every chosen response (y_en|x_en and y_t|x_t); clo's is over "
    "y_t|x_t only (docs/paper.md, section Loss: L_SFT). The same tokens go through the model; only which log-probs enter the loss differs.",
    "DPO: TRL averages the sigmoid loss over the 2B pairs; clo averages each direction over B and takes the mean of the "
    "two: equal for a full batch.",
    "Padding and attention: clo packs (train.py's CPU default, --packing auto): each prompt once with both its answers, "
    "segments side by side in rows, attention per sequence gathered out of the rows on CPU (--attention gathered; "
    "FlexAttention on CUDA); with --packing off (clo-padded, and CUDA's default) "
    "it pads length groups to a multiple of 8 (64 when compiling) and runs SDPA with no mask (causal; right padding is "
    "never seen by a real token). TRL pads to the batch maximum and passes the attention mask, so SDPA gets a mask (on "
    "CUDA that rules out the flash kernel).",
    "Log-probs: clo projects only response positions through the head, chunked, fp32 log-softmax. TRL's fused LM head "
    "projects every position (prompt and padding too) when Triton is absent (CPU), only the response positions on CUDA "
    "with Triton, and also computes per-token entropy, mean logit and top-1 for its metrics.",
    "Host syncs: TRL reads about ten metrics with .item() every step; clo converts its metrics to float once per step, "
    "as train.py does for its log line.",
    "Precision: bf16 autocast on both sides whenever clo's --amp auto turns it on (CUDA, CPUs with AMX or AVX512_BF16); frozen weights "
    "held in bf16 then (train.py's --dtype auto), fp32 otherwise, on both; the trainable q/k/v/o are fp32 master "
    "weights on both.",
    "Optimizer: torch AdamW over q/k/v/o only on both (fused on CUDA), clip 1.0; TRL's Trainer adds its linear LR "
    "scheduler and logs every 10 steps; clo sets the LR as train.py does.",
    "Gradient checkpointing: off on both unless asked for (TRL's default is on: --trl-gradient-checkpointing; clo's "
    "--checkpoint-activations via --clo-flags). torch.compile: clo follows train.py (--compile auto: each block "
    "compiled on CUDA, none on CPU); TRL does not compile (its default).",
    "Timing: clo from collate to zero_grad; TRL from one on_step_end to the next, inside trainer.train() (its batch "
    "fetch and collate, step, scheduler and logging). Reference log-probs: precomputed by both before timing, untimed.",
]


def trl_worker(conn, spec: dict) -> None:
    """TRL's DPOTrainer as the closest equivalent of the clo step (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        os.environ["HF_DATASETS_CACHE"] = tmp  # TRL caches the reference log-probs here; never reuse a stale one
        trl_steps(conn, spec, tmp)


def trl_steps(conn, spec: dict, tmp: str) -> None:
    """Set up the trainer (untimed, reported as setup_s), then let `trainer.train()` run the parent's rounds."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames; not ours to fix
    import datasets  # only now: it reads HF_DATASETS_CACHE when imported
    import transformers
    import trl

    t0 = time.perf_counter()
    datasets.disable_progress_bars()
    quiet_transformers()
    device = torch.device(spec["device"])
    precision = precision_policy(device, spec["clo"])  # the same policy as the clo side
    batches, pad_id = bench_batches(spec)
    model = trl_model(spec, device, precision.frozen)  # same weights and dtype as clo's frozen ones
    collated = []
    trainer = make_trainer(model, preference_pairs(batches), spec, tmp, pad_id, collated, use_amp=precision.autocast is not None)
    amp = trainer.accelerator.mixed_precision == "bf16"  # what the Trainer really does, not what was asked
    conn.send({"ready": True, "setup_s": time.perf_counter() - t0, "amp": amp, "compile": False,
               "versions": {"trl": trl.__version__, "transformers": transformers.__version__}})
    rounds = rounds_callback(conn, device, collated)
    trainer.add_callback(rounds)
    trainer.train()
    conn.send({**final_memory(device, rounds.measured), "collated_tokens": collated[: len(batches)]})


def preference_pairs(batches):
    """Each example as two preference pairs; the batch [en pairs | t pairs] holds the example's four sequences."""
    import datasets

    rows = []
    for batch in batches:
        for chosen, rejected in ((0, 1), (2, 3)):
            for ex in batch:
                (prompt, y_w), (_, y_l) = ex.sequences[chosen], ex.sequences[rejected]
                rows.append({"prompt_ids": prompt, "chosen_ids": y_w, "rejected_ids": y_l})
    return datasets.Dataset.from_list(rows)


def trl_model(spec: dict, device: torch.device, dtype: torch.dtype):
    """The transformers model with only q/k/v/o trainable, those in fp32 (bf16 compute comes from autocast)."""
    from trl.trainer import dpo_trainer

    model = hf_model(spec, device, dtype)
    for name, p in model.named_parameters():
        p.requires_grad_(any(f"self_attn.{m}." in name for m in ATTENTION_PROJECTIONS))
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master weights, as clo
    if spec["model"].startswith("random:"):
        # TRL keys its reference cache by a sha256 of every weight (a minute for 7B); random weights need no key
        dpo_trainer.hash_module = lambda module: f"random-{time.time_ns()}"
    return model


def make_trainer(model, dataset, spec: dict, tmp: str, pad_id: int, collated: list, use_amp: bool):
    """A DPOTrainer on clo's token ids as they are, with clo's hyperparameters; its collator appends the
    non-padding tokens of every batch it builds to `collated` (a check that both sides see the same tokens)."""
    import transformers
    import trl
    from trl.trainer import dpo_trainer

    class TokensSeen(dpo_trainer.DataCollatorForPreference):
        """TRL's own collator, also recording the non-padding tokens of every batch it builds (a check)."""

        def torch_call(self, examples):
            out = super().torch_call(examples)
            collated.append(int(out["attention_mask"].sum()))
            return out

    class Pretokenized(trl.DPOTrainer):
        """DPOTrainer fed clo's token ids as they are: only its text tokenization is skipped."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["tokenizer"])
    config = dpo_config(tmp, spec, torch.device(spec["device"]), use_amp)
    collator = TokensSeen(pad_token_id=pad_id, max_length=None)
    return Pretokenized(model=model, args=config, data_collator=collator, train_dataset=dataset, processing_class=tokenizer)


def dpo_config(tmp: str, spec: dict, device: torch.device, use_amp: bool):
    """DPOConfig with clo's batch, learning rate, weight decay, clipping, β and λ (spec["clo"]: train.py's flags)."""
    import trl

    flags, B = spec["clo"], spec["batch"]
    return trl.DPOConfig(
        output_dir=tmp,
        per_device_train_batch_size=2 * B,  # 2B pairs = the 4B sequences of B examples
        gradient_accumulation_steps=1,
        max_steps=10**6,  # the parent stops it
        learning_rate=flags["lr"],
        weight_decay=flags["weight_decay"],
        max_grad_norm=flags["grad_clip"],
        lr_scheduler_type="linear",
        beta=flags["beta"],
        loss_type=["sigmoid", "sft"],
        loss_weights=[1 - flags["lam"], flags["lam"]],
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=2 * B,
        max_length=None,  # the ids are already the right length; never truncate
        gradient_checkpointing=spec["trl_gradient_checkpointing"],  # TRL's default is on; clo's is off
        bf16=use_amp,  # the same autocast policy as clo's --amp auto
        use_cpu=device.type == "cpu",
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        train_sampling_strategy="sequential",  # batch j = clo's batch j
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )


def rounds_callback(conn, device: torch.device, collated: list):
    """A TrainerCallback that times each optimizer step (on_step_end to on_step_end) and hands control
    to the parent between rounds."""
    from transformers import TrainerCallback

    class Rounds(TrainerCallback):
        def __init__(self):
            self.left, self.times, self.measured = 0, [], None

        def next_command(self, control):
            command = conn.recv()
            if command[0] == "stop":
                control.should_training_stop = True
            else:
                self.measured = self.measured or start_peak(device)
                self.left, self.times = command[1], []
            self.last = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            collated.clear()  # drop the reference precompute's batches
            self.next_command(control)

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last, self.left = now, self.left - 1
            if self.left == 0:
                conn.send({"step_s": self.times})
                self.next_command(control)

    return Rounds()
