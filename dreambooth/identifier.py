"""Rare-token identifiers [V] (paper §3.2), searched in the model's own tokenizer vocabulary.

Owns: the candidate rules, the deterministic draw, and the warnings for a user-chosen identifier.

Why rare tokens: a common word ("unique") must first be unlearned, and a random letter string
("xxy5syt00") is split into single letters that carry strong priors. The paper therefore looks up
rare tokens and decodes them back to text. For CLIP's byte-level BPE (Stable Diffusion), token ids
are the order in which merges were learned, i.e. roughly by descending frequency; ids 0-511 are the
single bytes. We draw from ``CLIP_RANK_RANGE = (40000, 49406)``, the last ~20 % of merges: rare
enough that the text encoder has a weak prior for them (the community's ``sks`` is id 48136), while
every candidate is still a whole word-final token. Candidates must also:

- decode to 2-3 lowercase ASCII letters (typeable, no spaces, no digits: numbers carry meaning),
- re-tokenize to exactly that one token (so the text the user types is the token we chose), and
  to one token in every other tokenizer of the model (SDXL has two),
- not be an English word: wordfreq's Zipf frequency below ``MAX_WORD_ZIPF``.

About 300 single tokens pass. Where more distinct identifiers are needed (a bulk run of thousands
of subjects that asks for distinct ones), the draw goes on to sequences of 2 and then 3 of them,
space-separated so that each word stays its own token ("sks ohw"): the paper's [V] is a sequence
of 1-3 rare tokens. That gives ~90 thousand pairs and ~28 million triples.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Collection, Iterator, Sequence

from wordfreq import zipf_frequency

CLIP_RANK_RANGE = (40000, 49406)
"""Token-id range searched for CLIP tokenizers (end exclusive: 49406 is <|startoftext|>)."""

MAX_WORD_ZIPF = 2.5
"""Zipf frequency (log10 of uses per billion words) at or above which text counts as a word."""

COMMON_TOKEN_RANK = 10000
"""A token with an id below this is frequent in CLIP's training text: its prior is strong."""

_LETTERS = re.compile(r"^[a-z]{2,3}$")


def _text_of(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]).strip()


def is_english_word(text: str) -> bool:
    return zipf_frequency(text, "en") >= MAX_WORD_ZIPF


@lru_cache(maxsize=8)
def _candidates_cached(tokenizer_key: str, tokenizer) -> tuple[str, ...]:
    lo, hi = CLIP_RANK_RANGE
    hi = min(hi, len(tokenizer))
    found = []
    for token_id in range(lo, hi):
        token = tokenizer.convert_ids_to_tokens(token_id)
        if not token.endswith("</w>"):  # must be a whole word, not a word piece
            continue
        text = _text_of(tokenizer, token_id)
        if not _LETTERS.match(text) or is_english_word(text):
            continue
        if tokenizer(text, add_special_tokens=False).input_ids != [token_id]:
            continue
        found.append(text)
    return tuple(found)


