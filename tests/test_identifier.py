"""Rare-token identifiers on the real CLIP vocabulary (paper §3.2)."""

import pytest

from dreambooth import identifier as ident


def test_tokenizer_is_the_real_clip_vocabulary(clip_tokenizer):
    # Guards the silent trap: keyword file args give a 2-token vocabulary and identical captions.
    assert len(clip_tokenizer) == 49408
    assert clip_tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert clip_tokenizer("a sks dog").input_ids != clip_tokenizer("a dog").input_ids


def test_candidates_obey_every_rule(clip_tokenizer):
    candidates = ident.rare_token_candidates(clip_tokenizer)
    assert len(candidates) >= 100
    assert "sks" in candidates  # the community's choice passes our rules
    lo, hi = ident.CLIP_RANK_RANGE
    for text in candidates:
        assert 2 <= len(text) <= 3 and text.isascii() and text.isalpha() and " " not in text
        ids = clip_tokenizer(text, add_special_tokens=False).input_ids
        assert len(ids) == 1 and lo <= ids[0] < hi
        assert not ident.is_english_word(text)
    for word in ("dog", "the", "cat", "sun"):
        assert word not in candidates


def test_draw_is_deterministic_distinct_and_respects_exclusions(clip_tokenizer):
    first = ident.pick_identifiers(clip_tokenizer, 5, seed=7)
    assert first == ident.pick_identifiers(clip_tokenizer, 5, seed=7)
    assert len(set(first)) == 5
    assert first != ident.pick_identifiers(clip_tokenizer, 5, seed=8)
    excluded = ident.pick_identifiers(clip_tokenizer, 5, seed=7, exclude=set(first))
    assert not set(excluded) & set(first)
    with pytest.raises(ValueError, match="left"):
        ident.pick_identifiers(clip_tokenizer, 10**6)


@pytest.mark.parametrize(
    "text,expect",
    [
        ("sks", None),
        ("xxy5syt00", "splits into"),
        ("unique", "common word"),
        ("special", "common word"),
    ],
)
def test_user_identifier_warnings_explain_the_paper(clip_tokenizer, text, expect):
    report = ident.check_identifier(clip_tokenizer, text)
    if expect is None:
        assert report.warnings == []
        assert len(report.token_ids) == 1
    else:
        assert any(expect in w and "§3.2" in w for w in report.warnings), report.warnings
