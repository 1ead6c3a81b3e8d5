"""translate.py and its parts: sentence segmentation, SFT source readers, resumable output,
parallel pairs, and one-line errors on bad input."""

import gzip
import json
import os
import re
import stat
from pathlib import Path

import pytest
from test_m2m100 import write_tiny_m2m100, write_tiny_nllb_tokenizer, write_tiny_tokenizer

import translate
from clo.errors import CloError, run_cli
from clo.languages import get_language
from clo.lock import output_lock
from clo.pairs import load_pairs
from clo.translate.parallel_pairs import INSTRUCTIONS, continuation_pairs
from clo.translate.segment import reassemble, segment
from clo.translate.sft_sources import read_sft_source, sample_examples
from clo.translate.translator import Translator

pytestmark = pytest.mark.usefixtures("one_thread")


# --- segmentation ---------------------------------------------------------------------------------

RESPONSE = """Sure! Here is how to do it.

1. Install Python 3. Then run `pip install x`.
2. Dr. Smith said: "Use it." It works, e.g. on Linux.
   - a nested item; with detail
## A heading

```python
print("Hello. World!")  # code is never translated
```
| Name | Age |
|------|-----|
| Bob | 42 |

> Quoted text. Another sentence!
---
Done.\r\nA Windows line."""


def test_segment_round_trip_and_pieces():
    seg = segment(RESPONSE)
    assert reassemble(seg, seg.pieces) == RESPONSE
    assert seg.pieces == [
        "Sure!", "Here is how to do it.", "Install Python 3.", "Then run `pip install x`.",
        'Dr. Smith said: "Use it."', "It works, e.g. on Linux.", "a nested item; with detail", "A heading",
        "Name", "Age", "Bob", "Quoted text.", "Another sentence!", "Done.", "A Windows line.",
    ]


def test_segment_keeps_shape_and_code():
    seg = segment(RESPONSE)
    out = reassemble(seg, [f"<{i}>" for i in range(len(seg.pieces))])
    assert out.splitlines()[:5] == ["<0> <1>", "", "1. <2> <3>", "2. <4> <5>", "   - <6>"]
    assert '```python\nprint("Hello. World!")  # code is never translated\n```' in out
    assert "| <8> | <9> |\n|------|-----|\n| <10> | 42 |" in out
    assert "> <11> <12>\n---\n<13>\r\n<14>" in out


def test_segment_cuts_long_sentences():
    text = "Alpha beta gamma, " * 30 + "the end; and more words " * 10 + "done."
    seg = segment(text, max_chars=80)
    assert all(len(p) <= 80 for p in seg.pieces) and len(seg.pieces) > 5
    assert reassemble(seg, seg.pieces) == text
    assert segment("```\nonly code\n```").pieces == [] and segment("").parts == []


def test_code_fences_as_commonmark_reads_them():
    """A one-line ```code``` is inline code inside prose (the sentence after it is translated); a ```` fence
    closes only at ```` or longer, so the ``` lines inside it stay code; ~~~ closes only ~~~."""
    text = "Run this:\n```pip install x```\nThen open the file. It is easy."
    assert segment(text).pieces == ["Run this:", "```pip install x```", "Then open the file.", "It is easy."]
    nested = "Markdown:\n````md\n```\nNot prose. Not translated.\n```\n````\nDone here."
    assert segment(nested).pieces == ["Markdown:", "Done here."]
    tilde = "~~~\n```\nStill code. Yes.\n~~~\nProse again."
    assert segment(tilde).pieces == ["Prose again."]
    for t in (text, nested, tilde):
        assert reassemble(segment(t), segment(t).pieces) == t


# --- SFT sources ----------------------------------------------------------------------------------


def message(mid, parent, role, text, lang="en", rank=None, **extra):
    return {"message_id": mid, "parent_id": parent, "user_id": "u", "created_date": "2023-02-01T00:00:00",
            "text": text, "role": role, "lang": lang, "review_count": 3, "review_result": True,
            "deleted": False, "rank": rank, "synthetic": False, "model_name": None, "emojis": {},
            "labels": None, **extra}


