"""Tokenizers and chat formatting against `transformers` on the same files."""

import io
import json

import pytest

from clo.errors import CloError
from clo.model.chat import ChatFormat, detect_format, encode_prompt, encode_response, stop_ids
from clo.model.tokenizer import load_tokenizer

LANGS = ["eng_Latn", "swh_Latn", "yor_Latn", "ind_Latn", "kor_Hang", "zho_Hans", "deu_Latn"]


def flores_lines(shared_data, start, stop):
    lines = []
    for lang in LANGS:
        text = (shared_data / "flores200_devtest" / f"{lang}.devtest").read_text(encoding="utf-8")
        lines += [line.strip() for line in text.splitlines()[start:stop]]
    return lines


@pytest.fixture(scope="module")
def sentencepiece_dir(shared_data, tmp_path_factory):
    """A Llama-2-style sentencepiece model (BPE, byte fallback) trained here on FLORES lines."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(flores_lines(shared_data, 0, 300)),
        model_writer=model,
        vocab_size=4000,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True, "legacy": True}))
    return folder


def test_sentencepiece_ids_equal_transformers(sentencepiece_dir, shared_data):
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read sentencepiece models")
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(sentencepiece_dir)
    ours = load_tokenizer(sentencepiece_dir)
    # lines stripped: transformers' converted Llama tokenizer and sentencepiece itself disagree on a
    # leading space; we follow sentencepiece, as Meta's reference code does
    lines = flores_lines(shared_data, 500, 600) + ["<s>[INST] Habari yako? [/INST]", "x</s>y"]
    for line in lines:
        assert ours.encode(line) == hf(line, add_special_tokens=False).input_ids, line
    assert ours.adds_bos and ours.bos_id == 1 and ours.eos_id == 2
    assert ours.decode(ours.encode(lines[0])) == lines[0]


def test_smollm2_ids_equal_transformers(smollm2_dir, shared_data):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ours = load_tokenizer(smollm2_dir)
    for line in flores_lines(shared_data, 0, 100) + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert ours.encode(line) == hf(line, add_special_tokens=False).input_ids, line
    assert not ours.adds_bos  # SmolLM2 puts no BOS before a prompt


def test_smollm2_chat_equals_apply_chat_template(smollm2_dir):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    tok = load_tokenizer(smollm2_dir)
    fmt = detect_format(tok)
    assert fmt.name == "chatml" and "SmolLM" in fmt.system
    prompt, answer = "Habari yako? Niambie kuhusu mvua.", "Nzuri sana. Mvua inanyesha leo."
    user = [{"role": "user", "content": prompt}]
    expected = hf.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert encode_prompt(tok, fmt, prompt) == hf(expected, add_special_tokens=False).input_ids
    full = hf.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    full_ids = hf(full, add_special_tokens=False).input_ids
    ours = encode_prompt(tok, fmt, prompt) + encode_response(tok, fmt, answer)
    assert full_ids[: len(ours)] == ours  # the template then adds only a newline after <|im_end|>
    assert tok.token_id("<|im_end|>") in stop_ids(tok, fmt)


# meta-llama/Llama-2-7b-chat-hf's chat template
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def test_llama2_chat_equals_apply_chat_template(sentencepiece_dir, tmp_path):
    """Prompt and answer ids of the llama2 format, with and without a system prompt, equal Llama-2-chat's
    template through transformers (the answer ends "▁", "</s>", as Meta's reference code writes it too)."""
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read sentencepiece models")
    import shutil

    import transformers

    folder = tmp_path / "llama2-chat"
    shutil.copytree(sentencepiece_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA2_TEMPLATE}))
    hf, tok = transformers.AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)
    prompt, answer = "Habari yako? Niambie kuhusu mvua.", "Nzuri sana. Mvua inanyesha leo."
    for system in (None, "Jibu kwa Kiswahili."):
        fmt = detect_format(tok, system=system)
        assert fmt.name == "llama2"
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt_ids = hf(hf.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
        full = hf.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        assert encode_prompt(tok, fmt, prompt) == prompt_ids
        assert encode_prompt(tok, fmt, prompt) + encode_response(tok, fmt, answer) == hf(full, add_special_tokens=False).input_ids


@pytest.mark.parametrize(
    "name, text",
    [
        (
            "llama3",
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        ("llama2", "[INST] Hi [/INST]"),
        ("mistral", "[INST] Hi [/INST]"),
        ("plain", "### Instruction:\nHi\n\n### Response:\n"),
        ("chatml", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ],
)
def test_documented_prompt_formats(name, text):
    """Each family's one-turn prompt as its model card documents it (BOS is added as an id, not text)."""
    assert ChatFormat(name).prompt_text("Hi") == text


def test_bos_added_once(sentencepiece_dir):
    tok = load_tokenizer(sentencepiece_dir)
    for name in ("llama2", "mistral", "plain"):
        ids = encode_prompt(tok, detect_format(tok, name), "Hi")
        assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
        assert encode_response(tok, detect_format(tok, name), "Yes.")[-1] == tok.eos_id


def test_bad_tokenizer_folders(tmp_path, sentencepiece_dir):
    with pytest.raises(CloError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(CloError, match="unknown chat format"):
        detect_format(load_tokenizer(sentencepiece_dir), "vicuna")
    with pytest.raises(CloError, match="needs token"):
        detect_format(load_tokenizer(sentencepiece_dir), "chatml")
