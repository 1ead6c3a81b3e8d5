"""The losses of CLO as pure functions over hidden states and per-sequence log-probs (docs/paper.md "Loss").

    L_CLO = λ · L_SFT + (1 − λ) · L_CL,  λ = 0.5
    L_SFT = −(1/|tokens|) Σ log π(y_t | x_t)                  (token mean, target responses only)
    L_CL  = ½ [ DPO(x_en: y_en ≻ y_t) + DPO(x_t: y_t ≻ y_en) ]   ("sum" drops the ½)
    DPO(x: y_w ≻ y_l) = −log σ(β [(log π(y_w|x) − log π_ref(y_w|x))
                                   − (log π(y_l|x) − log π_ref(y_l|x))])

log π(y|x) is the sum of response-token log-probs (Rafailov et al. 2023, Eq. 7), from `response_logps`.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from clo.errors import CloError

IGNORE_INDEX = -100


def head_logits(h_c: Tensor, weight: Tensor, acc: torch.dtype) -> Tensor:
    """[c, D] @ [D, V] -> [c, V] logits in `acc` (fp32) for the softmax.

    bf16/fp16 inputs on CUDA: one matmul with fp32 output (cuBLAS accumulates in fp32 anyway), so
    the logits are never rounded to bf16 — a rounding of ~0.1 at logit 20 that would otherwise enter
    every log-prob. Elsewhere: the matmul in the inputs' dtype, then upcast. Autocast is off so that
    forward and the backward's recompute compute the logits identically.
    """
    with torch.autocast(h_c.device.type, enabled=False):
        if h_c.is_cuda and acc == torch.float32 and h_c.dtype in (torch.bfloat16, torch.float16):
            return torch.mm(h_c, weight.T, out_dtype=acc)
        return (h_c @ weight.T).to(acc)


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h @ Wᵀ)[target] for N positions, one chunk of positions at a time.

    Memory: forward keeps only h [N, D], W [V, D], targets [N] and the per-position logsumexp [N];
    each chunk's [chunk, V] logits are dropped as soon as the chunk is done. Backward recomputes them
    chunk by chunk (∂/∂logits = onehot(target) − softmax), so it too never holds more than one
    chunk of fp32 logits. Autograd would instead keep every chunk's logits alive for backward,
    i.e. the whole [N, V] — which is why this is a Function and not a loop of ordinary ops.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        token_logps = torch.empty(h.shape[0], dtype=acc, device=h.device)
        lse = torch.empty_like(token_logps)
        for s in range(0, h.shape[0], chunk_size):
            logits = head_logits(h[s : s + chunk_size], weight, acc)  # [c, V]
            lse[s : s + chunk_size] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[s : s + chunk_size, None]).squeeze(1)
            token_logps[s : s + chunk_size] = picked - lse[s : s + chunk_size]
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return token_logps

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if need_h else None
        # Accumulate the head's gradient over chunks in fp32: summing bf16 partials loses bits.
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        for s in range(0, h.shape[0], ctx.chunk_size):
            h_c, g = h[s : s + ctx.chunk_size], grad_out[s : s + ctx.chunk_size, None]
            logits = head_logits(h_c, weight, lse.dtype)
            dlogits = logits.sub_(lse[s : s + ctx.chunk_size, None]).exp_().mul_(-g)  # −g·softmax
            dlogits.scatter_add_(1, targets[s : s + ctx.chunk_size, None], g)  # +g·onehot
            dlogits = dlogits.to(h.dtype)
            if need_h:
                grad_h[s : s + ctx.chunk_size] = dlogits @ weight
            if need_w:
                grad_w += dlogits.T @ h_c
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None


def response_logps(
    hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Σ_t log π(labels[b, t] | prefix) over response tokens, without ever building [B, T, V] logits.

    hidden: [B, T, D] final-norm decoder output, any float dtype (bf16 is fine).
    lm_head_weight: [V, D] output head (tied or not; may be trainable or frozen).
    labels: [B, T] long, already shifted: labels[b, t] is the token predicted from hidden[b, t];
        IGNORE_INDEX (-100) at prompt, padding and last positions.
    Returns (logp_sum [B] float32 — float64 for float64 inputs —, n_tokens [B] long).

    Only the N response positions are gathered ([N, D]); logits are computed, upcast and reduced
    `chunk_size` positions at a time (see `_ChunkedTokenLogps`), so peak extra memory is one
    [chunk_size, V] fp32 block in forward and in backward. Gradients reach hidden and, when it
    requires grad, lm_head_weight; a frozen head costs no gradient matmul.
    """
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    token_logps = token_logps_at(hidden, lm_head_weight, rows, cols, labels[rows, cols], chunk_size)
    logp_sum = token_logps.new_zeros(labels.shape[0]).index_add(0, rows, token_logps)
    return logp_sum, (labels != IGNORE_INDEX).sum(dim=1)


