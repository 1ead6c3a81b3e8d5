"""A Llama-family decoder in one file: Llama-2/3, Mistral, Qwen-2.5 and SmolLM2.

    tokens [B, T]
      -> embed_tokens                              [B, T, D]
      -> n_layers x ( x + Attention(RMSNorm(x))    grouped-query, RoPE, causal
                      x + SwiGLU(RMSNorm(x)) )
      -> norm                                      `hidden()` stops here (training needs it)
      -> lm_head                                   [B, T, V]  `forward()`

Module names are the Hugging Face ones (`layers.3.self_attn.q_proj`), so a checkpoint key is the
module path with a `model.` prefix, LoRA and freezing can select by name, and RoPE uses HF's
rotate-half layout so HF weights load without permuting q/k.

Training calls `hidden(tokens)` with no mask: right-padded sequences under a causal mask never let a
real token see padding, and SDPA takes its flash kernel. Generation passes positions, a KV cache
and a boolean mask (see clo/model/generate.py), which is how left-padded batches work. Packed rows
(clo/train/packing.py) pass positions and one of three forms of their rule (`attend`): a boolean
mask (SDPA over each row), a `Gathered` plan (SDPA per sequence) or a FlexAttention BlockMask.
"""

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from clo.model.config import ModelConfig
from clo.model.gathered_attention import Gathered, attend_gathered

# The linear layers of a block by group (HF names): what `--stages` groups and LoRA targets refer to.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 and scale in the input dtype, as HF does, so bf16 results agree
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with Llama-3.1's frequency-dependent scaling when set."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.float()
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen) - lo) / (hi - lo)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, interpolated)
    scaled = torch.where(wavelen < old_len / hi, inv_freq, scaled)
    return scaled.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [B or 1, 1, T, head_dim] for integer `positions` [B or 1, T]."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention_mask(q_slots: torch.Tensor, key_valid: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, T, S]: query at slot q_slots[t] may see key slot s (True) or not.

    q_slots [T] are the queries' slots in the sequence or KV cache; key_valid [B, S] is False for
    padding and for cache slots not written yet. Causal, and within `window` slots when sliding.
    """
    k_slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    rel = q_slots[:, None] - k_slots[None, :]  # [T, S] how far back each key is
    allowed = rel >= 0
    if window is not None:
        allowed = allowed & (rel < window)
    # a padding query sees only itself: a row with no visible key would make SDPA return NaN
    return ((allowed[None] & key_valid[:, None, :]) | (rel == 0)[None])[:, None]


class KVCache(nn.Module):
    """Static per-layer cache [B, n_kv_heads, max_len, head_dim]; static shapes keep compiled decode graphs few."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, cache_pos, k)
        self.v.index_copy_(2, cache_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.dim, bias=cfg.o_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask=None, cache_pos=None):
        """x [B, T, D]; cos/sin [B, 1, T, hd]; mask [B, 1, T, S] bool (True = may attend) or None for causal."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)
        y = attend(q, k, v, mask, gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


_compiled_flex = None
_eager = {}


def eager(fn):
    """fn itself, or while torch.compile traces, `torch.compiler.disable(fn)`: the graph breaks around it.
    Made when a trace first needs it, not as a decorator, which would load torch._dynamo at import:
    ~2 s of every command's start on 2 CPU cores (tests/test_layout.py)."""
    if not torch.compiler.is_compiling():
        return fn
    if fn not in _eager:
        _eager[fn] = torch.compiler.disable(fn)
    return _eager[fn]


# inductor's fused CPU kernel for flex_attention gave wrong values and NaN on an AVX2-only CPU (torch 2.13) at
# head dim 8 (every row length tried, 8..120) and 16 (6 of 17 lengths), none at 32 and 64 (8..200 tokens)
SMALLEST_FUSED_CPU_HEAD_DIM = 32


def flex_attention_unfused(q, k, v, mask: BlockMask, gqa: bool) -> torch.Tensor:
    with warnings.catch_warnings():  # its advice (compile it) is what this path avoids
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)