def oasst_trees() -> list[dict]:
    """Four trees in the released trees format, covering what selection must keep and drop."""
    def tree(tree_id, prompt, state="ready_for_export"):
        return {"message_tree_id": tree_id, "tree_state": state, "prompt": prompt, "origin": "api"}

    return [
        # kept: the rank-0 reply (listed second), not rank 1; the deeper turns are ignored
        tree("t1", {**message("p1", None, "prompter", "What is a cat?"), "replies": [
            {**message("a1b", "p1", "assistant", "A dog.", rank=1), "replies": []},
            {**message("a1", "p1", "assistant", "A small feline.", rank=0), "replies": [
                {**message("p1x", "a1", "prompter", "Tell me more."), "replies": [
                    {**message("a1x", "p1x", "assistant", "Cats purr.", rank=0), "replies": []}]}]}]}),
        # dropped: a German prompt
        tree("t2", {**message("p2", None, "prompter", "Was ist ein Hund?", lang="de"), "replies": [
            {**message("a2", "p2", "assistant", "Ein Tier.", lang="de", rank=0), "replies": []}]}),
        # dropped: the rank-0 reply was deleted; kept: the next tree
        tree("t3", {**message("p3", None, "prompter", "Hi?"), "replies": [
            {**message("a3", "p3", "assistant", "Deleted.", rank=0, deleted=True), "replies": []}]}),
        tree("t4", {**message("p4", None, "prompter", "Name a prime.\nJust one."), "replies": [
            {**message("a4", "p4", "assistant", "Seven.\n\n```\n7\n```", rank=0), "replies": []}]}),
        # dropped: tree not ready for export
        tree("t5", {**message("p5", None, "prompter", "Draft?"), "replies": [
            {**message("a5", "p5", "assistant", "Yes.", rank=0), "replies": []}]}, state="growing"),
    ]


def flatten(trees):
    out = []
    def walk(m, tree):
        out.append({**{k: v for k, v in m.items() if k != "replies"}, "message_tree_id": tree["message_tree_id"],
                    "tree_state": tree["tree_state"]})
        for r in m["replies"]:
            walk(r, tree)
    for t in trees:
        walk(t["prompt"], t)
    return out


def test_oasst1_selection_in_both_release_formats(tmp_path):
    trees, messages = tmp_path / "oasst.trees.jsonl.gz", tmp_path / "oasst.messages.jsonl"
    with gzip.open(trees, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(t) + "\n" for t in oasst_trees())
    messages.write_text("".join(json.dumps(m) + "\n" for m in flatten(oasst_trees())))
    expected = [("a1", "What is a cat?", "A small feline."), ("a4", "Name a prime.\nJust one.", "Seven.\n\n```\n7\n```")]
    for path in (trees, messages):
        got = [(e.id, e.prompt, e.response) for e in read_sft_source(path).examples]
        assert got == expected, path.name


def test_alpaca_and_jsonl_sources(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Empty answer.", "input": "", "output": ""},
    ]))
    source = read_sft_source(alpaca)
    assert [(e.id, e.prompt, e.response) for e in source.examples] == [
        ("alpaca-0", "Add the numbers.\n\n2 and 3", "5"), ("alpaca-1", "Say hi.", "Hi!")]
    assert source.skipped == [f"{alpaca}: record 2: field 'output' is empty"]

    plain = tmp_path / "chat.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in [
        {"id": 7, "prompt": "P", "response": "R"},
        {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "U"},
                      {"role": "assistant", "content": "A"}, {"role": "user", "content": "U2"}]},
    ]) + "\n")
    assert [(e.id, e.prompt, e.response) for e in read_sft_source(plain).examples] == [("7", "P", "R"), ("chat-2", "U", "A")]


