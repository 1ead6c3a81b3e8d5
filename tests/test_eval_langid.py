"""Language ID (clo/eval/langid.py) on the human-translated FLORES-200 devtest lines of all 7 languages."""

import pytest

from clo.errors import CloError
from clo.eval.langid import UNDETERMINED, LanguageId, looks_yoruba, yoruba_mark_share
from clo.languages import LANGUAGES


def flores_lines(shared_data, code: str) -> list[str]:
    path = shared_data / "flores200_devtest" / f"{LANGUAGES[code].flores}.devtest"
    return path.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def langid():
    return LanguageId()


def test_flores_lines_of_all_seven_languages(shared_data, langid):
    """Restricted to the 7 languages, py3langid labels >= 99% of each language's 1,012 lines right."""
    for code in LANGUAGES:
        lines = flores_lines(shared_data, code)
        right = sum(langid.identify(line) == code for line in lines)
        assert right / len(lines) >= 0.99, (code, right, len(lines))


def test_answers_outside_the_set_get_a_code_from_the_set(langid):
    assert langid.identify("Ceci est une phrase en français, bien évidemment.") in LANGUAGES
    assert LanguageId(["sw", "en"]).identify("Das ist ein deutscher Satz über das Wetter.") in ("sw", "en")


def test_no_letters_is_undetermined(langid):
    for text in ("", "   \n", "12 + 30 = 42", "!!!"):
        assert langid.identify(text) == UNDETERMINED


def test_unknown_language_is_a_one_line_error():
    with pytest.raises(CloError, match="no model for 'xx'"):
        LanguageId(["en", "xx"])


def test_yoruba_heuristic_on_flores(shared_data):
    """The fallback rule alone: finds >= 95% of yor_Latn lines, and (almost) no line of the other Latin-script files."""
    yo = flores_lines(shared_data, "yo")
    assert sum(map(looks_yoruba, yo)) / len(yo) >= 0.95
    for code in ("en", "sw", "id", "de"):
        lines = flores_lines(shared_data, code)
        assert sum(map(looks_yoruba, lines)) / len(lines) <= 0.01, code


def test_yoruba_mark_share_by_hand():
    # "ọjọ́" = o + dot below, j, o + dot below + acute: 3 letters, 2 of them marked (a letter counts once)
    assert yoruba_mark_share("ọjọ́") == pytest.approx(2 / 3)
    assert yoruba_mark_share("ojo") == 0.0


def test_fallback_when_py3langid_has_no_yoruba(shared_data, monkeypatch):
    """Simulate py3langid < 0.4.0 (no 'yo' model): the heuristic decides Yoruba, the model the rest."""
    import clo.eval.langid

    identifier = clo.eval.langid.full_identifier.__wrapped__()  # a model of its own, not the process's shared one
    identifier.set_languages([c for c in identifier.labels if c != "yo"])
    identifier._full_model = (identifier.nb_ptc, identifier.nb_pc, identifier.nb_classes)
    monkeypatch.setattr(clo.eval.langid, "full_identifier", lambda: identifier)
    langid = LanguageId()
    assert langid.yoruba_by_heuristic
    for code, at_least in [("yo", 0.95), ("en", 0.99), ("sw", 0.99), ("id", 0.99), ("de", 0.99), ("ko", 0.99), ("zh", 0.99)]:
        lines = flores_lines(shared_data, code)[:300]
        assert sum(langid.identify(line) == code for line in lines) / len(lines) >= at_least, code