def attend(q, k, v, mask, gqa: bool) -> torch.Tensor:
    """softmax(q kᵀ / √hd) v over the keys `mask` allows: q [B, H, T, hd], k, v [B, KV, S, hd] -> [B, H, T, hd].
    mask: None (causal), a bool tensor [B, 1, T, S] (SDPA), a `Gathered` plan of packed rows (SDPA per
    sequence), or a FlexAttention BlockMask: its fused kernel needs torch.compile (uncompiled,
    flex_attention computes every score as a dense mask would), so it is compiled here once, unless
    the block around it is being compiled already; on CPU with head dims below 32 it runs uncompiled."""
    if isinstance(mask, Gathered):  # a compiled block breaks its graph here: the calls change with every batch
        return eager(attend_gathered)(q, k, v, mask, gqa)
    if not isinstance(mask, BlockMask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
    dtype = v.dtype  # under autocast q and k leave RoPE in fp32 while v is bf16; SDPA's autocast casts all three alike
    q, k = q.to(dtype), k.to(dtype)
    if not q.is_cuda and q.shape[-1] < SMALLEST_FUSED_CPU_HEAD_DIM:
        return eager(flex_attention_unfused)(q, k, v, mask, gqa)  # a compiled block would lower it to that kernel
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    global _compiled_flex
    if _compiled_flex is None:
        # CUDA: dynamic shapes after the first recompile (rows and lengths vary by batch). CPU: one graph
        # per shape, as inductor's CPU template for dynamic flex attention does not compile (torch 2.13)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_flex = torch.compile(flex_attention, dynamic=None if q.is_cuda else False)
    return _compiled_flex(q, k, v, block_mask=mask, enable_gqa=gqa)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        # Activation checkpointing: when training, keep only each block's input and recompute the
        # block in backward (~1/3 more compute, activation memory ~1 tensor per layer instead of ~15).
        self.checkpoint_activations = False

    def hidden(self, tokens, positions=None, mask=None, cache_pos=None) -> torch.Tensor:
        """Final-norm hidden states [B, T, D] for tokens [B, T].

        positions [B, T]: RoPE positions (default 0..T-1). mask [B, 1, T, S] bool: needed with a KV cache
        or padding on the left; None means plain causal attention over these T tokens; a BlockMask
        (packed rows, `attend`) runs FlexAttention.
        cache_pos [T]: the cache slots these tokens are written to (only with `setup_cache`).
        """
        T = tokens.shape[1]
        if positions is None:
            positions = torch.arange(T, device=tokens.device)[None]
        window = self.cfg.sliding_window
        if mask is None and window is not None and T > window:
            slots = torch.arange(T, device=tokens.device)
            mask = attention_mask(slots, torch.ones(1, T, dtype=torch.bool, device=tokens.device), window)
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        checkpoint = self.checkpoint_activations and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache_pos)
        return self.norm(x)

    def forward(self, tokens, positions=None, mask=None, cache_pos=None, head=None) -> torch.Tensor:
        """Logits [B, T, V] in the model's dtype; or, with `head`, head(hidden [B, T, D], output weight [V, D]).

        `head` lets training apply its own output projection (a chunked fp32 log-prob that never
        builds [B, T, V], clo/train/loss.py) inside this forward, where a sharded model
        (clo/train/distributed.py) has its weights gathered.
        """
        hidden = self.hidden(tokens, positions, mask, cache_pos)
        return self.lm_head(hidden) if head is None else head(hidden, self.lm_head.weight)

    def setup_cache(self, batch: int, max_len: int) -> None:
        """Give every layer a KV cache [batch, n_kv_heads, max_len, head_dim]; one of that shape already there is kept.

        Kept caches are not zeroed: slots not written by the current call are masked out. Keeping
        them keeps their addresses, which a compiled (CUDA-graph) decode step depends on.
        """
        p = self.embed_tokens.weight
        for layer in self.layers:
            a = layer.self_attn
            c = a.kv_cache
            if c is not None and c.k.shape == (batch, a.n_kv_heads, max_len, a.head_dim) and c.k.dtype == p.dtype and c.k.device == p.device:
                continue
            a.kv_cache = KVCache(batch, a.n_kv_heads, max_len, a.head_dim, p.dtype, p.device)
            torch._dynamo.mark_static_address(a.kv_cache.k)  # updated in place inside a CUDA graph
            torch._dynamo.mark_static_address(a.kv_cache.v)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
