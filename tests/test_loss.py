"""clo.train.loss against hand-derived numbers and a naive full-vocabulary log_softmax oracle."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from clo.errors import CloError
from clo.train.loss import IGNORE_INDEX, FourWay, clo_loss, dpo_loss, dpo_only_loss, response_logps, sft_loss, token_mean_nll

LOG_2 = math.log(2.0)


# ---------------------------------------------------------------- response_logps


def naive_response_logps(hidden, weight, labels):
    """The obvious way: full [B, T, V] logits, fp32/fp64 log_softmax, gather, masked sum."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logp = F.log_softmax((hidden @ weight.T).to(acc), dim=-1)
    mask = labels != IGNORE_INDEX
    picked = logp.gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
    return (picked * mask).sum(1), mask.sum(1)


def make_case(B=3, T=7, D=5, V=11, dtype=torch.float32, empty_row=True):
    hidden = torch.randn(B, T, D, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, D, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[:, :2] = IGNORE_INDEX  # a prompt
    labels[0, -1] = IGNORE_INDEX  # padding
    if empty_row:
        labels[1] = IGNORE_INDEX  # a row with no response tokens at all
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1024])  # N = 5 + 0 + 5 = 10 → 4 and 7 do not divide it
def test_response_logps_matches_naive_values_and_grads(dtype, chunk_size):
    hidden, weight, labels = make_case(dtype=dtype)
    got, n = response_logps(hidden, weight, labels, chunk_size=chunk_size)
    want, n_want = naive_response_logps(hidden, weight, labels)
    assert got.dtype == dtype and n.tolist() == n_want.tolist() == [4, 0, 5]
    assert got[1].item() == 0.0
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, **tol)

    upstream = torch.randn(3, dtype=dtype)  # a non-uniform upstream gradient
    g_h, g_w = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    w_h, w_w = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(g_h, w_h, **tol)
    torch.testing.assert_close(g_w, w_w, **tol)
    assert g_h[1].abs().sum() == 0  # the empty row gets no gradient


def test_response_logps_gradcheck_float64():
    hidden, weight, labels = make_case(B=2, T=4, D=3, V=5, dtype=torch.float64)
    def f(h, w):
        return response_logps(h, w, labels, chunk_size=3)[0]

    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_response_logps_frozen_head_gets_no_grad():
    """N = 9 positions in chunks of 4 → 3 chunks; backward does recompute + d/dhidden = 2 matmuls
    per chunk, plus 1 more (d/dweight) only when the head is trainable."""
    hidden, weight, labels = make_case()
    got, _ = response_logps(hidden, weight.detach(), labels, chunk_size=4)
    with OpProbe() as frozen:
        got.sum().backward()
    assert frozen.matmuls == 3 * 2
    hidden_grad_frozen, hidden.grad = hidden.grad, None
    got, _ = response_logps(hidden, weight, labels, chunk_size=4)
    with OpProbe() as trainable:
        got.sum().backward()
    assert trainable.matmuls == 3 * 3
    (g_h,) = torch.autograd.grad(naive_response_logps(hidden, weight, labels)[0].sum(), hidden)
    torch.testing.assert_close(hidden_grad_frozen, g_h)
    torch.testing.assert_close(hidden.grad, g_h)


def test_response_logps_bf16_close_to_fp32_oracle():
    """bf16 hidden/head: the result is fp32 and close to the naive fp32 log_softmax of bf16 logits."""
    hidden, weight, labels = make_case(B=2, T=16, D=32, V=64, empty_row=False)
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    got, _ = response_logps(h16, w16, labels, chunk_size=5)
    want, _ = naive_response_logps(h16, w16, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0.1)
    got.sum().backward()
    assert h16.grad.dtype == w16.grad.dtype == torch.bfloat16
    g_h, g_w = torch.autograd.grad(naive_response_logps(hidden, weight, labels)[0].sum(), (hidden, weight))
    torch.testing.assert_close(h16.grad.float(), g_h, rtol=0.05, atol=0.05)
    torch.testing.assert_close(w16.grad.float(), g_w, rtol=0.05, atol=0.05)


