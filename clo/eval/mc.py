"""Multiple-choice benchmarks in the MMLU CSV format, scored by the log-likelihood of the answer letter.

File format (Hendrycks et al.'s MMLU release, data/test/<subject>_test.csv): no header, six columns

    question, option A, option B, option C, option D, answer letter (A-D)

A first row ending in the word "answer" is taken as a header and skipped. The subject is the file
name without `_test` / `_dev` / `_val`. Prompts follow the original MMLU evaluation, as plain text
(no chat template, as lm-evaluation-harness does by default):

    The following are multiple choice questions (with answers) about {subject}.

    {question}
    A. {a}
    B. {b}
    C. {c}
    D. {d}
    Answer: {letter}            <- k solved examples first when few-shot, then the question, ending at "Answer:"

The prediction is the letter whose continuation " A" .. " D" has the highest log-probability.
When every letter is one token (all tokenizers here), one forward pass per question reads the four
next-token log-probs; otherwise each letter's continuation is scored as a sequence.

Few-shot (k > 0): the k examples are the first k rows of the subject's dev file (MMLU's layout:
`../dev/<subject>_dev.csv` next to the `test` folder, or `<subject>_dev.csv` in the same folder);
with no dev file, the first k rows of the file itself are the examples and are not scored.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clo.errors import CloError
from clo.model.decoder import Transformer
from clo.model.tokenizer import Tokenizer
from clo.train.batching import EncodedExample
from clo.train.loss import head_logits
from clo.train.scoring import Batching, four_way_rows
from clo.world import World

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # "A" .. "D"
    where: str  # file:line, for messages


def subject_of(path: Path) -> str:
    stem = path.name.removesuffix(".csv")
    for suffix in ("_test", "_dev", "_val"):
        stem = stem.removesuffix(suffix)
    return stem


def read_mc_csv(path: Path | str) -> list[Question]:
    """Every row of an MMLU-format CSV, checked: six columns and an answer letter A-D (`file:line: ...`)."""
    path = Path(path)
    subject = subject_of(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # a byte-order mark (spreadsheet exports) is not the question's
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader]
    except FileNotFoundError:
        raise CloError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CloError(f"{path}: cannot read CSV: {e}") from None
    questions = []
    for n, (line, row) in enumerate(rows):
        if not row or not "".join(row).strip():
            continue
        where = f"{path}:{line}"
        if len(row) != 6:
            raise CloError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
        if n == 0 and row[5].strip().lower() == "answer":
            continue  # a header row
        answer = row[5].strip().upper()
        if answer not in LETTERS:
            raise CloError(f"{where}: answer {row[5]!r} is not one of A, B, C, D")
        questions.append(Question(subject, row[0], tuple(row[1:5]), answer, where))
    if not questions:
        raise CloError(f"{path}: no questions")
    return questions


def dev_file_for(path: Path) -> Path | None:
    """MMLU's dev file for a test file's subject, if one is where MMLU puts it."""
    subject = subject_of(path)
    for candidate in (path.parent.parent / "dev" / f"{subject}_dev.csv", path.parent / f"{subject}_dev.csv"):
        if candidate.is_file() and candidate.resolve() != path.resolve():
            return candidate
    return None


def format_question(q: Question, with_answer: bool) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.options))
    return f"{q.question}{options}\nAnswer:" + (f" {q.answer}\n\n" if with_answer else "")


def build_prompt(q: Question, shots: list[Question]) -> str:
    header = f"The following are multiple choice questions (with answers) about {q.subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_question(s, True) for s in shots) + format_question(q, False)


def encode_choices(tok: Tokenizer, prompt: str) -> tuple[list[int], list[list[int]]]:
    """(context ids, [the ids of " A", " B", " C", " D" as they follow the context])."""
    bos = [tok.bos_id] if tok.adds_bos and tok.bos_id is not None else []
    context = tok.encode(prompt)
    continuations = []
    for letter in LETTERS:
        full = tok.encode(prompt + " " + letter)
        # the tokenizer may merge across the boundary; then the letter is scored as encoded alone
        continuations.append(full[len(context) :] if full[: len(context)] == context else tok.encode(" " + letter))
    return bos + context, continuations


@torch.no_grad()
def choice_logps(model: Transformer, items: list[tuple[list[int], list[list[int]]]], pad_id: int, batch_size: int,
                 world: World = World()) -> torch.Tensor:
    """log π(continuation | context) of each item's four choices: [Q, 4] float32.

    N processes take the length-sorted batches in turn (the batches of one process, so its numbers)
    and every process gets the whole table.
    """
    single_token = all(len(c) == 1 for _, conts in items for c in conts)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    mine = {}
    for b in tqdm(world.turns(len(batches)), desc="multiple choice", unit="batch", disable=not world.main):
        batch = [items[i] for i in batches[b]]
        mine[b] = next_letter_logps(model, batch, pad_id) if single_token else choice_sequence_logps(model, batch, pad_id)
    out = torch.empty(len(items), 4)
    for b, rows in world.merge(mine).items():
        out[batches[b]] = rows
    return out


def next_letter_logps(model: Transformer, batch: list[tuple[list[int], list[list[int]]]], pad_id: int) -> torch.Tensor:
    """One pass when every letter is one token: the next-token log-probs of the letters after each context. -> [B, 4] on the CPU."""
    device = model.embed_tokens.weight.device
    lengths = [len(context) for context, _ in batch]
    tokens = torch.full((len(batch), max(lengths)), pad_id, dtype=torch.long)
    for row, (context, _) in enumerate(batch):
        tokens[row, : lengths[row]] = torch.tensor(context)
    hidden = model.hidden(tokens.to(device))
    last = hidden[torch.arange(len(batch)), torch.tensor(lengths) - 1]  # [B, D], right padding is never seen
    logprobs = F.log_softmax(head_logits(last, model.lm_head.weight, torch.float32), dim=-1)  # fp32 logits, as training's
    letter_ids = torch.tensor([[c[0] for c in conts] for _, conts in batch], device=device)
    return logprobs.gather(1, letter_ids).cpu()


def choice_sequence_logps(model: Transformer, batch: list[tuple[list[int], list[list[int]]]], pad_id: int) -> torch.Tensor:
    """Each choice scored as a (context, continuation) sequence, as training scores one. -> [B, 4] on the CPU."""
    examples = [EncodedExample(str(k), [(context, c) for c in conts]) for k, (context, conts) in enumerate(batch)]
    # packed where training packs (CPU): the context is computed once for its four choices
    batching = Batching.resolve(pad_id, 8, 1, model.embed_tokens.weight.device, compiled=False)
    return four_way_rows(model, examples, batching)  # rows [all A | all B | ...]


def evaluate_mc(
    model: Transformer,
    tok: Tokenizer,
    files: list[list[Question]],
    dev_sets: list[list[Question] | None],
    shots: int,
    batch_size: int,
    limit: int = 0,
    world: World = World(),
) -> dict:
    """Accuracy per subject and overall (micro: over questions; macro: mean over subjects).

    files: the questions of each CSV; dev_sets: each file's dev questions (few-shot examples) or None.
    limit > 0 scores only the first `limit` questions of each file. world: N processes share the
    questions (`choice_logps`) and all return the same numbers.
    """
    items, questions = [], []
    for qs, dev in zip(files, dev_sets, strict=True):
        examples, scored = (dev[:shots], qs) if dev is not None else (qs[:shots], qs[shots:])
        scored = scored[:limit] if limit else scored
        for q in scored:
            items.append(encode_choices(tok, build_prompt(q, examples)))
            questions.append(q)
    if not items:
        raise CloError(f"multiple choice: no questions left to score after taking {shots} few-shot examples")
    predicted = choice_logps(model, items, tok.pad_id, batch_size, world).argmax(dim=1).tolist()
    per_subject: dict[str, list[int]] = {}
    for q, p in zip(questions, predicted):
        per_subject.setdefault(q.subject, []).append(int(LETTERS[p] == q.answer))
    subjects = {s: {"n": len(v), "accuracy": sum(v) / len(v)} for s, v in sorted(per_subject.items())}
    correct = sum(sum(v) for v in per_subject.values())
    return {
        "n": len(questions),
        "shots": shots,
        "accuracy": correct / len(questions),
        "macro_accuracy": sum(s["accuracy"] for s in subjects.values()) / len(subjects),
        "subjects": subjects,
    }
