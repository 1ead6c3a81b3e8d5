"""Batched generation with a static KV cache: greedy, or temperature + top-p sampling.

Prompts of different lengths are padded on the left, so every row's next token sits in the same
cache slot; each row's RoPE positions start at 0 after its padding, and the attention mask hides
the padding. Rows stop at a stop id; the batch stops when every row has, or at `max_new_tokens`.

`compile=True` runs each one-token decode step through torch.compile with static shapes (on CUDA
as a CUDA graph, gpt-fast's recipe): the cache length is rounded up to a multiple of
`CACHE_BUCKET`, so calls with different prompt lengths reuse one graph per batch size, and the
cache stays allocated between calls (its address is part of the graph; `model.clear_cache()` frees it).
The prefill runs eagerly: its length changes with every batch.
"""

import torch

from clo.model.decoder import Transformer, attention_mask

CACHE_BUCKET = 256  # compiled decode: cache lengths are multiples of this, so few shapes compile


def compiled_decode_step(model: Transformer):
    """model.forward for one new token per row [B, 1], compiled once per model (static shapes; CUDA graphs on CUDA)."""
    step = getattr(model, "_compiled_decode", None)
    if step is None:
        cuda = model.embed_tokens.weight.device.type == "cuda"
        # one graph per (batch size, cache length): an eval's batches of sorted prompt lengths make several
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        step = torch.compile(model.forward, mode="reduce-overhead" if cuda else None, fullgraph=True, dynamic=False)
        model._compiled_decode = step
    return step


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Next ids [B] from last-position logits [B, V]: argmax when temperature == 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already cover top_p
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool = False,
) -> list[list[int]]:
    """The new tokens of each prompt (stop token excluded).

    `use_cache=False` recomputes every step (a test oracle); `compile=True` compiles the decode step
    (see the module docstring) and keeps the KV cache allocated after the call.
    """
    device = model.embed_tokens.weight.device
    if not prompts or not all(prompts):
        raise ValueError("generate: every prompt needs at least one token (a chat format or BOS gives it one)")
    B, L = len(prompts), max(len(p) for p in prompts)
    S = L + max_new_tokens
    if compile:
        S = -(-S // CACHE_BUCKET) * CACHE_BUCKET  # static shapes: a few cache lengths, not one per call
    pads = torch.tensor([L - len(p) for p in prompts], device=device)
    seq = torch.full((B, S), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        seq[b, L - len(p) : L] = torch.tensor(p, dtype=torch.long)
    slots = torch.arange(S, device=device)
    valid = (slots[None, :] >= pads[:, None]) & (slots[None, :] < L)  # [B, S] real tokens so far
    positions = (slots[None, :] - pads[:, None]).clamp(min=0)  # [B, S] RoPE position of each slot
    stop = torch.tensor(sorted(stop_ids), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    if use_cache:
        model.setup_cache(B, S)
    decode = compiled_decode_step(model) if compile and use_cache else model
    try:
        cur = L  # slot of the token to be generated next
        for step in range(max_new_tokens):
            if use_cache:
                q = slice(0, L) if step == 0 else slice(cur - 1, cur)
                q_slots = slots[q]
                mask = attention_mask(q_slots, valid, model.cfg.sliding_window)
                forward = model if step == 0 else decode  # the prefill's length varies: eager
                logits = forward(seq[:, q], positions[:, q], mask, q_slots)
            else:
                q_slots = slots[:cur]
                mask = attention_mask(q_slots, valid[:, :cur], model.cfg.sliding_window)
                logits = model(seq[:, :cur], positions[:, :cur], mask)
            nxt = sample_next(logits[:, -1], temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            seq[:, cur] = nxt
            valid[:, cur] = True
            done |= torch.isin(nxt, stop)
            cur += 1
            if done.all():
                break
    finally:
        if not compile:
            model.clear_cache()
    return [cut_at_stop(row, stop_ids) for row in seq[:, L:cur].tolist()]


def cut_at_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i]
    return ids


def main(argv=None):
    """python -m clo.model.generate --model M "prompt" ...: answer prompts with a checkpoint's chat format."""
    from clo.errors import ArgumentParser
    from clo.model.chat import detect_format, encode_prompt, stop_ids
    from clo.model.hf_folder import load_model
    from clo.model.sources import DEFAULT_MODEL, resolve_model
    from clo.model.tokenizer import load_tokenizer
    from clo.runtime import on_for_cuda, resolve_device

    p = ArgumentParser(description=main.__doc__)
    p.add_argument("prompts", nargs="+", help="one or more prompts, answered as one batch")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder, hub id, or the default model")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--chat-format", default="auto", help="auto, chatml, llama3, llama2, mistral or plain")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="compiled decode step (auto: on for CUDA)")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    folder = resolve_model(args.model)
    tok = load_tokenizer(folder)
    fmt = detect_format(tok, args.chat_format)
    model = load_model(folder, args.device)
    prompts = [encode_prompt(tok, fmt, text) for text in args.prompts]
    generator = torch.Generator(args.device).manual_seed(args.seed)
    compile = on_for_cuda(args.compile, args.device)
    answers = generate(model, prompts, args.max_new_tokens, stop_ids(tok, fmt), tok.pad_id, args.temperature, args.top_p, generator, compile=compile)
    for text, ids in zip(args.prompts, answers):
        print(f">>> {text}\n{tok.decode(ids)}\n")


if __name__ == "__main__":
    from clo.errors import run_cli

    run_cli(main)
