"""Decoding M2M100: greedy and beam search, step for step as `transformers`' `generate`.

The source is encoded once; the decoder starts from `</s>`, its first output is forced to be the
target language token, and decoding stops at `</s>`. Cross-attention keys/values are computed once
per source sentence and shared by its beams (clo/translate/m2m100.py's DecoderCache); beams or
sentences that can no longer change are dropped from the batch, which `generate` does not do.
Same scores, same tie-breaking, so outputs are identical (tests/test_m2m100.py).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from clo.errors import CloError
from clo.jsonfile import read_json
from clo.translate.m2m100 import M2M100
from clo.translate.static_decode import StaticCache, compiled_step, step_log_probs

MAX_LENGTH = 4096  # decoder tokens: M2M100's sinusoidal positions go further, no sentence of a chat answer does
MAX_BEAMS = 64


@dataclass(frozen=True)
class GenerationSettings:
    """The decoding knobs of the checkpoint's generation_config.json (transformers' names and defaults).

    max_length counts decoder tokens including the start token, as transformers does.
    length_penalty: finished beams are ranked by sum(log p) / generated_length ** length_penalty.
    early_stopping: True stops a sentence once it has num_beams finished hypotheses; False stops when
    the best running beam can no longer beat them (at the current length); "never" assumes the
    longest possible length when length_penalty > 0."""

    max_length: int = 20
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    # Settings that change the result but are not implemented here, with the values that disable them.
    UNSUPPORTED = {
        "do_sample": False, "num_beam_groups": 1, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0,
        "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": None, "bad_words_ids": None,
        "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None,
        "diversity_penalty": 0.0, "constraints": None, "force_words_ids": None, "renormalize_logits": False,
        "exponential_decay_length_penalty": None, "sequence_bias": None, "num_return_sequences": 1,
    }

    @classmethod
    def from_folder(cls, folder: str | Path) -> "GenerationSettings":
        """generation_config.json if the folder has one, else the legacy keys of config.json."""
        folder = Path(folder)
        path = folder / "generation_config.json"
        if not path.is_file():
            path = folder / "config.json"
        raw = read_json(path, missing_ok=True)
        for key, neutral in cls.UNSUPPORTED.items():
            if raw.get(key, neutral) not in (neutral, None):
                raise CloError(f"{path}: field {key!r} is {raw[key]!r}; only {neutral!r} is supported")
        max_length = raw.get("max_length") or cls.max_length
        if raw.get("max_new_tokens"):
            max_length = raw["max_new_tokens"] + 1 if isinstance(raw["max_new_tokens"], int) else raw["max_new_tokens"]  # + the start token
        settings = cls(
            max_length=max_length,
            num_beams=raw.get("num_beams") or cls.num_beams,
            length_penalty=raw.get("length_penalty", cls.length_penalty),
            early_stopping=raw.get("early_stopping", cls.early_stopping),
        )
        # beam search allocates [sentences, beams, max_length] up front: absurd values are refused, not allocated
        for key, value, top in (("max_length", settings.max_length, MAX_LENGTH), ("num_beams", settings.num_beams, MAX_BEAMS)):
            if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= top):
                raise CloError(f"{path}: field {key!r} is {value!r}; expected a whole number from 1 to {top}")
        if not isinstance(settings.length_penalty, (int, float)) or not math.isfinite(settings.length_penalty):
            raise CloError(f"{path}: field 'length_penalty' is {settings.length_penalty!r}; expected a finite number")
        return settings


@torch.inference_mode()
def generate(model: M2M100, src_ids: Tensor, src_mask: Tensor, forced_bos_id: int | None,
             settings: GenerationSettings, compile: bool = False) -> list[list[int]]:
    """Translate a padded batch src_ids, src_mask [B, S] -> for each sentence, the generated ids after
    the start token: [__tgt__, ..., </s>] (no </s> if max_length was reached first).
    compile: beam search decodes through a compiled step in static shapes (clo/translate/static_decode.py;
    a CUDA graph per step on CUDA); greedy search stays eager."""
    if settings.num_beams > 1:
        return beam_search(model, src_ids, src_mask, forced_bos_id, settings, compiled_step(model) if compile else None)
    return greedy_search(model, src_ids, src_mask, forced_bos_id, settings)


def force_token(log_probs: Tensor, token_id: int) -> Tensor:
    """transformers' ForcedBOSTokenLogitsProcessor: score 0 for token_id, -inf for all others."""
    forced = torch.full_like(log_probs, -math.inf)
    forced[:, token_id] = 0.0
    return forced