@pytest.mark.parametrize("name, content, error", [
    ("alpaca.json", [{"instruction": "Add.", "input": 5, "output": "5"}], r"alpaca.json: record 0: field 'input' is not a string"),
    ("alpaca.json", [{"instruction": "Add.", "input": ["2", "3"], "output": "5"}], r"record 0: field 'input' is not a string"),
    ("oasst.jsonl", [{**message("p1", None, "prompter", "Hi?"), "text": 12, "message_tree_id": "t1"}],
     r"oasst.jsonl:1: field 'text' of message 'p1' is not a string"),
    ("oasst.jsonl", [{"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": "not a message"}],
     r"oasst.jsonl:1: field 'prompt' or one of its 'replies' is not a message object"),
    ("oasst.jsonl", [{"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": {**message("p1", None, "prompter", "Hi?"), "replies": [7]}}],
     r"oasst.jsonl:1: field 'prompt' or one of its 'replies' is not a message object"),
])
def test_a_field_of_the_wrong_type_is_one_line(tmp_path, name, content, error):
    path = tmp_path / name
    path.write_text(json.dumps(content) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in content))
    with pytest.raises(CloError, match=error):
        read_sft_source(path)


def test_sampling_is_seeded_and_keeps_file_order(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(50)))
    examples = read_sft_source(path).examples
    first, again, other = (sample_examples(examples, 10, s) for s in (1, 1, 2))
    assert first == again and first != other and len(first) == 10
    ids = [int(e.id.split("-")[1]) for e in first]
    assert ids == sorted(ids)
    assert sample_examples(examples, 80, 1) == examples