def token_logps_at(hidden: Tensor, lm_head_weight: Tensor, rows: Tensor, cols: Tensor, targets: Tensor, chunk_size: int = 1024) -> Tensor:
    """log π(targets[m] | the prefix up to hidden[rows[m], cols[m]]) for m in [M]: [M] float32, chunked
    as in `response_logps`. A position may be read more than once (a packed prompt's last position
    predicts the first token of each of its answers, clo/train/packing.py)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedTokenLogps.apply(hidden[rows, cols], lm_head_weight, targets, chunk_size)


def token_mean_nll(logp_sum: Tensor, n_tokens: Tensor, total_tokens: int | None = None) -> Tensor:
    """−Σ_b logp_sum[b] / Σ_b n_tokens[b]: the mean NLL per response token of the batch (scalar).

    logp_sum: [B], n_tokens: [B]. A batch with no response tokens gives 0, not NaN. total_tokens:
    the denominator when these rows are one process's share of a larger batch (the shares' terms
    then add up to the whole batch's mean, clo/train/distributed.py).
    """
    if total_tokens is not None:
        return -logp_sum.sum() / max(total_tokens, 1)
    return -logp_sum.sum() / n_tokens.sum().clamp(min=1).to(logp_sum.dtype)


def sft_loss(logp_sum: Tensor, n_tokens: Tensor) -> Tensor:
    """L_SFT: token-mean NLL of y_t | x_t (docs/paper.md "Loss"); the `--method sft` baseline's whole loss."""
    return token_mean_nll(logp_sum, n_tokens)


def dpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023, Eq. 7), per example. All inputs: [B] sequence log-probs.

    losses = −log σ(β [(π_c − ref_c) − (π_r − ref_r)]); rewards r = β (π − ref), detached.
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]).
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(beta * margin)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


class FourWay(NamedTuple):
    """Sequence log-probs [B] of the four (prompt, response) pairs of each example."""

    en_en: Tensor  # log π(y_en | x_en)
    en_t: Tensor  # log π(y_t | x_en)
    t_t: Tensor  # log π(y_t | x_t)
    t_en: Tensor  # log π(y_en | x_t)


def _cross_lingual_loss(
    policy: FourWay, reference: FourWay, beta: float, directions: str, examples: int | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_CL and its per-direction metrics: x_en prefers y_en over y_t, x_t prefers y_t over y_en.
    examples: the divisor of the per-example mean when these are one process's share of a batch."""
    if directions not in ("mean", "sum"):
        raise CloError(f"directions: must be 'mean' or 'sum', got {directions!r}")
    metrics, total = {}, 0.0
    for name, (chosen, rejected) in {"en": ("en_en", "en_t"), "t": ("t_t", "t_en")}.items():
        losses, r_c, r_r = dpo_loss(
            getattr(policy, chosen), getattr(policy, rejected),
            getattr(reference, chosen), getattr(reference, rejected), beta,
        )  # fmt: skip
        total = total + (losses.mean() if examples is None else losses.sum() / examples)
        metrics[f"{name}/chosen_reward"] = r_c.mean()
        metrics[f"{name}/rejected_reward"] = r_r.mean()
        metrics[f"{name}/margin"] = (r_c - r_r).mean()
        metrics[f"{name}/accuracy"] = (r_c > r_r).float().mean()
    cl_loss = total / 2 if directions == "mean" else total
    metrics["cl_loss"] = cl_loss.detach()
    metrics["margin"] = (metrics["en/margin"] + metrics["t/margin"]) / 2
    metrics["accuracy"] = (metrics["en/accuracy"] + metrics["t/accuracy"]) / 2
    return cl_loss, metrics


def clo_loss(
    policy: FourWay,
    reference: FourWay,
    nll: Tensor,
    beta: float = 0.1,
    lam: float = 0.5,
    directions: str = "mean",
    examples: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_CLO = λ · nll + (1 − λ) · L_CL (docs/paper.md "Loss"; λ = 0.5, β = 0.1).

    policy, reference: FourWay of [B] sequence log-probs (reference from the frozen starting model).
    nll: scalar L_SFT, `token_mean_nll` of the policy's y_t | x_t (the same forward as policy.t_t).
    directions: "mean" averages the two DPO directions, "sum" adds them.
    examples: with N processes, the whole batch's example count (this process holds a share of it).
    Returns (loss scalar, metrics): 0-d detached tensors (no host sync) named loss, nll, cl_loss,
    margin, accuracy and {en,t}/{chosen_reward, rejected_reward, margin, accuracy}; accuracy is the
    fraction of examples whose chosen reward beats the rejected one.
    """
    if not 0.0 <= lam <= 1.0:
        raise CloError(f"lam: must be in [0, 1], got {lam}")
    cl_loss, metrics = _cross_lingual_loss(policy, reference, beta, directions, examples)
    loss = lam * nll + (1 - lam) * cl_loss
    return loss, {"loss": loss.detach(), "nll": nll.detach(), **metrics}


def dpo_only_loss(
    policy: FourWay,
    reference: FourWay,
    beta: float = 0.1,
    directions: str = "mean",
    nll: Tensor | None = None,
    examples: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`--method dpo`: L_CL alone (DPO on the cross-lingual pairs, both directions), no NLL term.

    Same arguments and metrics as `clo_loss`; `nll`, if given, is only reported ("nll" is absent
    from the metrics otherwise) and never reaches the gradient.
    """
    cl_loss, metrics = _cross_lingual_loss(policy, reference, beta, directions, examples)
    extra = {} if nll is None else {"nll": nll.detach()}
    return cl_loss, {"loss": cl_loss.detach(), **extra, **metrics}

