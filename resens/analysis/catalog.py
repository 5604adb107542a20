"""The analyses resens knows by name, and the order they run in.

This module is the list ``analysis.run`` is validated against (``resens.config``), without
importing Lightning or the callbacks. Each name has one class in ``callbacks/`` registered with
``@register_analysis``; that class declares what it ``requires`` (analyses that must run first:
switching them off is a config error) and what it ``uses`` (analyses whose results it reads when
they run; they run first but may be switched off). :func:`run_order` turns those declarations
into the order of a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from resens.errors import ConfigError

# Listing order: the tie-break of run_order, so the order of a run never depends on the order
# of analysis.run.
ANALYSES: tuple[str, ...] = (
    "single_deletion",
    "multi_deletion",
    "reorder",
    "duplication",
    "path_lengths",
    "path_gradient",
    "effective_paths",
    "stochastic_depth",
)


def analysis_names() -> tuple[str, ...]:
    """Every analysis name ``analysis.run`` may list, in listing order."""
    return ANALYSES


def run_order(
    wanted: Iterable[str],
    requires: Mapping[str, Sequence[str]],
    uses: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """The analyses ``wanted``, each after those it requires and those it uses that are wanted.

    ``requires[a]`` / ``uses[a]``: the names ``a`` depends on (a name missing from a mapping has
    none). Among analyses free to run, the one listed first in :data:`ANALYSES` goes first, so
    the result does not depend on the order of ``wanted``. Raises ``ConfigError`` (one line) when
    a wanted analysis requires one that is not wanted, ``ValueError`` when the declarations form
    a cycle.
    """
    uses = uses or {}
    chosen = list(dict.fromkeys(wanted))
    unknown = [a for a in chosen if a not in ANALYSES]
    if unknown:
        raise ConfigError(f"analysis.run: unknown analysis '{unknown[0]}' (choose from {', '.join(ANALYSES)})")
    for a in chosen:
        for need in requires.get(a, ()):
            if need not in chosen:
                raise ConfigError(
                    f"analysis.run: '{a}' requires '{need}', which is switched off (add '{need}' "
                    f"to analysis.run or remove '{a}')"
                )
    before = {a: {d for d in (*requires.get(a, ()), *uses.get(a, ())) if d in chosen} for a in chosen}
    order: list[str] = []
    pending = sorted(chosen, key=ANALYSES.index)
    while pending:
        ready = next((a for a in pending if before[a] <= set(order)), None)
        if ready is None:
            raise ValueError(f"analyses depend on each other in a cycle: {', '.join(pending)}")
        order.append(ready)
        pending.remove(ready)
    return order