def test_response_logps_ignores_ambient_autocast():
    """Under autocast the matmul would run in bf16 in forward but not in backward's recompute;
    the function runs in its inputs' dtype, so fp32 inputs give the fp32 answer either way."""
    hidden, weight, labels = make_case()
    want, _ = response_logps(hidden, weight, labels, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = response_logps(hidden, weight, labels, chunk_size=4)
    assert torch.equal(got, want)


class OpProbe(TorchDispatchMode):
    """Records the largest numel among all tensors produced by any op, and counts matmuls."""

    def __init__(self):
        super().__init__()
        self.largest, self.matmuls = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.matmuls += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_response_logps_never_builds_more_than_one_chunk_of_logits():
    """B·T·V = 4·64·512 = 131072 elements if materialised; one chunk is 16·512 = 8192 (V·D = 4096)."""
    hidden = torch.randn(4, 64, 8, requires_grad=True)
    weight = torch.randn(512, 8, requires_grad=True)
    labels = torch.randint(0, 512, (4, 64))
    with OpProbe() as mode:
        logp_sum, _ = response_logps(hidden, weight, labels, chunk_size=16)
        logp_sum.sum().backward()
    assert mode.largest == 16 * 512
    with OpProbe() as naive:
        naive_response_logps(hidden, weight, labels)[0].sum().backward()
    assert naive.largest == 4 * 64 * 512  # the probe does see a full [B, T, V]


# ---------------------------------------------------------------- DPO / CLO arithmetic


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_dpo_loss_hand_numbers():
    """β = 0.1; policy chosen −10, rejected −12; reference both −11.

    margin = (−10 − (−11)) − (−12 − (−11)) = 1 − (−1) = 2; loss = −log σ(0.1·2) = log(1 + e^−0.2)
    = log(1.8187307531) = 0.5981388693. Rewards: chosen 0.1·1 = 0.1, rejected 0.1·(−1) = −0.1.
    """
    losses, r_c, r_r = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    assert losses.item() == pytest.approx(0.5981388693, abs=1e-9)
    assert (r_c.item(), r_r.item()) == pytest.approx((0.1, -0.1))
    assert not r_c.requires_grad


def four(en_en, en_t, t_t, t_en):
    return FourWay(t(*en_en), t(*en_t), t(*t_t), t(*t_en))


def test_clo_loss_hand_numbers_mean_and_sum():
    """One example, β = 0.1, λ = 0.5, nll = 1.5. Reference: all four log-probs −11.

    en direction: π(y_en|x_en) = −10, π(y_t|x_en) = −12 → margin 2, loss log(1 + e^−0.2) = 0.5981388693.
    t  direction: π(y_t|x_t) = −11.5, π(y_en|x_t) = −10.5 → margin −1, loss log(1 + e^0.1)
        = log(2.1051709181) = 0.7443966600.
    mean: L_CL = (0.5981388693 + 0.7443966600)/2 = 0.6712677647; L = 0.75 + 0.5·0.6712677647 = 1.0856338823.
    sum:  L_CL = 1.3425355293;                                    L = 0.75 + 0.5·1.3425355293 = 1.4212677647.
    Rewards: en chosen 0.1, rejected −0.1, margin 0.2, accuracy 1;
             t chosen −0.05, rejected 0.05, margin −0.1, accuracy 0; overall margin 0.05, accuracy 0.5.
    """
    policy, ref = four([-10.0], [-12.0], [-11.5], [-10.5]), four([-11.0], [-11.0], [-11.0], [-11.0])
    loss, m = clo_loss(policy, ref, torch.tensor(1.5, dtype=torch.float64))
    assert loss.item() == pytest.approx(1.0856338823, abs=1e-9)
    assert m["cl_loss"].item() == pytest.approx(0.6712677647, abs=1e-9)
    assert m["loss"].item() == loss.item() and m["nll"].item() == 1.5
    want = {"en/chosen_reward": 0.1, "en/rejected_reward": -0.1, "en/margin": 0.2, "en/accuracy": 1.0,
            "t/chosen_reward": -0.05, "t/rejected_reward": 0.05, "t/margin": -0.1, "t/accuracy": 0.0,
            "margin": 0.05, "accuracy": 0.5}  # fmt: skip
    assert {k: m[k].item() for k in want} == pytest.approx(want)
    loss_sum, m_sum = clo_loss(policy, ref, torch.tensor(1.5, dtype=torch.float64), directions="sum")
    assert loss_sum.item() == pytest.approx(1.4212677647, abs=1e-9)
    assert m_sum["cl_loss"].item() == pytest.approx(1.3425355293, abs=1e-9)


@pytest.mark.parametrize("directions, n_terms", [("mean", 1), ("sum", 2)])
def test_clo_loss_at_step_zero_is_lambda_nll_plus_log2(directions, n_terms):
    """policy == reference: every reward is 0, each DPO term is −log σ(0) = log 2."""
    logps = four([-3.0, -7.0], [-4.0, -9.0], [-5.0, -2.0], [-6.0, -8.0])
    nll = torch.tensor(2.25, dtype=torch.float64)
    loss, m = clo_loss(logps, logps, nll, beta=0.1, lam=0.5, directions=directions)
    assert loss.item() == pytest.approx(0.5 * 2.25 + 0.5 * n_terms * LOG_2, rel=1e-15)
    assert all(m[f"{d}/{r}_reward"].item() == 0.0 for d in ("en", "t") for r in ("chosen", "rejected"))
    assert m["accuracy"].item() == 0.0  # a tie is not a win


def test_gradient_signs_and_value_at_step_zero():
    """d/dπ_c of −log σ(β z) = −β σ(−β z); at z = 0 that is −β/2 = −0.05 per direction.

    With "mean" and λ = 0.5, one example: dL/dπ(y_en|x_en) = (1 − λ) · ½ · (−0.05) = −0.0125; the
    rejected log-prob gets +0.0125. Raising a chosen log-prob lowers the loss.
    """
    leaves = [t(-5.0).requires_grad_() for _ in range(4)]
    policy = FourWay(*leaves)
    reference = four([-5.0], [-5.0], [-5.0], [-5.0])
    loss, _ = clo_loss(policy, reference, torch.tensor(0.0, dtype=torch.float64))
    loss.backward()
    assert [x.grad.item() for x in leaves] == pytest.approx([-0.0125, 0.0125, -0.0125, 0.0125])
    bumped = FourWay(t(-4.0), t(-5.0), t(-5.0), t(-5.0))  # chosen en_en up by 1
    assert clo_loss(bumped, reference, torch.tensor(0.0))[0] < loss


def test_token_mean_nll_and_sft_loss():
    """Sums −3 over 2 tokens and −5 over 3 tokens: (3 + 5)/(2 + 3) = 1.6, not the mean of 1.5 and 5/3."""
    logp_sum, n = torch.tensor([-3.0, -5.0]), torch.tensor([2, 3])
    assert token_mean_nll(logp_sum, n).item() == pytest.approx(1.6)
    assert sft_loss(logp_sum, n).item() == pytest.approx(1.6)
    assert token_mean_nll(torch.zeros(2), torch.zeros(2, dtype=torch.long)).item() == 0.0


def test_dpo_only_equals_clo_with_lambda_zero_and_ignores_nll():
    policy = four([-10.0, -3.0], [-12.0, -4.0], [-11.5, -6.0], [-10.5, -2.0])
    ref = four(*[[-11.0, -4.0]] * 4)
    policy.t_t.requires_grad_()
    nll = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    loss, m = dpo_only_loss(policy, ref, beta=0.1, nll=nll)
    loss0, m0 = clo_loss(policy, ref, nll, beta=0.1, lam=0.0)
    assert loss.item() == pytest.approx(loss0.item()) and m.keys() == m0.keys()
    assert m["nll"].item() == 3.0
    assert torch.autograd.grad(loss, nll, allow_unused=True)[0] is None
    assert "nll" not in dpo_only_loss(policy, ref)[1]


def test_bad_flags_raise_clo_error():
    logps = four([-1.0], [-1.0], [-1.0], [-1.0])
    with pytest.raises(CloError, match="directions"):
        clo_loss(logps, logps, torch.tensor(0.0), directions="max")
    with pytest.raises(CloError, match="lam"):
        clo_loss(logps, logps, torch.tensor(0.0), lam=1.5)