def greedy_search(model: M2M100, src_ids: Tensor, src_mask: Tensor, forced_bos_id: int | None,
                  settings: GenerationSettings) -> list[list[int]]:
    cfg = model.cfg
    cache = model.start_decoding(model.encode(src_ids, src_mask), src_mask)
    outputs: list[list[int]] = [[] for _ in range(src_ids.size(0))]
    alive = torch.arange(src_ids.size(0), device=src_ids.device)  # sentences still decoding
    tokens = torch.full_like(alive, cfg.decoder_start_token_id)
    for length in range(1, settings.max_length):  # length: decoder tokens so far
        scores = model.decode(tokens[:, None], cache)[:, -1].float()
        if length == 1 and forced_bos_id is not None:
            scores = force_token(scores, forced_bos_id)
        tokens = scores.argmax(dim=-1)
        for row, token in zip(alive.tolist(), tokens.tolist()):
            outputs[row].append(token)
        keep = tokens.ne(cfg.eos_token_id).nonzero().flatten()
        if len(keep) < len(alive):
            alive, tokens = alive[keep], tokens[keep]
            cache.select_sources(keep)
        if len(alive) == 0:
            break
    return outputs


@dataclass
class FinishedSlots:
    """Per sentence, num_beams finished hypotheses, best first (score -1e9: an empty slot)."""

    seqs: Tensor  # [B, K, max_len] token ids
    scores: Tensor  # [B, K] length-penalised scores
    full: Tensor  # [B, K] bool: slot holds a hypothesis
    lens: Tensor  # [B, K] tokens including the start token

    @classmethod
    def empty(cls, like: Tensor) -> "FinishedSlots":
        B, K, dev = like.size(0), like.size(1), like.device
        zeros = torch.zeros(B, K, dtype=torch.long, device=dev)
        return cls(like.clone(), torch.full((B, K), -1e9, device=dev), zeros.bool(), zeros)

    def merge(self, alive: Tensor, cands: Tensor, scores: Tensor, entering: Tensor, length: int) -> None:
        """Candidates cands [A, 2K, max_len] of sentences `alive`, with scores [A, 2K] (-1e9: may not
        enter) and `entering` [A, 2K] bool, compete with the sentences' finished slots."""
        merged = torch.cat([self.scores[alive], scores], dim=1)
        best = merged.topk(self.scores.size(1)).indices
        self.scores[alive] = merged.take_along_dim(best, dim=1)
        self.seqs[alive] = torch.cat([self.seqs[alive], cands], dim=1).take_along_dim(best[:, :, None], dim=1)
        self.full[alive] = torch.cat([self.full[alive], entering], dim=1).take_along_dim(best, dim=1)
        lens = torch.full_like(scores, length + 1, dtype=torch.long)
        self.lens[alive] = torch.cat([self.lens[alive], lens], dim=1).take_along_dim(best, dim=1)


def start_beams(B: int, beams: int, max_len: int, cfg, dev) -> tuple[Tensor, Tensor]:
    """Per sentence: live beams (token ids padded to max_len, like transformers) [B, K, max_len] and
    their scores [B, K]; only beam 0 starts live, so the first step does not pick the same token K times."""
    live = torch.full((B, beams, max_len), cfg.pad_token_id, dtype=torch.long, device=dev)
    live[:, :, 0] = cfg.decoder_start_token_id
    scores = torch.zeros(B, beams, device=dev)
    scores[:, 1:] = -1e9
    return live, scores


def top_candidates(log_probs: Tensor, live: Tensor, scores: Tensor, length: int, n_top: int):
    """The best n_top continuations of each sentence's live beams, by summed log-prob.
    -> (scores [A, n_top], parent beam [A, n_top], token [A, n_top], token ids [A, n_top, max_len])."""
    A, beams, _ = live.shape
    vocab = log_probs.size(-1)
    totals = (log_probs.view(A, beams, vocab) + scores[:, :, None]).view(A, beams * vocab)
    top_scores, top_index = totals.topk(n_top)
    top_beam, top_token = top_index // vocab, top_index % vocab
    cands = live.take_along_dim(top_beam[:, :, None], dim=1)
    cands[:, :, length] = top_token
    return top_scores, top_beam, top_token, cands


