"""One optimizer step of CLO, SFT or DPO, from explicit inputs.

    four sequences per example --(policy, scoring.py)--> log π [4, B]
                                                          + log π_ref [B, 4] (reference.py, cached)
    --(Objective.loss, loss.py)--> L_CLO = λ·NLL(y_t | x_t) + (1−λ)·L_CL   (docs/paper.md "Loss")
    --> backward over the micro-batches, clip, AdamW

The step sees only what it needs: the model, the optimizer and its parameters, the micro-batches
with their reference rows, the learning rate, an `Objective` (which loss), a `Batching` (how the
sequences become tensors) and a `Precision` (the autocast it computes under).
"""

from dataclasses import dataclass

import torch

from clo.train.batching import count_tokens, flat_sequences
from clo.train.loss import FourWay, clo_loss, dpo_only_loss, token_mean_nll
from clo.train.precision import Precision
from clo.train.scoring import Batching

# --method sft: which of the four sequences (clo/train/batching.py) get the NLL
SFT_SEQUENCES = {"target": (2,), "english": (0,), "both": (0, 2)}


@dataclass(frozen=True)
class Objective:
    """What a step minimises. clo: the paper's loss; sft: baseline 1, the NLL of the `sft_on`
    responses; dpo: L_CL alone (baseline 2's second phase, docs/paper.md "Baselines")."""

    method: str = "clo"  # clo, sft or dpo
    beta: float = 0.1  # β of the DPO-style terms
    lam: float = 0.5  # λ, the weight of the NLL term
    directions: str = "mean"  # the two preference directions: mean or sum
    sft_on: str = "target"  # sft only: target, english or both

    @property
    def sequences(self) -> tuple[int, ...]:
        """Which of each example's four sequences this objective scores."""
        return SFT_SEQUENCES[self.sft_on] if self.method == "sft" else (0, 1, 2, 3)

    @property
    def needs_reference(self) -> bool:
        return self.method != "sft"

    def loss(self, logps: torch.Tensor, n_tokens: torch.Tensor, ref_rows: torch.Tensor | None):
        """(loss, metrics) from the scored sequences: logps, n_tokens [len(sequences) * B] in
        flat_sequences order; ref_rows [B, 4] (None for sft)."""
        if self.method == "sft":
            nll = token_mean_nll(logps, n_tokens)
            return nll, {"loss": nll.detach(), "nll": nll.detach()}
        logps, n_tokens = logps.view(4, -1), n_tokens.view(4, -1)
        policy, reference = FourWay(*logps), FourWay(*ref_rows.to(logps.device).T)
        nll = token_mean_nll(logps[2], n_tokens[2])  # NLL(y_t | x_t): target-language responses only
        if self.method == "clo":
            return clo_loss(policy, reference, nll, beta=self.beta, lam=self.lam, directions=self.directions)
        return dpo_only_loss(policy, reference, beta=self.beta, directions=self.directions, nll=nll.detach())


def batch_loss(model, batch, ref_rows, objective: Objective, batching: Batching):
    """(loss, metrics) of one micro-batch: `batch` a list of EncodedExample, ref_rows [B, 4] or None."""
    logps, n_tokens = batching.logps(model, flat_sequences(batch, objective.sequences))
    return objective.loss(logps, n_tokens, ref_rows)


def optimizer_step(model, optimizer, trainable, micro_batches, lr: float, objective: Objective, batching: Batching,
                   precision: Precision, grad_clip: float):
    """One update over [(examples, reference rows), ...] micro-batches; grad_clip 0 is off.
    -> (mean metrics incl. grad_norm, tokens)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    device = model.embed_tokens.weight.device
    n_tok, parts = 0, []
    for batch, ref_rows in micro_batches:
        with precision.compute(device):
            loss, metrics = batch_loss(model, batch, ref_rows, objective, batching)
        (loss / len(micro_batches)).backward()
        n_tok += count_tokens(batch, objective.sequences)
        parts.append(metrics)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    row = {k: sum(float(m[k]) for m in parts) / len(parts) for k in parts[0]}  # the one host sync per step
    return {**row, "grad_norm": float(grad_norm)}, n_tok
