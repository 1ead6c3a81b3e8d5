"""Cross-lingual pairs from human translations, with no machine translation at all.

Input: two line-aligned files, English and the target language, e.g. FLORES-200
(eng_Latn.devtest / swh_Latn.devtest, consecutive lines from the same Wikinews/Wikivoyage/Wikibooks
articles) or MAFAND-MT (en-swa_train.en / en-swa_train.swa, consecutive lines from the same news
stories).

The task the pairs express is *continuation*: the prompt is an instruction, written in the prompt's
own language, followed by a passage of `context` consecutive lines; the response is the line that
comes next:

    prompt_en   = "Write the next sentence of this text.\\n\\n" + en[i-k] ... en[i-1]
    response_en = en[i]
    prompt      = "Andika sentensi inayofuata ya maandishi haya.\\n\\n" + sw[i-k] ... sw[i-1]
    response    = sw[i]

so the English and target versions are exact translations of each other, made by people, and each
prompt is wholly in one language (the instruction templates below contain no English).

Limits: the files carry no article boundaries, so a window may straddle two articles and the "next
sentence" then starts a new one. Pass `doc_ids` (one id per line, e.g. the URL column of FLORES'
metadata_devtest.tsv) to keep windows inside one document; blank lines are boundaries too.
Lines end at "\n" only, as the files' line alignment is defined (FLORES, MAFAND): a U+2028 or
U+0085 inside a sentence stays in that sentence (clo/jsonl.py `read_lines`).
"""

from pathlib import Path

from clo.errors import CloError
from clo.jsonl import read_lines
from clo.languages import get_language

# "Write the next sentence of this text.", one per supported language, each wholly in that language.
INSTRUCTIONS = {
    "en": "Write the next sentence of this text.",
    "sw": "Andika sentensi inayofuata ya maandishi haya.",
    "yo": "Kọ gbólóhùn tó kàn nínú ọ̀rọ̀ yìí.",
    "id": "Tulis kalimat berikutnya dari teks ini.",
    "ko": "이 글의 다음 문장을 쓰세요.",
    "zh": "写出这段文字的下一句。",
    "de": "Schreibe den nächsten Satz dieses Textes.",
}
# How sentences of a passage are joined; Chinese writes no space between sentences.
JOINERS = {"zh": ""}


def continuation_pairs(src_path: str | Path, tgt_path: str | Path, lang: str, context: int = 2,
                       doc_ids: list[str] | None = None) -> list[dict]:
    """Records {"id", "lang", "prompt_en", "response_en", "prompt", "response"}, one for each line
    that has `context` earlier lines of the same document; id "<target file name>:<line>"."""
    language = get_language(lang)
    if lang not in INSTRUCTIONS or lang == "en":
        targets = ", ".join(code for code in INSTRUCTIONS if code != "en")
        raise CloError(f"no continuation instruction for language {lang!r}; supported: {targets}")
    if context < 1:
        raise CloError(f"--context must be at least 1, got {context}")
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise CloError(f"{tgt_path}: {len(tgt)} lines, but {src_path} has {len(src)}; the files must be line-aligned")
    if doc_ids is not None and len(doc_ids) != len(src):
        raise CloError(f"document ids: {len(doc_ids)} lines, but {src_path} has {len(src)}")
    if not src:
        raise CloError(f"{src_path}: empty file")

    records, name = [], Path(tgt_path).name
    for i in range(context, len(src)):
        window = range(i - context, i + 1)
        if any(not src[j].strip() or not tgt[j].strip() for j in window):
            continue
        if doc_ids is not None and len({doc_ids[j] for j in window}) > 1:
            continue
        records.append({
            "id": f"{name}:{i + 1}",
            "lang": language.code,
            "prompt_en": passage_prompt("en", src[i - context:i]),
            "response_en": src[i].strip(),
            "prompt": passage_prompt(lang, tgt[i - context:i]),
            "response": tgt[i].strip(),
        })
    if not records:
        raise CloError(f"{src_path}: no window of {context + 1} consecutive non-empty lines")
    return records


def passage_prompt(lang: str, lines: list[str]) -> str:
    return INSTRUCTIONS[lang] + "\n\n" + JOINERS.get(lang, " ").join(line.strip() for line in lines)


def read_doc_ids(path: str | Path) -> list[str]:
    """One document id per line: the first tab-separated column (FLORES' metadata has a header row
    starting with "URL", which is dropped)."""
    lines = read_lines(path)
    if lines and lines[0].split("\t")[0].strip().upper() == "URL":
        lines = lines[1:]
    return [line.split("\t")[0].strip() for line in lines]
