"""The identity-term lexicon and the occupation x pronoun pairs the project ships
(resources/identity_terms.yaml; its comments say where each list comes from)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

RESOURCE = Path(__file__).parent / "resources" / "identity_terms.yaml"
GROUPS = ("gender", "race", "religion")


@functools.cache
def _resource() -> dict[str, Any]:
    return yaml.safe_load(RESOURCE.read_text(encoding="utf-8"))


def lexicon_words(groups: list[str] | tuple[str, ...] = GROUPS) -> list[str]:
    """The group words of the given lexicon groups (all three by default), in file order."""
    data = _resource()
    return [w for g in (groups or GROUPS) for w in data[g]]


def pronoun_pairs() -> list[dict[str, str]]:
    """`builtin:pronoun_pairs`: every occupation x template, once with he/his (sent_more) and once
    with she/her (sent_less); the two sentences differ in exactly one word. 40 x 5 = 200 pairs."""
    data = _resource()
    out = []
    for occ in data["occupations"]:
        for t in data["templates"]:
            more, less = t.format(occ=occ, p="he", pos="his"), t.format(occ=occ, p="she", pos="her")
            out.append({"bias_type": "gender", "occupation": occ, "sent_more": more, "sent_less": less, "text": more})
    return out
