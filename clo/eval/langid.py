"""Which language is an answer in: py3langid restricted to the languages in play (default: the paper's 7).

Restricting the classifier matters: unrestricted, a Swahili sentence can come out as a related
language none of the models was asked to speak, which would count as "wrong language" for no reason.

Yoruba: py3langid >= 0.4.0 ships a model with 140 languages, Yoruba ("yo") among them, and it labels
all 1,012 FLORES-200 yor_Latn devtest lines correctly when restricted to the 7 languages. Versions
before 0.4.0 (97 languages) have no Yoruba. On such an install, and only there, "yo" is decided by
a documented heuristic instead (`looks_yoruba`): a Latin-script text is Yoruba when at least 10% of
its letters carry Yoruba's tone marks or dot below (ẹ ọ ṣ, á à ...), or at least 10% of its words
are frequent Yoruba function words (awọn, ati, naa, ...; diacritics stripped, since much online
Yoruba is written without them). On FLORES devtest it finds ~96% of the yor_Latn lines and none of
the eng/swh/ind/deu lines. `LanguageId.yoruba_by_heuristic` says which path is active.
"""

import copy
import functools
import re
import unicodedata

from clo.errors import CloError
from clo.languages import LANGUAGES

DEFAULT_LANGS = tuple(LANGUAGES)  # en sw yo id ko zh de
UNDETERMINED = "und"  # empty answers, or nothing a classifier can use

# Combining marks of Yoruba orthography: grave and acute (tones), dot below (ẹ ọ ṣ).
_YORUBA_MARKS = {"\u0300", "\u0301", "\u0323"}
# Frequent Yoruba function words, diacritics stripped: rare as words in en, sw, id and de.
_YORUBA_WORDS = frozenset("awon ati naa lati ninu eyi yii sugbon gbogbo won je ti".split())
_YORUBA_MIN_SHARE = 0.10


def strip_marks(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))


def yoruba_mark_share(text: str) -> float:
    """Share of letters followed by a Yoruba tone mark or dot below (NFD), in [0, 1]."""
    letters = marked = 0
    last_was_letter = False
    for ch in unicodedata.normalize("NFD", text):
        if ch in _YORUBA_MARKS:
            marked += last_was_letter
            last_was_letter = False  # a letter with two marks (ọ́) counts once
        elif ch.isalpha():
            letters += 1
            last_was_letter = True
    return marked / letters if letters else 0.0


def yoruba_word_share(text: str) -> float:
    words = re.findall(r"[a-z]+", strip_marks(text).lower())
    return sum(w in _YORUBA_WORDS for w in words) / len(words) if words else 0.0


def looks_yoruba(text: str) -> bool:
    """The fallback's rule (module docstring): tone marks / dot below, or Yoruba function words."""
    return yoruba_mark_share(text) >= _YORUBA_MIN_SHARE or yoruba_word_share(text) >= _YORUBA_MIN_SHARE


@functools.cache
def full_identifier():
    """py3langid's model over all its languages, read once per process (~0.8 s on 2 CPU cores: an xz file
    unpickled), where train.py's preview, eval.py and each of study.py's cells would read it again."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise CloError("language ID needs py3langid: pip install 'py3langid>=0.4.0'") from None
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageId:
    """`identify(text)` -> one ISO 639-1 code from `langs`, or "und" for text with no letters."""

    def __init__(self, langs: tuple[str, ...] | list[str] = DEFAULT_LANGS):
        if not langs:
            raise CloError("language ID: the set of languages is empty")
        self.langs = tuple(dict.fromkeys(langs))
        identifier = copy.copy(full_identifier())  # set_languages sets the copy's attributes, from the shared full model
        known = set(identifier.nb_classes)
        self.yoruba_by_heuristic = "yo" in self.langs and "yo" not in known
        model_langs = [code for code in self.langs if code != "yo" or not self.yoruba_by_heuristic]
        unknown = [code for code in model_langs if code not in known]
        if unknown:
            raise CloError(f"language ID: py3langid has no model for {unknown[0]!r}; it knows {', '.join(sorted(known))}")
        if model_langs:
            identifier.set_languages(model_langs)
        self._identifier = identifier if model_langs else None

    def identify(self, text: str) -> str:
        if not any(ch.isalpha() for ch in text):
            return UNDETERMINED
        if self.yoruba_by_heuristic and looks_yoruba(text):
            return "yo"
        if self._identifier is None:  # the set was {"yo"} alone, without a Yoruba model
            return UNDETERMINED
        return self._identifier.classify(text)[0]