def test_source_errors(tmp_path):
    with pytest.raises(CloError, match="cannot read"):
        read_sft_source(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    with pytest.raises(CloError, match=r"bad.jsonl:2: invalid JSON"):
        read_sft_source(bad)
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(CloError, match=r"bad.jsonl:2: field 'response' is missing"):
        read_sft_source(bad)
    bad.write_text('{"id": "x", "prompt": "a", "response": "b"}\n{"id": "x", "prompt": "c", "response": "d"}\n')
    with pytest.raises(CloError, match=r"bad.jsonl:2: duplicate id 'x'"):
        read_sft_source(bad)


# --- translate.py mt, end to end with a tiny random M2M100 ----------------------------------------

EXAMPLES = [
    {"id": f"ex{i}", "prompt": f"Question number {i}. Can you answer it?",
     "response": f"Answer {i} has parts.\n\n- first part of {i}\n- second part\n\n```\ncode {i}\n```\nThe end."}
    for i in range(6)
]


@pytest.fixture(scope="module")
def mt_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    source = root / "source.jsonl"
    source.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    corpus = [e["prompt"] + " " + e["response"] for e in EXAMPLES] * 5 + ["Tell me a story about a small cat."] * 5
    model = root / "model"
    vocab_size = write_tiny_tokenizer(model, corpus, vocab_size=120, drop=0)
    # seed 4: a random model whose outputs are mostly not empty (most seeds decode to language
    # tokens only, i.e. to "", and translate.py skips such records)
    write_tiny_m2m100(model, vocab_size, seed=4, generation={"num_beams": 2, "max_length": 8, "early_stopping": True})
    return root, source, model


def mt_args(setup, out: Path, *extra: str) -> list[str]:
    root, source, model = setup
    return ["--source", str(source), "--model", str(model), "--lang", "sw", "--out", str(out),
            "--batch-size", "3", "--chunk-batches", "2", *extra]


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_mt_writes_canonical_records(mt_setup, tmp_path):
    out = tmp_path / "sw.jsonl"
    translate.main(mt_args(mt_setup, out, "--n", "4", "--seed", "3"))
    records = read_records(out)
    assert len(records) == 4
    by_id = {e["id"]: e for e in EXAMPLES}
    for r in records:
        assert list(r) == ["id", "lang", "prompt_en", "response_en", "prompt", "response"]
        assert r["lang"] == "sw"
        assert (r["prompt_en"], r["response_en"]) == (by_id[r["id"]]["prompt"], by_id[r["id"]]["response"])
        # the shape survives: bullets, blank lines and the untranslated code block
        lines = r["response"].split("\n")
        assert lines[1] == "" and lines[2].startswith("- ") and lines[3].startswith("- ")
        assert f"```\ncode {r['id'][2:]}\n```" in r["response"]
    # the same command again finds nothing to do; a larger --n adds only the missing examples
    translate.main(mt_args(mt_setup, out, "--n", "4", "--seed", "3"))
    assert read_records(out) == records
    translate.main(mt_args(mt_setup, out))
    ids = [r["id"] for r in read_records(out)]
    assert sorted(ids) == sorted(by_id) and len(ids) == len(set(ids))


def test_mt_resume_after_crash_equals_uninterrupted_run(mt_setup, tmp_path, monkeypatch):
    reference = tmp_path / "reference.jsonl"
    translate.main(mt_args(mt_setup, reference))

    out = tmp_path / "resumed.jsonl"
    calls = {"n": 0}
    real_batch = Translator.translate_batch

    def crash_after_three_batches(self, batch):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # the process dies mid-run
        return real_batch(self, batch)

    monkeypatch.setattr(Translator, "translate_batch", crash_after_three_batches)
    with pytest.raises(KeyboardInterrupt):
        translate.main(mt_args(mt_setup, out))
    monkeypatch.setattr(Translator, "translate_batch", real_batch)
    partial = read_records(out)
    assert 0 < len(partial) < len(EXAMPLES)
    with open(out, "a", encoding="utf-8") as f:  # and the crash tore the record being written
        f.write('{"id": "ex5", "lang": "sw", "prompt_en": "Quest')

    translate.main(mt_args(mt_setup, out))
    assert out.read_bytes() == reference.read_bytes()


def test_a_resume_translates_each_sentence_in_its_uninterrupted_batch(mt_setup, tmp_path, monkeypatch):
    """A crash after every possible batch, with chunks of a long and a short example (the long one's record is
    written first, mid-chunk): the resumed run's batches are the last batches of the uninterrupted run (the chunk
    in flight translated again, whole), so every sentence meets the partners and padding it meets uninterrupted,
    which bf16 needs for the same bytes (fp32 on this CPU hides a regrouping)."""
    _, _, model = mt_setup
    long = "Question number {i}. Can you answer it? Answer {i} has parts."  # 5 sentences a long example, 2 a short
    source = tmp_path / "source.jsonl"
    source.write_text("".join(json.dumps({"id": f"ex{i}", "prompt": long.format(i=i) if i % 2 == 0 else "Hi.",
                                          "response": long.format(i=i + 1) if i % 2 == 0 else "Ok."}) + "\n" for i in range(6)))
    args = ["--source", str(source), "--model", str(model), "--lang", "sw", "--batch-size", "2", "--chunk-batches", "3"]
    groups = [{f"ex{i}", f"ex{i + 1}"} for i in (0, 2, 4)]  # chunks of 6 distinct sentences or more: 5 + 2 each
    seen, real_batch = [], Translator.translate_batch

    def spy(self, batch):
        seen.append([tuple(ids) for ids in batch])
        return real_batch(self, batch)

    monkeypatch.setattr(Translator, "translate_batch", spy)
    reference = tmp_path / "reference.jsonl"
    translate.main([*args, "--out", str(reference)])
    full, mid_chunk = list(seen), 0
    for k in range(1, len(full)):
        out = tmp_path / f"crash-{k}.jsonl"
        seen.clear()

        def crash_after_k(self, batch, k=k):
            if len(seen) == k:
                raise KeyboardInterrupt
            return spy(self, batch)

        monkeypatch.setattr(Translator, "translate_batch", crash_after_k)
        with pytest.raises(KeyboardInterrupt):
            translate.main([*args, "--out", str(out)])
        written = {r["id"] for r in read_records(out)} if out.exists() else set()
        mid_chunk += any(0 < len(g & written) < len(g) for g in groups)
        monkeypatch.setattr(Translator, "translate_batch", spy)
        seen.clear()
        translate.main([*args, "--out", str(out)])
        assert seen == full[len(full) - len(seen):], k
        assert out.read_bytes() == reference.read_bytes(), k
    assert mid_chunk  # the case a resume used to regroup


def test_compile_on_decodes_in_static_shapes_to_the_same_bytes(mt_setup, tmp_path, monkeypatch):
    """--compile on sends beam search through the static-shape step (clo/translate/static_decode.py). The
    step is run eagerly here (compiling it on a CPU costs CI ~20 s; tests/test_cuda.py compiles it on a
    GPU): every batch goes through it, and the file has the bytes of the default run."""
    import clo.translate.search as search
    from clo.translate.static_decode import decode_step

    reference = tmp_path / "reference.jsonl"
    translate.main(mt_args(mt_setup, reference))
    slots = []

    def eager(model):
        def step(*args):
            slots.append(int(args[3]))
            return decode_step(*args)
        return step

    monkeypatch.setattr(search, "compiled_step", eager)
    out = tmp_path / "compiled.jsonl"
    translate.main(mt_args(mt_setup, out, "--compile", "on"))
    assert slots.count(0) >= len(EXAMPLES) // 3  # one first step per batch of 3 sentences, at least
    assert out.read_bytes() == reference.read_bytes()


def test_mt_with_an_nllb_checkpoint(tmp_path):
    """NLLB-200 folders: same model code, tokenizer without vocab.json, FLORES-style language codes."""
    corpus = [e["prompt"] + " " + e["response"] for e in EXAMPLES] * 5
    oracle = write_tiny_nllb_tokenizer(tmp_path, corpus, ["eng_Latn", "swh_Latn", "yor_Latn"], vocab_size=100)
    vocab_size = max(oracle.convert_tokens_to_ids(["eng_Latn", "swh_Latn", "yor_Latn", "<mask>"])) + 1
    write_tiny_m2m100(tmp_path, vocab_size, generation={"max_length": 6})
    translator = Translator(str(tmp_path), get_language("sw"), "cpu", "float32", None, None)
    assert translator.tgt_id == oracle.convert_tokens_to_ids("swh_Latn")
    assert translator.encode("Question.")[0] == oracle.convert_tokens_to_ids("eng_Latn")
    assert len(translator.translate_batch([translator.encode("Question."), translator.encode("The end.")])) == 2
    with pytest.raises(CloError, match="language 'ind_Latn' is not in this tokenizer"):
        Translator(str(tmp_path), get_language("id"), "cpu", "float32", None, None)


def run_cli_main(argv: list[str], capsys) -> str:
    """Run translate.py's CLI; return its one-line error (asserting exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: translate.main(argv))
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    return err[0]


def test_bad_input_gives_one_line_error_and_leaves_output_alone(mt_setup, tmp_path, capsys):
    root, source, model = mt_setup
    out = tmp_path / "out.jsonl"
    translate.main(mt_args(mt_setup, out, "--n", "1"))
    before = out.read_bytes()

    def args(**changes):
        a = dict(zip(mt_args(mt_setup, out)[::2], mt_args(mt_setup, out)[1::2]))
        a.update({f"--{k.replace('_', '-')}": str(v) for k, v in changes.items()})
        return [x for kv in a.items() for x in kv]

    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"prompt": "hello"}\n')
    not_m2m = tmp_path / "llama"
    not_m2m.mkdir()
    (not_m2m / "config.json").write_text(json.dumps({"model_type": "llama"}))
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((model / "config.json").read_text())
    cases = {
        "missing.jsonl: no such file": args(source=tmp_path / "missing.jsonl"),
        "field 'response' is missing": args(source=no_text),
        "unknown language 'xx'; supported: en, sw": args(lang="xx"),
        "'model_type' is 'llama'": args(model=not_m2m),
        "no sentencepiece.bpe.model": args(model=no_tokenizer),
        "--batch-size must be at least 1": args(batch_size=0),
    }
    for expected, argv in cases.items():
        assert expected in run_cli_main(argv, capsys)
        assert out.read_bytes() == before
    other = tmp_path / "other_lang.jsonl"
    other.write_text(json.dumps({"id": "a", "lang": "yo"}) + "\n")
    assert "field 'lang' is 'yo', not 'sw'" in run_cli_main(args(out=other), capsys)


def test_mt_output_round_trips_line_separators(mt_setup, tmp_path, monkeypatch):
    """U+2028, U+2029 and U+0085 in the source (raw, as other tools write JSONL) and in translations:
    the output is one line per record for every reader, train.py loads it, and a rerun resumes."""
    root, source, model = mt_setup
    tricky = tmp_path / "tricky.jsonl"
    tricky.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"Line\u2028break {i}. Next\x85one?",
                                          "response": f"Para\u2029graph {i}."}, ensure_ascii=False) + "\n"
                              for i in range(3)), encoding="utf-8")
    real_batch = Translator.translate_batch
    monkeypatch.setattr(Translator, "translate_batch",
                        lambda self, batch: [f"x\u2028{t}\x85" for t in real_batch(self, batch)])
    out = tmp_path / "sw.jsonl"
    argv = mt_args(mt_setup, out)
    argv[argv.index("--source") + 1] = str(tricky)
    translate.main(argv)
    text = out.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 3 and "\u2028" not in text and "\\u2028" in text
    examples = load_pairs(out, "sw").examples
    assert [ex.prompt_en for ex in examples] == [f"Line\u2028break {i}. Next\x85one?" for i in range(3)]
    assert all("\u2028" in ex.response for ex in examples)
    translate.main(argv)  # resumes: nothing to do, nothing written twice
    assert out.read_text(encoding="utf-8") == text


def test_empty_translations_are_skipped_and_counted(mt_setup, tmp_path, monkeypatch, capsys):
    """A record whose prompt translates to nothing is not written ("  " would make train.py refuse
    the whole file); the summary counts it, and a rerun translates it again, in the same batch."""
    by_id = {e["id"]: e for e in EXAMPLES}
    empty = set(segment(by_id["ex2"]["prompt"]).pieces)  # ex2's prompt: both its sentences
    real_batch = Translator.translate_batch

    def some_empty(self, batch):
        empty_ids = [self.encode(piece) for piece in empty]
        return ["" if ids in empty_ids else text for ids, text in zip(batch, real_batch(self, batch))]

    monkeypatch.setattr(Translator, "translate_batch", some_empty)
    out = tmp_path / "sw.jsonl"
    translate.main(mt_args(mt_setup, out))
    assert "skipped 1 whose translation came out empty" in capsys.readouterr().err
    ids = [ex.id for ex in load_pairs(out, "sw").examples]
    assert "ex2" not in ids and len(ids) == len(EXAMPLES) - 1
    translate.main(mt_args(mt_setup, out))
    assert "skipped 1 whose translation came out empty" in capsys.readouterr().err
    assert [ex.id for ex in load_pairs(out, "sw").examples] == ids


def test_a_sentence_that_translates_to_nothing_is_counted(mt_setup, tmp_path, monkeypatch, capsys):
    """One sentence of ex3's response comes back empty: the record is written without it, and the summary says so."""
    hole = "Answer 3 has parts."
    real_batch = Translator.translate_batch

    def one_empty(self, batch):
        return ["" if ids == self.encode(hole) else text for ids, text in zip(batch, real_batch(self, batch))]

    monkeypatch.setattr(Translator, "translate_batch", one_empty)
    translate.main(mt_args(mt_setup, tmp_path / "sw.jsonl"))
    assert f"wrote {len(EXAMPLES)} records" in (err := capsys.readouterr().err) and "1 of them with a sentence that translated to nothing" in err


def test_complete_last_record_without_newline_gets_one(mt_setup, tmp_path):
    reference = tmp_path / "reference.jsonl"
    translate.main(mt_args(mt_setup, reference))
    out = tmp_path / "out.jsonl"
    out.write_bytes(reference.read_bytes()[:-1])  # every record there, the last newline missing
    translate.main(mt_args(mt_setup, out))
    assert out.read_bytes() == reference.read_bytes()


def test_a_second_run_on_one_out_is_refused(mt_setup, tmp_path, capsys):
    out = tmp_path / "sw.jsonl"
    translate.main(mt_args(mt_setup, out, "--n", "2"))
    before = out.read_bytes()
    with output_lock(out):  # another run is writing it (tests/test_lock.py: across processes)
        assert f"{out} is in use by another run (pid {os.getpid()})" in run_cli_main(mt_args(mt_setup, out), capsys)
        src = tmp_path / "en.txt"
        src.write_text("a\nb\nc\n")
        argv = ["parallel", "--src", str(src), "--tgt", str(src), "--lang", "sw", "--out", str(out)]
        assert "is in use by another run" in run_cli_main(argv, capsys)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["en.txt", "sw.jsonl"]  # no lock file left


# --- parallel pairs -------------------------------------------------------------------------------

ENGLISH_WORDS = {"write", "next", "sentence", "of", "this", "the", "text", "continue", "following"}


def test_instructions_have_no_english():
    for code, instruction in INSTRUCTIONS.items():
        if code != "en":
            words = set(re.findall(r"[a-z]+", instruction.lower()))
            assert not words & ENGLISH_WORDS, (code, instruction)


def test_parallel_pairs_from_flores(shared_data, tmp_path, capsys):
    flores = shared_data / "flores200_devtest"
    eng = (flores / "eng_Latn.devtest").read_text(encoding="utf-8").splitlines()
    for lang, name in [("sw", "swh_Latn"), ("zh", "zho_Hans"), ("yo", "yor_Latn")]:
        tgt_path = flores / f"{name}.devtest"
        tgt = tgt_path.read_text(encoding="utf-8").splitlines()
        out = tmp_path / f"{lang}.jsonl"
        translate.main(["parallel", "--src", str(flores / "eng_Latn.devtest"), "--tgt", str(tgt_path),
                        "--lang", lang, "--out", str(out)])
        records = read_records(out)
        assert len(records) == len(eng) - 2
        r = records[10]  # the response is line 13; the passage is lines 11 and 12
        assert r["id"] == f"{name}.devtest:13" and r["lang"] == lang
        assert r["response_en"] == eng[12].strip() and r["response"] == tgt[12].strip()
        assert r["prompt_en"] == INSTRUCTIONS["en"] + "\n\n" + eng[10].strip() + " " + eng[11].strip()
        assert r["prompt"].startswith(INSTRUCTIONS[lang] + "\n\n") and tgt[11].strip() in r["prompt"]
        assert all(INSTRUCTIONS["en"] not in x["prompt"] for x in records)


def test_parallel_pairs_from_mafand_with_documents(shared_data, tmp_path):
    mafand = shared_data / "mafand"
    src, tgt = mafand / "en-swa_dev.en", mafand / "en-swa_dev.swa"
    n = len(src.read_text(encoding="utf-8").splitlines())
    records = continuation_pairs(src, tgt, "sw", context=1)
    assert len(records) == n - 1 and records[0]["id"] == "en-swa_dev.swa:2"
    assert records[0]["response"] == tgt.read_text(encoding="utf-8").splitlines()[1].strip()
    # documents of 5 lines: windows of 2 never cross a boundary, so 4 pairs per full document
    doc_ids = [str(i // 5) for i in range(n)]
    assert len(continuation_pairs(src, tgt, "sw", context=1, doc_ids=doc_ids)) == 4 * (n // 5) + max(0, n % 5 - 1)


def test_parallel_errors(shared_data, tmp_path, capsys):
    flores = shared_data / "flores200_devtest"
    short = tmp_path / "short.txt"
    short.write_text("one line\n")
    out = tmp_path / "out.jsonl"
    base = ["parallel", "--src", str(flores / "eng_Latn.devtest"), "--out", str(out)]
    assert "1 lines, but" in run_cli_main([*base, "--tgt", str(short), "--lang", "sw"], capsys)
    assert "unknown language 'xx'" in run_cli_main([*base, "--tgt", str(short), "--lang", "xx"], capsys)
    assert not out.exists()


def test_parallel_replaces_its_own_output_only(tmp_path, capsys):
    src, tgt = tmp_path / "en.txt", tmp_path / "sw.txt"
    src.write_text("One.\nTwo.\nThree.\nFour.\n")
    tgt.write_text("Moja.\nMbili.\nTatu.\nNne.\n")
    out = tmp_path / "pairs.jsonl"
    argv = ["parallel", "--src", str(src), "--tgt", str(tgt), "--lang", "sw", "--out", str(out)]
    translate.main([*argv, "--context", "1"])
    translate.main(argv)  # the same --tgt: replaced
    assert [r["id"] for r in read_records(out)] == ["sw.txt:3", "sw.txt:4"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # a normal file, not mkstemp's 0600
    before = out.read_bytes()
    other = tmp_path / "sw2.txt"
    other.write_bytes(tgt.read_bytes())
    assert "holds records not made from sw2.txt (id 'sw.txt:3')" in run_cli_main([*argv, "--tgt", str(other)], capsys)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["en.txt", "pairs.jsonl", "sw.txt", "sw2.txt"]
