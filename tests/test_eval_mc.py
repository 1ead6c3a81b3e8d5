"""MMLU-format multiple choice (clo/eval/mc.py): CSV checks, prompt format, scoring paths, a planted answer."""

import pytest
import torch
from tiny_chat_model import make_tiny_chat_model

from clo.errors import CloError
from clo.eval.mc import LETTERS, build_prompt, choice_logps, dev_file_for, encode_choices, evaluate_mc, read_mc_csv
from clo.model.hf_folder import load_model
from clo.model.tokenizer import load_tokenizer

ROWS = [
    ("What colour is the sky on a clear day?", "green", "blue", "red", "black", "B"),
    ("How many legs does a spider have?", "eight", "six", "four", "ten", "A"),
    ("Which planet is closest to the sun?", "Venus", "Earth", "Mercury", "Mars", "C"),
    ("What is frozen water called?", "steam", "sand", "salt", "ice", "D"),
]


def write_csv(path, rows):
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = [build_prompt(q, []) + f" {q.answer}" for q in read_mc_csv(write_csv(tmp_path_factory.mktemp("t") / "x_test.csv", ROWS))]
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny"), texts * 20)


def test_read_csv_and_subject(tmp_path):
    path = write_csv(tmp_path / "high_school_physics_test.csv", [("question", "A", "B", "C", "D", "answer"), *ROWS])
    qs = read_mc_csv(path)
    assert len(qs) == 4 and qs[0].subject == "high_school_physics"
    assert qs[2].options == ("Venus", "Earth", "Mercury", "Mars") and qs[2].answer == "C"


@pytest.mark.parametrize(
    "bad_row, message",
    [
        (("q", "a", "b", "c", "D"), r"bad_test.csv:3: expected 6 columns \(question, A, B, C, D, answer\), got 5"),
        (("q", "a", "b", "c", "d", "E"), r"bad_test.csv:3: answer 'E' is not one of A, B, C, D"),
    ],
)
def test_bad_csv_names_file_and_line(tmp_path, bad_row, message):
    path = write_csv(tmp_path / "bad_test.csv", [ROWS[0], ROWS[1], bad_row])
    with pytest.raises(CloError, match=message):
        read_mc_csv(path)


def test_line_number_counts_multiline_fields(tmp_path):
    path = write_csv(tmp_path / "bad_test.csv", [("a question\nover two lines", "a", "b", "c", "d", "A"), ("q", "a")])
    with pytest.raises(CloError, match="bad_test.csv:3: expected 6 columns"):
        read_mc_csv(path)


def test_prompt_format_few_shot():
    from clo.eval.mc import Question

    shot = Question("world_religions", "Q1?", ("a1", "b1", "c1", "d1"), "C", "f:1")
    q = Question("world_religions", "Q2?", ("a2", "b2", "c2", "d2"), "A", "f:2")
    assert build_prompt(q, [shot]) == (
        "The following are multiple choice questions (with answers) about world religions.\n\n"
        "Q1?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer: C\n\n"
        "Q2?\nA. a2\nB. b2\nC. c2\nD. d2\nAnswer:"
    )


def test_dev_file_found_where_mmlu_puts_it(tmp_path):
    (tmp_path / "test").mkdir(), (tmp_path / "dev").mkdir()
    test = write_csv(tmp_path / "test" / "anatomy_test.csv", ROWS)
    dev = write_csv(tmp_path / "dev" / "anatomy_dev.csv", ROWS)
    assert dev_file_for(test) == dev
    assert dev_file_for(dev) is None


def test_one_pass_and_per_choice_paths_agree_with_transformers(tiny, tmp_path):
    """Single-token letters take one forward pass; a multi-token choice forces the per-sequence path."""
    import transformers

    tok, model = load_tokenizer(tiny), load_model(tiny)
    q = read_mc_csv(write_csv(tmp_path / "x_test.csv", ROWS))[0]
    context, conts = encode_choices(tok, build_prompt(q, []))
    assert all(len(c) == 1 for c in conts)
    fast = choice_logps(model, [(context, conts)], tok.pad_id, batch_size=1)[0]
    slow = choice_logps(model, [(context, [conts[0], conts[1], conts[2], conts[3] + conts[0]])], tok.pad_id, batch_size=1)[0]
    assert torch.allclose(fast[:3], slow[:3], atol=1e-4)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([context])).logits[0, -1].float().log_softmax(-1)[[c[0] for c in conts]]
    assert torch.allclose(fast, expected, atol=1e-4)


def test_planted_answers_are_found(tiny, tmp_path):
    """Train the tiny model to answer each question with its letter: accuracy 1; relabelled answers: accuracy 0."""
    tok = load_tokenizer(tiny)
    qs = read_mc_csv(write_csv(tmp_path / "planted_test.csv", ROWS))
    items = [encode_choices(tok, build_prompt(q, [])) for q in qs]
    model = load_model(tiny)
    before = evaluate_mc(model, tok, [qs], [None], shots=0, batch_size=4)

    model.train()
    # one right-padded batch; the loss reads each context's last position (padding comes after it)
    lengths = torch.tensor([len(context) for context, _ in items])
    tokens = torch.full((len(items), int(lengths.max())), tok.pad_id)
    for row, (context, _) in enumerate(items):
        tokens[row, : len(context)] = torch.tensor(context)
    targets = torch.tensor([conts[LETTERS.index(q.answer)][0] for q, (_, conts) in zip(qs, items)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        logits = model(tokens)[torch.arange(len(items)), lengths - 1]
        loss = torch.nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    after = evaluate_mc(model, tok, [qs], [None], shots=0, batch_size=3)
    assert after["accuracy"] == 1.0 and after["subjects"]["planted"] == {"n": 4, "accuracy": 1.0}
    assert before["accuracy"] < 1.0  # the untrained model did not already know
    shifted = [(*row[:5], LETTERS[(LETTERS.index(row[5]) + 1) % 4]) for row in ROWS]
    wrong = read_mc_csv(write_csv(tmp_path / "planted_test.csv", shifted))
    assert evaluate_mc(model, tok, [wrong], [None], shots=0, batch_size=4)["accuracy"] == 0.0


def test_shots_from_the_file_itself_are_not_scored(tiny, tmp_path):
    tok, model = load_tokenizer(tiny), load_model(tiny)
    qs = read_mc_csv(write_csv(tmp_path / "x_test.csv", ROWS))
    assert evaluate_mc(model, tok, [qs], [None], shots=1, batch_size=4)["n"] == 3
    assert evaluate_mc(model, tok, [qs], [qs], shots=2, batch_size=4)["n"] == 4
    assert evaluate_mc(model, tok, [qs], [None], shots=0, batch_size=4, limit=2)["n"] == 2


def test_a_byte_order_mark_is_not_part_of_the_first_question(tmp_path):
    path = tmp_path / "bom_test.csv"
    path.write_bytes(write_csv(tmp_path / "plain_test.csv", ROWS).read_bytes().decode("utf-8").encode("utf-8-sig"))
    assert read_mc_csv(path)[0].question == ROWS[0][0]
