"""The languages of the paper and the codes each tool calls them by.

The paper's six target languages (docs/paper.md "Models and languages"): Chinese, German (high resource), Korean, Indonesian
(medium), Swahili, Yoruba (low); English is the source. Users name a language by its ISO 639-1
code (`--lang sw`); every tool maps it to its own code here, in one place.
"""

from dataclasses import dataclass

from clo.errors import CloError


@dataclass(frozen=True)
class Language:
    code: str  # ISO 639-1, what users type: "sw"
    name: str  # English name: "Swahili"
    flores: str  # FLORES-200 / NLLB-200 code: "swh_Latn"
    m2m100: str  # M2M100 language token without underscores: "sw" -> "__sw__"
    mafand: str | None  # MAFAND-MT file suffix, for the two African languages it covers


LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in [
        Language("en", "English", "eng_Latn", "en", "en"),
        Language("sw", "Swahili", "swh_Latn", "sw", "swa"),
        Language("yo", "Yoruba", "yor_Latn", "yo", "yor"),
        Language("id", "Indonesian", "ind_Latn", "id", None),
        Language("ko", "Korean", "kor_Hang", "ko", None),
        Language("zh", "Chinese", "zho_Hans", "zh", None),
        Language("de", "German", "deu_Latn", "de", None),
    ]
}

TARGET_CODES = ("sw", "yo", "id", "ko", "zh", "de")


def get_language(code: str) -> Language:
    """The `Language` for an ISO 639-1 code, or a one-line error listing the supported codes."""
    try:
        return LANGUAGES[code]
    except KeyError:
        raise CloError(f"unknown language {code!r}; supported: {', '.join(LANGUAGES)}") from None


def target_language(code: str) -> Language:
    """`--lang`: a supported language other than English (English is the source side of every pair)."""
    language = get_language(code)
    if language.code == "en":
        raise CloError("--lang en: English is the source side; the target language must not be English")
    return language
