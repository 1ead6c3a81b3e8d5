"""M2M100, the translation model the paper used (facebook/m2m100_1.2B), written from scratch.

M2M100 (Fan et al., 2020) is a fairseq Transformer encoder-decoder with pre-norm layers:

    encoder:  x = E[src] * sqrt(d) + P(pos)
              repeat N:  x = x + SelfAttn(LN(x));  x = x + FFN(LN(x))
              h = LN(x)
    decoder:  y = E[tgt] * sqrt(d) + P(pos)
              repeat N:  y = y + CausalSelfAttn(LN(y));  y = y + CrossAttn(LN(y), h);  y = y + FFN(LN(y))
              logits = LN(y) @ E^T                      (one embedding E shared by all three)

P is the fixed sinusoidal table of tensor2tensor ([sin | cos] halves), indexed fairseq's way: real
tokens count from pad_id + 1, pad tokens get position pad_id, whose row is zero.

Translation: the source is `[__src__] pieces </s>`; the decoder starts from `</s>` and its first
output is forced to be the target language token `__tgt__`; decoding stops at `</s>`.

Decoding keeps a KV cache (`DecoderCache`): self-attention keys/values grow by one position per step;
cross-attention keys/values are computed once per source sentence and shared by all of its beams
(queries of the beams attend to one copy). Greedy and beam search (clo/translate/search.py) follow
`transformers`' `generate` step for step (same scores, same tie-breaking), so outputs are identical
(tests/test_m2m100.py); beams or sentences that can no longer change are dropped from the batch,
which `generate` does not do.
"""

import math
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clo.errors import CloError
from clo.jsonfile import read_json, shard_names


@dataclass(frozen=True)
class M2M100Config:
    """The architecture, read from the checkpoint's config.json (transformers' field names)."""

    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    activation_function: str = "relu"
    scale_embedding: bool = True
    pad_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    tie_word_embeddings: bool = True

    @classmethod
    def from_folder(cls, folder: str | Path) -> "M2M100Config":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise CloError(f"{folder}: no config.json; not a Hugging Face model folder")
        raw = read_json(path)
        if raw.get("model_type") != "m2m_100":
            raise CloError(f"{path}: field 'model_type' is {raw.get('model_type')!r}; expected 'm2m_100' (M2M100 or NLLB)")
        values = {}
        for f in fields(cls):
            if f.name in raw and raw[f.name] is not None:
                values[f.name] = raw[f.name]
            elif f.default is MISSING:
                raise CloError(f"{path}: field {f.name!r} is missing")
        config = cls(**values)
        for field in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            if not isinstance(getattr(config, field), int):
                raise CloError(f"{path}: field {field!r} is {getattr(config, field)!r}; one token id expected")
        if config.activation_function not in ACTIVATIONS:
            raise CloError(f"{path}: field 'activation_function' is {config.activation_function!r}; supported: {list(ACTIVATIONS)}")
        for side in ("encoder", "decoder"):
            if config.d_model % getattr(config, f"{side}_attention_heads"):
                raise CloError(f"{path}: d_model {config.d_model} is not divisible by {side}_attention_heads")
        return config


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def make_positions(ids: Tensor, pad_id: int, past: int = 0) -> Tensor:
    """Fairseq positions of `ids` [B, T] that follow `past` earlier tokens: pad_id + 1 + index for
    real tokens, pad_id for pad tokens (pads do not advance the count within `ids`)."""
    real = ids.ne(pad_id).long()
    return (torch.cumsum(real, dim=1) + past) * real + pad_id


