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
from clo.train.distributed import full_tensor
from clo.train.loss import FourWay, clo_loss, dpo_only_loss, token_mean_nll
from clo.train.precision import Precision
from clo.train.scoring import Batching
from clo.world import World

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

    def loss(self, logps: torch.Tensor, n_tokens: torch.Tensor, ref_rows: torch.Tensor | None, whole=None):
        """(loss, metrics) from the scored sequences: logps, n_tokens [len(sequences) * B] in
        flat_sequences order; ref_rows [B, 4] (None for sft). whole: the batch these B examples are
        a share of (N processes): its counts are the denominators, so the shares' losses add up to its loss."""
        tokens, examples = (None, None) if whole is None else (self.nll_tokens(whole), len(whole))
        if self.method == "sft":
            nll = token_mean_nll(logps, n_tokens, tokens)
            return nll, {"loss": nll.detach(), "nll": nll.detach()}
        logps, n_tokens = logps.view(4, -1), n_tokens.view(4, -1)
        policy, reference = FourWay(*logps), FourWay(*ref_rows.to(logps.device).T)
        nll = token_mean_nll(logps[2], n_tokens[2], tokens)  # NLL(y_t | x_t): target-language responses only
        if self.method == "clo":
            return clo_loss(policy, reference, nll, beta=self.beta, lam=self.lam, directions=self.directions, examples=examples)
        return dpo_only_loss(policy, reference, beta=self.beta, directions=self.directions, nll=nll.detach(), examples=examples)

    def nll_tokens(self, batch) -> int:
        """Response tokens under the NLL term in `batch`: the sft sequences, or y_t | x_t."""
        which = self.sequences if self.method == "sft" else (2,)
        return sum(len(ex.sequences[k][1]) for k in which for ex in batch)


def batch_loss(model, batch, ref_rows, objective: Objective, batching: Batching):
    """(loss, metrics) of one micro-batch: `batch` a list of EncodedExample, ref_rows [B, 4] or None."""
    logps, n_tokens = batching.logps(model, flat_sequences(batch, objective.sequences))
    return objective.loss(logps, n_tokens, ref_rows)


def scored_backward(model, batch, ref_rows, objective: Objective, batching: Batching, precision: Precision, step_examples: list):
    """One process: backward of one micro-batch's share of the step's loss. -> (logps, n_tokens) [S, B], detached.

    Its loss is divided by the whole step's counts (`step_examples`: every micro-batch's examples), so the
    micro-batches' gradients add up to the gradient of the step's examples in one micro-batch."""
    with precision.compute(model.embed_tokens.weight.device):
        logps, n_tokens = batching.logps(model, flat_sequences(batch, objective.sequences))
        loss, _ = objective.loss(logps, n_tokens, ref_rows, whole=step_examples)
    loss.backward()
    S = len(objective.sequences)
    return logps.detach().float().view(S, -1), n_tokens.view(S, -1)


def share_backward(model, batch, ref_rows, objective: Objective, batching: Batching, precision: Precision, world: World, step_examples: list):
    """N processes: backward of this process's share of one global micro-batch, its loss divided by the whole
    step's counts (as `scored_backward`). -> the whole micro-batch's (logps, n_tokens) [S, B], gathered.

    Every share is padded to the same number of examples (repeats, weight 0), so that every process
    runs the same forward passes, hence the same collectives; only the real rows reach the loss.
    """
    S, device = len(objective.sequences), model.embed_tokens.weight.device
    k = -(-len(batch) // world.size)
    mine = world.share(list(range(len(batch))))
    padded = (mine + [mine[0] if mine else 0] * k)[:k]
    with precision.compute(device):
        logps, n_tokens = batching.logps(model, flat_sequences([batch[i] for i in padded], objective.sequences))
        logps, n_tokens = logps.view(S, k)[:, : len(mine)], n_tokens.view(S, k)[:, : len(mine)]
        if mine:
            loss, _ = objective.loss(logps.flatten(), n_tokens.flatten(), None if ref_rows is None else ref_rows[mine], whole=step_examples)
        else:
            loss = logps.sum() * 0.0  # an empty share still runs backward: FSDP reduces every gradient
    loss.backward()
    pieces = world.gather_objects((logps.detach().float().cpu(), n_tokens.cpu()))
    return torch.cat([p for p, _ in pieces], dim=1), torch.cat([n for _, n in pieces], dim=1)


def optimizer_step(model, optimizer, trainable, micro_batches, lr: float, objective: Objective, batching: Batching,
                   precision: Precision, grad_clip: float, world: World = World()):
    """One update over [(examples, reference rows), ...] micro-batches; grad_clip 0 is off. With N
    processes each micro-batch is the global one and this process computes its share.

    The step's loss is that of all its examples as one batch (the NLL a mean over all their response
    tokens, the DPO terms over all their examples), whatever the micro-batches and processes, so a short
    last micro-batch weighs by its size. -> (the step's metrics incl. grad_norm, tokens)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_examples = [ex for batch, _ in micro_batches for ex in batch]
    scored = []
    for batch, ref_rows in micro_batches:
        if world.size > 1:
            scored.append(share_backward(model, batch, ref_rows, objective, batching, precision, world, step_examples))
        else:
            scored.append(scored_backward(model, batch, ref_rows, objective, batching, precision, step_examples))
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf")))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # the metrics of the whole step, as one process computes them from every sequence's log-prob
    logps, n_tokens = (torch.cat([part[i].to(scored[0][0].device) for part in scored], dim=1).flatten() for i in (0, 1))
    refs = None if micro_batches[0][1] is None else torch.cat([r for _, r in micro_batches])
    _, metrics = objective.loss(logps, n_tokens, refs)
    row = {k: float(v) for k, v in metrics.items()}  # the one host sync per step
    return {**row, "grad_norm": float(grad_norm)}, count_tokens(step_examples, objective.sequences)