def _key(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") + str(len(tokenizer))


def _is_one_token(tokenizer, text: str) -> bool:
    return len(tokenizer(text, add_special_tokens=False).input_ids) == 1


def rare_token_candidates(tokenizer, *others) -> list[str]:
    """All identifiers that pass the rules above in ``tokenizer``, in its token-id order, that are also
    one token in each of ``others`` (a model's further tokenizers: SDXL's second)."""
    found = _candidates_cached(_key(tokenizer), tokenizer)
    return [text for text in found if all(_is_one_token(other, text) for other in others)]


MAX_SEQUENCE = 3
"""Longest identifier drawn, in rare tokens."""


class IdentifierDrawer:
    """Deterministic draws from one vocabulary's candidates: single tokens first, then pairs, then triples.

    For each seed, the order is a seeded permutation of the single tokens, then of all pairs, then
    seeded random triples. ``draw(seed, taken)`` returns the next identifier of that order not in
    ``taken``; a cursor per seed makes thousands of draws linear rather than quadratic.
    """

    def __init__(self, candidates: list[str]):
        if not candidates:
            raise ValueError("the tokenizer has no rare-token candidates; pass --identifier explicitly")
        self._candidates = list(candidates)
        self._orders: dict[int, Iterator[str]] = {}

    def _order(self, seed: int) -> Iterator[str]:
        rng = random.Random(seed)
        singles = self._candidates
        # sample(pool, len(pool)) starts with the same pick as sample(pool, 1): single draws stay stable.
        yield from rng.sample(singles, len(singles))
        pairs = [f"{a} {b}" for a in singles for b in singles if a != b]
        yield from rng.sample(pairs, len(pairs))
        while True:
            yield " ".join(rng.sample(singles, MAX_SEQUENCE)) if len(singles) >= MAX_SEQUENCE else singles[0]

    def draw(self, seed: int = 0, taken: Collection[str] = frozenset()) -> str:
        order = self._orders.setdefault(seed, self._order(seed))
        for _ in range(10_000_000):
            ident = next(order)
            if ident not in taken:
                return ident
        raise ValueError("no identifier left that is not taken; pass --identifier explicitly")


def drawer_for(tokenizer, *others) -> IdentifierDrawer:
    """A new drawer over a tokenizer's (cached) candidates that are single tokens in ``others`` too.
    Keep one per bulk run: its cursors are its state."""
    return IdentifierDrawer(rare_token_candidates(tokenizer, *others))


def pick_identifiers(tokenizer, count: int = 1, seed: int = 0, exclude: Collection[str] = frozenset(),
                     others: Sequence = ()) -> list[str]:
    """Draw ``count`` distinct identifiers deterministically (same seed, same vocabulary → same picks).

    ``exclude`` holds identifiers already taken (e.g. by other subjects of a bulk run). Single rare
    tokens come first; 2- and 3-token sequences follow once they run out. ``others``: the model's
    further tokenizers, in which each rare token must be one token too.
    """
    drawer = drawer_for(tokenizer, *others)
    picked: list[str] = []
    taken = set(exclude)
    for _ in range(count):
        picked.append(drawer.draw(seed, taken))
        taken.add(picked[-1])
    return picked


@dataclass(frozen=True)
class IdentifierReport:
    """What the tokenizer makes of an identifier, and why it may be a poor choice."""

    identifier: str
    token_ids: list[int]
    warnings: list[str]


def check_identifier(tokenizer, identifier: str, *others) -> IdentifierReport:
    """Explain (as warnings, not errors) why a user-given identifier may train poorly; ``others`` are
    the model's further tokenizers (SDXL's second), where it must split as in the first."""
    ids = tokenizer(identifier, add_special_tokens=False).input_ids
    pieces = [tokenizer.convert_ids_to_tokens(i).removesuffix("</w>") for i in ids]
    warnings = []
    if len(ids) > 3 or (len(ids) > 1 and any(len(p) == 1 for p in pieces)):
        warnings.append(
            f"identifier {identifier!r} splits into {len(ids)} tokens {pieces}: the paper (§3.2) warns that "
            "strings the tokenizer splits into many pieces or single letters inherit those pieces' strong "
            "priors; prefer a single rare token (`dreambooth identifier` lists some) or --identifier auto"
        )
    if is_english_word(identifier.lower()) or (len(ids) == 1 and ids[0] < COMMON_TOKEN_RANK):
        warnings.append(
            f"identifier {identifier!r} is a common word or a frequent token: the paper (§3.2) notes the "
            "model must first unlearn its meaning before binding it to your subject; prefer a rare token "
            "(--identifier auto)"
        )
    for number, other in enumerate(others, start=2):
        other_ids = other(identifier, add_special_tokens=False).input_ids
        if len(other_ids) != len(ids):
            warnings.append(
                f"identifier {identifier!r} is {len(ids)} token(s) for the first tokenizer but {len(other_ids)} for "
                f"tokenizer {number}: the text encoders would bind different pieces to the subject; prefer one "
                "that is a single token for both (--identifier auto draws such)"
            )
    return IdentifierReport(identifier, ids, warnings)
