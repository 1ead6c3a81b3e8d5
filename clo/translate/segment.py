"""Cut a chat response into sentences to translate, and put the translations back in its shape.

A translation model reads one sentence at a time and loses line breaks (its sentencepiece step turns
"\\n" into a space), so a response with paragraphs, lists, tables and code would come back as one
long line. Instead the text is cut into:
  - verbatim parts, kept byte for byte: line breaks, indentation, list and heading markers
    ("- ", "1. ", "## ", "> "), table pipes, whitespace between sentences, lines with no letters,
    and fenced code blocks (``` or ~~~ ... the closing fence), which are never translated;
  - pieces to translate: the sentences in between (a long one is cut further at ";" or "," and,
    if still too long, between words).
`reassemble` joins the verbatim parts with the translated pieces; with the pieces themselves it gives
back the original text exactly.

Inline code (`like this`) stays inside its sentence: cutting the sentence around it would give the
model fragments without grammar. Sentence boundaries are found by a rule for English (the source
language): ".", "!", "?" or "…", optional closing quotes/brackets, whitespace, then a capital letter,
digit or opening quote, unless the word before is a common abbreviation (Dr., e.g., ...).
"""

import re
from dataclasses import dataclass

# A code fence (CommonMark): 3 or more backticks or tildes; a backtick fence's info string has no backtick, so
# "```pip install x```" on one line is inline code, not a fence. It closes at a run of the same character at
# least as long, alone on its line.
FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")
# Line prefixes kept verbatim: indentation, then any mix of list markers, heading marks, quotes.
PREFIX = re.compile(r"^\s*(?:(?:[-*+•]|\d{1,3}[.)]|[a-zA-Z][.)]|#{1,6}|>)[ \t]+|>)*")
TABLE_SEPARATOR = re.compile(r"^[\s|:\-]*$")
SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*(\s+)(?=[\"'“‘(\[]?[A-Z0-9])")
ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no", "fig",
    "approx", "inc", "ltd", "co", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept",
    "oct", "nov", "dec", "u.s", "u.k", "a.m", "p.m", "vol", "ch", "ed", "al",
}


@dataclass
class Segmented:
    """parts: the text in order, each a verbatim string or an int, the index of a piece;
    pieces: the texts to translate."""

    parts: list[str | int]
    pieces: list[str]

    def verbatim(self, text: str) -> None:
        if text:
            self.parts.append(text)

    def translate(self, text: str) -> None:
        self.parts.append(len(self.pieces))
        self.pieces.append(text)


def segment(text: str, max_chars: int = 400) -> Segmented:
    """Split `text` into verbatim parts and pieces of at most max_chars characters to translate."""
    seg = Segmented([], [])
    fence = ""  # the open code block's fence, "" outside code
    for line in re.split(r"(\r?\n)", text):
        if line in ("\n", "\r\n"):
            seg.verbatim(line)
            continue
        found = FENCE.match(line)
        if fence:
            seg.verbatim(line)
            if found and found.group(1)[0] == fence[0] and len(found.group(1)) >= len(fence) and not found.group(2).strip():
                fence = ""
            continue
        if found and not (found.group(1)[0] == "`" and "`" in found.group(2)):
            seg.verbatim(line)
            fence = found.group(1)
            continue
        if line.lstrip().startswith("|"):
            segment_table_row(line, seg, max_chars)
            continue
        prefix = PREFIX.match(line).group(0)
        seg.verbatim(prefix)
        segment_prose(line[len(prefix):], seg, max_chars)
    return seg


def segment_table_row(line: str, seg: Segmented, max_chars: int) -> None:
    """| cell | cell |: the pipes stay, each cell's text is translated; |---|:--:| rows stay."""
    if TABLE_SEPARATOR.match(line):
        seg.verbatim(line)
        return
    for cell in re.split(r"(\|)", line):
        if cell == "|":
            seg.verbatim(cell)
        else:
            segment_prose(cell, seg, max_chars)


def segment_prose(text: str, seg: Segmented, max_chars: int) -> None:
    """Leading/trailing whitespace and text without letters stay; sentences are translated."""
    core = text.strip()
    if not any(c.isalpha() for c in core):
        seg.verbatim(text)
        return
    start = text.index(core)
    seg.verbatim(text[:start])
    for sentence, gap in split_sentences(core):
        for i, chunk in enumerate(split_long(sentence, max_chars)):
            if i:
                seg.verbatim(" ")
            seg.translate(chunk)
        seg.verbatim(gap)
    seg.verbatim(text[start + len(core):])


def split_sentences(text: str) -> list[tuple[str, str]]:
    """[(sentence, whitespace after it)]; joining them gives `text` back."""
    out, start = [], 0
    for m in SENTENCE_END.finditer(text):
        words = text[start:m.start(1)].split()
        last_word = words[-1].rstrip(".!?…\"'”’)]").lower() if words else ""
        if last_word in ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha()):  # "Dr. X", "J. R. R."
            continue
        out.append((text[start:m.start(1)], m.group(1)))
        start = m.end(1)
    out.append((text[start:], ""))
    return out


def split_long(sentence: str, max_chars: int) -> list[str]:
    """A sentence longer than max_chars, cut after "; " or else ", " or else between words, into
    chunks of at most max_chars; each cut drops one space, which `segment` puts back."""
    if len(sentence) <= max_chars:
        return [sentence]
    for separator in ("; ", ", ", " "):
        parts = sentence.split(separator)
        chunks, current = [], parts[0]
        for part in parts[1:]:
            if len(current) + len(separator) + len(part) <= max_chars:
                current += separator + part
            else:
                chunks.append(current + separator.rstrip())
                current = part
        chunks.append(current)
        if all(len(c) <= max_chars for c in chunks):
            break
    return chunks  # by words; a single word longer than max_chars stays whole


def reassemble(seg: Segmented, translations: list[str]) -> str:
    """The text with each piece i replaced by translations[i]."""
    if len(translations) != len(seg.pieces):
        raise ValueError(f"{len(translations)} translations for {len(seg.pieces)} pieces")
    return "".join(translations[p] if isinstance(p, int) else p for p in seg.parts)
