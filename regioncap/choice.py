"""``Choice``: the base of every closed choice of a config field (a leaf: standard library only).

Apart from :mod:`regioncap.config` so that a component's module (a proposer's
``Config``) can declare its own choices without importing the schema module.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A closed choice of a config field: Hydra rejects any other value while composing.

    A ``str`` whose value is its name, so code compares it with plain strings
    (``cfg.prompt.strategy == "crop"``) and it prints and serialises as the string.
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)
