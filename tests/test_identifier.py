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


def test_thousands_of_distinct_identifiers_go_on_to_sequences_of_rare_tokens(clip_tokenizer):
    """~300 single rare tokens pass the rules; a bulk run of 1,000 subjects still gets distinct ones."""
    singles = ident.rare_token_candidates(clip_tokenizer)
    picked = ident.pick_identifiers(clip_tokenizer, len(singles) + 700, seed=3)
    assert len(set(picked)) == len(picked)
    assert set(picked[: len(singles)]) == set(singles)  # every single token before any pair
    pairs = picked[len(singles):]
    assert all(len(p.split(" ")) == 2 for p in pairs)
    for pair in pairs[:50]:  # each word stays its own rare token
        ids = clip_tokenizer(pair, add_special_tokens=False).input_ids
        assert ids == [clip_tokenizer(w, add_special_tokens=False).input_ids[0] for w in pair.split(" ")]
        assert len(ids) == 2


def test_drawer_is_fast_and_agrees_with_single_picks(clip_tokenizer):
    drawer = ident.drawer_for(clip_tokenizer)
    assert drawer.draw(11) == ident.pick_identifiers(clip_tokenizer, 1, seed=11)[0]
    taken: set[str] = set()
    for _ in range(10_000):
        taken.add(drawer.draw(0, taken))
    assert len(taken) == 10_000


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