def sinusoidal_embedding(positions: Tensor, dim: int, pad_id: int) -> Tensor:
    """[...] integer positions -> [..., dim] float32: [sin(p * w_i) | cos(p * w_i)],
    w_i = 10000^(-i / (dim/2 - 1)); the row of position pad_id is zero."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    inv_freq = torch.exp(torch.arange(half, device=positions.device).float() * -step)
    angles = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.masked_fill(positions.eq(pad_id).unsqueeze(-1), 0.0)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (with biases), scale 1/sqrt(head_dim)."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, x: Tensor) -> Tensor:
        """[B, T, D] -> [B, H, T, D/H]"""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[B, S, D] -> keys, values [B, H, S, D/H]"""
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
               causal: bool = False, group: int = 1) -> Tensor:
        """Queries from x [B*group, T, D] against k, v [B, H, S, D/H] -> [B*group, T, D].

        `group` > 1: each group of consecutive query rows (the beams of one sentence) shares one
        copy of k/v; their queries are laid side by side as one longer query sequence.
        mask: bool, broadcastable to [B, H, group*T, S], True where attending is allowed.
        """
        rows, T, D = x.shape
        q = self.split_heads(self.q_proj(x))  # [B*group, H, T, hd]
        if group > 1:
            q = q.unflatten(0, (rows // group, group)).transpose(1, 2).flatten(2, 3)  # [B, H, group*T, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        if group > 1:
            out = out.unflatten(2, (group, T)).transpose(1, 2).flatten(0, 1)  # [B*group, H, T, hd]
        return self.out_proj(out.transpose(1, 2).reshape(rows, T, D))


def feed_forward(layer: nn.Module, x: Tensor) -> Tensor:
    return layer.fc2(layer.activation(layer.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: M2M100Config):
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1, self.fc2 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim), nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.activation = ACTIVATIONS[cfg.activation_function]
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [B, S, D], mask [B, 1, 1, S] (True: a real token) -> [B, S, D]"""
        h = self.self_attn_layer_norm(x)
        x = x + self.self_attn.attend(h, *self.self_attn.keys_values(h), mask=mask)
        x = x + feed_forward(self, self.final_layer_norm(x))
        if x.dtype == torch.float16:  # as fairseq/transformers do, keep fp16 activations finite
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x


class DecoderLayer(nn.Module):
    def __init__(self, cfg: M2M100Config):
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.encoder_attn = Attention(cfg.d_model, cfg.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1, self.fc2 = nn.Linear(cfg.d_model, cfg.decoder_ffn_dim), nn.Linear(cfg.decoder_ffn_dim, cfg.d_model)
        self.activation = ACTIVATIONS[cfg.activation_function]
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, y: Tensor, past_k: Tensor | None, past_v: Tensor | None, cross_k: Tensor,
                cross_v: Tensor, cross_mask: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
        """y [N, T, D], the T newest decoder positions; past_k/v [N, H, t, hd] or None (nothing cached);
        cross_k/v [N/group, H, S, hd]. Returns y and the self-attention keys/values of all t + T positions."""
        h = self.self_attn_layer_norm(y)
        k, v = self.self_attn.keys_values(h)
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        causal = past_k is None and y.size(1) > 1  # teacher forcing; one new token sees all the past
        y = y + self.self_attn.attend(h, k, v, causal=causal)
        return self.after_self_attention(y, cross_k, cross_v, cross_mask, group), k, v

    def after_self_attention(self, y: Tensor, cross_k: Tensor, cross_v: Tensor, cross_mask: Tensor, group: int) -> Tensor:
        """The rest of the layer: attention to the source, then the feed-forward block. y [N, T, D] -> [N, T, D]."""
        h = self.encoder_attn_layer_norm(y)
        y = y + self.encoder_attn.attend(h, cross_k, cross_v, mask=cross_mask, group=group)
        return y + feed_forward(self, self.final_layer_norm(y))


class Encoder(nn.Module):
    def __init__(self, cfg: M2M100Config):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model)


class Decoder(nn.Module):
    def __init__(self, cfg: M2M100Config):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model)


@dataclass
class DecoderCache:
    """What decoding keeps between steps. N decoder rows = sources * group (group = beams).

    self_k/self_v: per layer [N, H, t, hd], the decoder's own past; cross_k/cross_v: per layer
    [sources, H, S, hd], the encoder output projected once; cross_mask: [sources, 1, 1, S] bool."""

    self_k: list[Tensor]
    self_v: list[Tensor]
    cross_k: list[Tensor]
    cross_v: list[Tensor]
    cross_mask: Tensor
    group: int
    length: int = 0  # decoder positions already cached

    def select_rows(self, rows: Tensor) -> None:
        """Keep decoder rows `rows` (beam reordering); the sources are unchanged."""
        self.self_k = [k.index_select(0, rows) for k in self.self_k]
        self.self_v = [v.index_select(0, rows) for v in self.self_v]

    def select_sources(self, sources: Tensor) -> None:
        """Keep only these sources (indices into the current ones) and their decoder rows."""
        rows = (sources[:, None] * self.group + torch.arange(self.group, device=sources.device)).flatten()
        self.select_rows(rows)
        self.cross_k = [k.index_select(0, sources) for k in self.cross_k]
        self.cross_v = [v.index_select(0, sources) for v in self.cross_v]
        self.cross_mask = self.cross_mask.index_select(0, sources)


class M2M100(nn.Module):
    """The encoder-decoder. Parameter names are transformers' without the leading "model."."""

    def __init__(self, cfg: M2M100Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0

    def embed(self, ids: Tensor, past: int = 0) -> Tensor:
        """ids [B, T] -> E[ids] * sqrt(d) + P(positions) [B, T, D]"""
        positions = make_positions(ids, self.cfg.pad_token_id, past)
        pos = sinusoidal_embedding(positions, self.cfg.d_model, self.cfg.pad_token_id)
        return self.shared(ids) * self.embed_scale + pos.to(self.shared.weight.dtype)

    def logits(self, h: Tensor) -> Tensor:
        return F.linear(h, self.shared.weight if self.lm_head is None else self.lm_head.weight)

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Tensor:
        """src_ids, src_mask [B, S] (mask 1 for real tokens) -> encoder output [B, S, D]"""
        x = self.embed(src_ids)
        mask = src_mask.bool()[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.encoder.layer_norm(x)

    def start_decoding(self, encoded: Tensor, src_mask: Tensor, group: int = 1) -> DecoderCache:
        """An empty cache for `group` decoder rows per source; cross keys/values computed once here."""
        kv = [layer.encoder_attn.keys_values(encoded) for layer in self.decoder.layers]
        empty = encoded.new_empty(encoded.size(0) * group, 0, 0, 0)
        return DecoderCache(
            self_k=[empty] * len(kv), self_v=[empty] * len(kv),
            cross_k=[k for k, _ in kv], cross_v=[v for _, v in kv],
            cross_mask=src_mask.bool()[:, None, None, :], group=group,
        )

    def decode(self, tgt_ids: Tensor, cache: DecoderCache) -> Tensor:
        """tgt_ids [N, T], the next T decoder tokens of each row -> logits [N, T, V]; extends the cache.

        T > 1 (teacher forcing) needs an empty cache; decoding feeds one token per step."""
        if tgt_ids.size(1) > 1 and cache.length:
            raise ValueError("several new decoder tokens are only supported on an empty cache")
        y = self.embed(tgt_ids, past=cache.length)
        for i, layer in enumerate(self.decoder.layers):
            past_k, past_v = (cache.self_k[i], cache.self_v[i]) if cache.length else (None, None)
            y, cache.self_k[i], cache.self_v[i] = layer(
                y, past_k, past_v, cache.cross_k[i], cache.cross_v[i], cache.cross_mask, cache.group)
        cache.length += tgt_ids.size(1)
        return self.logits(self.decoder.layer_norm(y))

    def forward(self, src_ids: Tensor, src_mask: Tensor, tgt_ids: Tensor) -> Tensor:
        """Teacher-forced logits [B, T, V] for decoder inputs tgt_ids [B, T] (they start with </s>)."""
        cache = self.start_decoding(self.encode(src_ids, src_mask), src_mask)
        return self.decode(tgt_ids, cache)


# ---------------------------------------------------------------------------------------------------
# Loading a checkpoint folder


def read_state_dict(folder: Path) -> dict[str, Tensor]:
    """The weights of an HF folder: model.safetensors, pytorch_model.bin (loaded with
    weights_only=True, never unpickling code), or their sharded *.index.json forms."""
    from safetensors.torch import load_file

    def load_bin(path: Path) -> dict[str, Tensor]:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    for name, load in (("model.safetensors", load_file), ("pytorch_model.bin", load_bin)):
        index = folder / f"{name}.index.json"
        try:
            if (folder / name).is_file():
                return load(folder / name)
            if index.is_file():
                shards = shard_names(index)
                return {k: v for shard in shards for k, v in load(folder / shard).items()}
        except CloError:
            raise
        except Exception as e:  # a corrupt or truncated file: say which
            raise CloError(f"{folder / name}: cannot read weights ({type(e).__name__}: {e})") from None
    raise CloError(f"{folder}: no model.safetensors or pytorch_model.bin")


def load_m2m100(folder: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> M2M100:
    """The M2M100 (or NLLB-200 dense) model in an HF folder, in eval mode on `device` in `dtype`."""
    folder = Path(folder)
    cfg = M2M100Config.from_folder(folder)
    weights = {}
    for key, tensor in read_state_dict(folder).items():
        key = key.removeprefix("model.")
        # Positions are computed, not stored; the per-side embeddings are copies of `shared`.
        if "embed_positions" in key or key.endswith(".version"):
            continue
        if key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            weights.setdefault("shared.weight", tensor)
            continue
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        weights[key] = tensor
    for side in ("encoder", "decoder"):  # before building: a config of 10^6 layers costs gigabytes even on meta
        stored = len({key.split(".")[2] for key in weights if key.startswith(f"{side}.layers.")})
        if stored != getattr(cfg, f"{side}_layers"):
            raise CloError(f"{folder / 'config.json'}: {side}_layers is {getattr(cfg, f'{side}_layers')}, the weights hold {stored}")
    with torch.device("meta"):
        model = M2M100(cfg)
    expected = {key: t.shape for key, t in model.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise CloError(f"{folder}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, want in expected.items():
        if weights[key].shape != want:
            raise CloError(f"{folder}: weight {key!r} has shape {tuple(weights[key].shape)}, config.json implies {tuple(want)}")
    model.load_state_dict(weights, assign=True)
    return model.to(device=device, dtype=dtype).eval()