def beam_search(model: M2M100, src_ids: Tensor, src_mask: Tensor, forced_bos_id: int | None,
                settings: GenerationSettings, step=None) -> list[list[int]]:
    """transformers' beam search (GenerationMixin._beam_search), step for step.

    Each step, every sentence's num_beams live beams propose their continuations; the best 2 * num_beams
    (by summed log-prob) are kept: those ending in </s> (or reaching max_length) compete, scored with the
    length penalty, for the sentence's num_beams finished slots; the best num_beams of the others live on.
    A sentence is done when no live beam can beat its finished ones (or, with early_stopping=True, when
    its slots are full); done sentences leave the batch. The best finished hypothesis is returned.

    step: decode through this function in static shapes (static_decode.decode_step, or compiled_step's
    compiled form) instead of the growing cache; done sentences then stay in the batch, unread: their
    finished slots no longer change (the -1e9 terms below), so the results are the same.
    """
    cfg, beams, max_len = model.cfg, settings.num_beams, settings.max_length
    lp, early = settings.length_penalty, settings.early_stopping
    B, dev = src_ids.size(0), src_ids.device
    cache = model.start_decoding(model.encode(src_ids, src_mask), src_mask, group=beams)
    if step is not None:
        cache = StaticCache.for_model(model, cache, max_len)
    n_top = 2 * beams  # enough candidates that num_beams remain live even if num_beams of them just ended
    is_top_beams = torch.arange(n_top, device=dev) < beams  # only these may enter the finished slots

    a_live, a_scores = start_beams(B, beams, max_len, cfg, dev)
    done = FinishedSlots.empty(a_live)
    can_improve = torch.ones(B, dtype=torch.bool, device=dev)
    alive = torch.arange(B, device=dev)  # sentences still decoding; rows of a_live and a_scores
    length = 1  # decoder tokens so far
    while True:
        A = len(alive)
        tokens = a_live[:, :, length - 1].reshape(-1, 1)
        if step is None:
            log_probs = F.log_softmax(model.decode(tokens, cache)[:, -1].float(), dim=-1)
        else:
            log_probs = step_log_probs(step, model, tokens, cache)
        if length == 1 and forced_bos_id is not None:
            log_probs = force_token(log_probs, forced_bos_id)
        top_scores, top_beam, top_token, cands = top_candidates(log_probs, a_live, a_scores, length, n_top)
        ends = top_token.eq(cfg.eos_token_id) | (length + 1 >= max_len)

        # The next live beams: the best num_beams candidates that did not end.
        live_cand_scores = top_scores + ends.float() * -1e9
        pick = live_cand_scores.topk(beams).indices
        a_live = cands.take_along_dim(pick[:, :, None], dim=1)
        a_scores = live_cand_scores.take_along_dim(pick, dim=1)
        parent = top_beam.take_along_dim(pick, dim=1)

        # The finished slots: merge in candidates among the top num_beams that just ended.
        slots_full = done.full[alive].all(dim=1, keepdim=True) & (early is True)
        just_ended = ends & is_top_beams
        fin_scores = top_scores / (length ** lp)  # length + 1 tokens, less the start token
        # -1e9 each: full slots, a sentence that cannot improve, a candidate that did not just end cannot enter
        fin_scores = fin_scores + slots_full.float() * -1e9 + (~can_improve[alive, None]).float() * -1e9 + (~just_ended).float() * -1e9
        done.merge(alive, cands, fin_scores, just_ended, length)

        cache.select_rows((torch.arange(A, device=dev)[:, None] * beams + parent).flatten())
        length += 1

        # Can the best live beam still beat the worst finished one? (transformers' heuristic)
        horizon = max_len - 1 if early == "never" and lp > 0.0 else length - 1
        best_possible = a_scores[:, :1] / (horizon ** lp)
        worst_done = torch.where(done.full[alive], done.scores[alive].min(dim=1, keepdim=True).values, -1e9)
        can_improve[alive] &= (best_possible > worst_done).any(dim=1)

        still = can_improve[alive] & ~(done.full[alive].all(dim=1) & (early is True))
        if ends.all() or not still.any():
            break
        if step is None and not still.all():
            keep = still.nonzero().flatten()
            alive, a_live, a_scores = alive[keep], a_live[keep], a_scores[keep]
            cache.select_sources(keep)

    return [done.seqs[b, 0, 1:done.lens[b, 0]].tolist() for b in range(B)]


