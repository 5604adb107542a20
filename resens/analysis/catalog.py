"""The order a run's analyses go in, from what each declares it needs.

Each analysis (a class registered in ``callbacks/``, the one registry of analyses) declares what
it ``requires`` (analyses that must run first: switching one of them off is a config error) and
what it ``uses`` (analyses whose results it reads when they run; they run first but may be
switched off). :func:`run_order` turns those declarations into the order of a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from resens.errors import ConfigError


def run_order(
    wanted: Iterable[str],
    listing: Sequence[str],
    requires: Mapping[str, Sequence[str]],
    uses: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """The analyses ``wanted``, each after those it requires and those it uses that are wanted.

    ``requires[a]`` / ``uses[a]``: the names ``a`` depends on (a name missing from a mapping has
    none). Among analyses free to run, the one first in ``listing`` (every known analysis, in registration order) goes first, so
    the result does not depend on the order of ``wanted``. Raises ``ConfigError`` (one line) when
    a wanted analysis requires one that is not wanted, ``ValueError`` when the declarations form
    a cycle.
    """
    uses = uses or {}
    chosen = list(dict.fromkeys(wanted))
    unknown = [a for a in chosen if a not in listing]
    if unknown:
        raise ConfigError(f"analysis.run: unknown analysis '{unknown[0]}' (choose from {', '.join(listing)})")
    for a in chosen:
        for need in requires.get(a, ()):
            if need not in chosen:
                raise ConfigError(
                    f"analysis.run: '{a}' requires '{need}', which is switched off (add '{need}' "
                    f"to analysis.run or remove '{a}')"
                )
    before = {a: {d for d in (*requires.get(a, ()), *uses.get(a, ())) if d in chosen} for a in chosen}
    order: list[str] = []
    pending = sorted(chosen, key=list(listing).index)
    while pending:
        ready = next((a for a in pending if before[a] <= set(order)), None)
        if ready is None:
            raise ValueError(f"analyses depend on each other in a cycle: {', '.join(pending)}")
        order.append(ready)
        pending.remove(ready)
    return order
