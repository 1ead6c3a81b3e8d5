"""Pairwise judging, AlpacaEval style: does model A answer better than model B, by a local judge model?

For every prompt both models answered, the judge (any instruct checkpoint, run through our decoder
and its own chat format) reads the instruction and the two answers and names the better one. Each
pair is judged twice, A shown first and then B shown first, so a judge that prefers a position
gains nothing. From A's side a judgment scores 1 (win), 0 (loss) or ½ (tie), and

    win_rate(A over B) = mean score over the 2 × N judgments.

Language. As in the paper's evaluation, an answer in the wrong language loses: the judge prompt
says so, and with `language_check="langid"` (the default) the rule is also applied before asking:
when exactly one of the two answers is in the prompt's language (by py3langid, clo/eval/langid.py), that
answer wins both orders and the judge is not asked. Small judges follow such an instruction poorly.

Parsing. The judge is asked to reply "Output (a)" or "Output (b)" and decodes greedily. A reply
naming one label is that verdict; one naming both counts only if it opens with a label; a bare "a"
or "b" is accepted. Anything else is malformed and counted as a tie (never retried: greedy decoding
would give the same text); the number of malformed replies is reported.

`alpaca_eval_outputs` writes a model's answers in AlpacaEval's model_outputs.json format, so an
external judge (alpaca_eval with GPT-4) can score them.
"""

import re

from tqdm import tqdm

from clo.model.chat import ChatFormat, encode_prompt, stop_ids
from clo.model.decoder import Transformer
from clo.model.generate import generate
from clo.model.tokenizer import Tokenizer
from clo.world import World

JUDGE_TEMPLATE = """You compare two answers to the same instruction and decide which one is better.
Judge helpfulness, correctness and clarity. An answer written in a different language from the \
instruction is always worse than an answer in the language of the instruction, whatever its content.

# Instruction
{instruction}

# Output (a)
{output_a}

# Output (b)
{output_b}

Which output is better? Reply with exactly "Output (a)" or "Output (b)"."""

_LABEL = re.compile(r"output\s*\(?\s*([ab])\b\s*\)?|\(\s*([ab])\s*\)", re.IGNORECASE)


def parse_verdict(reply: str) -> str | None:
    """"a", "b", or None for a malformed reply (module docstring)."""
    found = {(m.group(1) or m.group(2)).lower() for m in _LABEL.finditer(reply)}
    if not found:
        bare = reply.strip().strip(".:()*\"' ").lower()
        return bare if bare in ("a", "b") else None
    if len(found) == 1:
        return found.pop()
    first = _LABEL.match(reply.strip().lstrip("*\"' "))  # both named: trust it only if it opens with one
    return (first.group(1) or first.group(2)).lower() if first else None


def pair_key(record: dict) -> tuple[str, str, str]:
    return record["set"], record["id"], record["prompt_lang"]


def judge_pairs(
    judge: Transformer,
    tok: Tokenizer,
    fmt: ChatFormat,
    records_a: list[dict],
    records_b: list[dict],
    batch_size: int,
    max_new_tokens: int = 16,
    language_check: str = "langid",
    world: World = World(),
) -> tuple[list[dict], dict]:
    """(one judgment record per prompt and order, summary) of model A against model B.

    records_*: generation records (clo/eval/generation.py) of the two models; prompts are matched by
    (set, id, prompt_lang). Summary: win_rate, wins, losses, ties, malformed, decided_by_language, n.
    world: N processes share the judge's generations (`judge_replies`) and all return the same.
    """
    by_key = {pair_key(r): r for r in records_b}
    pairs = [(a, by_key[pair_key(a)]) for a in records_a if pair_key(a) in by_key]
    judgments, to_ask = [], []
    for a, b in pairs:
        a_ok, b_ok = a["answer_lang"] == a["prompt_lang"], b["answer_lang"] == b["prompt_lang"]
        for a_first in (True, False):
            j = {"set": a["set"], "id": a["id"], "prompt_lang": a["prompt_lang"], "a_shown_first": a_first}
            if language_check == "langid" and a_ok != b_ok:
                j.update(reply=None, verdict=None, score_a=1.0 if a_ok else 0.0, decided_by="language")
            else:
                first, second = (a, b) if a_first else (b, a)
                j["judge_prompt"] = JUDGE_TEMPLATE.format(instruction=a["prompt"], output_a=first["answer"], output_b=second["answer"])
                to_ask.append(j)
            judgments.append(j)

    replies = judge_replies(judge, tok, fmt, [j.pop("judge_prompt") for j in to_ask], batch_size, max_new_tokens, world)
    for j, reply in zip(to_ask, replies, strict=True):
        verdict = parse_verdict(reply)
        a_label = "a" if j["a_shown_first"] else "b"
        score = 0.5 if verdict is None else float(verdict == a_label)
        j.update(reply=reply, verdict=verdict, score_a=score, decided_by="judge" if verdict else "malformed")

    scores = [j["score_a"] for j in judgments]
    summary = {
        "n_prompts": len(pairs),
        "n_judgments": len(judgments),
        "win_rate": sum(scores) / len(scores) if scores else None,
        "wins": scores.count(1.0),
        "losses": scores.count(0.0),
        "ties": scores.count(0.5),
        "malformed": sum(j["decided_by"] == "malformed" for j in judgments),
        "decided_by_language": sum(j["decided_by"] == "language" for j in judgments),
    }
    return judgments, summary


def judge_replies(judge: Transformer, tok: Tokenizer, fmt: ChatFormat, prompts: list[str], batch_size: int, max_new_tokens: int,
                  world: World = World()) -> list[str]:
    """The judge's greedy reply to each prompt, in order. Batches of similar length; N processes take
    them in turn (one process's batches, so its replies) and every process gets all the replies."""
    stops = stop_ids(tok, fmt)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    mine = {}
    for b in tqdm(world.turns(len(batches)), desc="judge", unit="batch", disable=not world.main):
        ids = [encode_prompt(tok, fmt, prompts[i]) for i in batches[b]]
        mine.update({i: tok.decode(out) for i, out in zip(batches[b], generate(judge, ids, max_new_tokens, stops, tok.pad_id))})
    replies = world.merge(mine)
    return [replies[i] for i in range(len(prompts))]


def alpaca_eval_outputs(records: list[dict], generator: str) -> list[dict]:
    """AlpacaEval's model_outputs.json records: instruction, output, generator, dataset (+ our id, lang)."""
    return [
        {"instruction": r["prompt"], "output": r["answer"], "generator": generator, "dataset": r["set"], "id": r["id"], "lang": r["prompt_lang"]}
        for r in records
    ]
