"""The defense families, by name: each is one module with a ``DefenseFamily`` subclass,
registered here. A space's ``family:`` names one; the rest of ``orchestrator/`` looks it up
(``get_family``) and asks it, never comparing names.

To add a family: write ``orchestrator/families/<name>.py`` with a ``DefenseFamily`` subclass
and register an instance below (``tests/test_family_contract.py`` then runs it through every
family's checks). Register it here, not in a script: every Ray worker rebuilds the space from
its JSON and looks its family up by name, so the registration must happen on import of this
package, on every node."""

from __future__ import annotations

from orchestrator.families.adversarial import AdversarialFamily
from orchestrator.families.base import DefenseFamily
from orchestrator.families.ibp import IBPFamily
from orchestrator.families.lesci import LESCIFamily

__all__ = ["DefenseFamily", "register", "get_family", "family_names"]

_FAMILIES: dict[str, DefenseFamily] = {}


def register(family: DefenseFamily) -> DefenseFamily:
    """Make ``family`` available to spaces as ``family: <family.name>``."""
    if not family.name or family.name in _FAMILIES:
        raise ValueError(f"a family needs a new name, got {family.name!r}")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> DefenseFamily:
    """The registered family ``name``; ``ValueError`` listing the names otherwise."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; allowed: {', '.join(_FAMILIES)}") from None


def family_names() -> list[str]:
    return list(_FAMILIES)


for _family in (LESCIFamily(), IBPFamily(), AdversarialFamily()):
    register(_family)
