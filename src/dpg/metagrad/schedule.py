"""Which inner steps' states are kept for the reverse sweep, and which are recomputed.

The reverse sweep needs step t's record (θ_{t−1}, and for AdamW g_t, m_t, v_t) for
t = M..1. Keeping all M records costs M·4·|θ| (AdamW); a k-ary checkpoint tree (REPLAY,
Engstrom et al. 2025) keeps O(k·log_k M) items and recomputes the rest:

  segment [a, b] with the state s_a at hand:
    b − a ≤ k:  run steps a+1..b saving their records, then consume them in reverse
    otherwise:  cut it into k children; run a+1..c_{k−1} saving the states s_{c_1..c_{k−1}};
                then treat the children last to first, each from its saved start state

The first (forward) run must reach θ_M anyway, so it lays out the rightmost path of the
tree as it goes and that path is never recomputed. k ≥ M is the all-saved schedule (no
recomputation); each extra tree level adds up to one more forward run over the steps.
A recomputed step runs the same code on the same bits, so it reproduces the saved run's
state exactly. This module is pure bookkeeping: a schedule is a list of actions that
`dpg.metagrad.inner` carries out and that `peak` can replay without any tensor.

    ("restore", c)      make s_c the current state (c = 0: the fresh start, never stored)
    ("run", t, save)    step t from the current state; save: "record", "state" or None
    ("reverse", t)      hand record t to the reverse sweep, which drops it
    ("free", c)         drop the saved state s_c
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from dpg.errors import DpgError

Action = tuple


class Plan(NamedTuple):
    k: int  # branching of the checkpoint tree (k ≥ M: every record saved, nothing recomputed)
    levels: int  # tree levels: 1 = all saved; each further level recomputes up to M steps once more
    actions: tuple[Action, ...]  # what the engine does, in order
    runs: int  # inner steps executed in all (M of them in the forward run)
    peak_items: int  # records and states held at once, at most
    peak_bytes: int  # their bytes, at most


def tree_actions(m: int, k: int) -> list[Action]:
    """The k-ary checkpoint tree over M steps as a list of actions."""
    if m < 1 or k < 2:
        raise ValueError(f"need M ≥ 1 and k ≥ 2, got M = {m}, k = {k}")
    saves: dict[int, str] = {}
    _spine(0, m, k, saves)
    out: list[Action] = [("restore", 0)] + [("run", t, saves.get(t)) for t in range(1, m + 1)]
    _reverse(0, m, k, True, out, [m])
    return out


def _cuts(a: int, b: int, k: int) -> list[int]:
    return [a + (b - a) * i // k for i in range(k + 1)]  # k children, sizes differ by ≤ 1


def _spine(a: int, b: int, k: int, saves: dict[int, str]) -> None:
    """What the first run saves: the child states along the rightmost path, then its leaf's records."""
    if b - a <= k:
        saves.update({t: "record" for t in range(a + 1, b + 1)})
        return
    cuts = _cuts(a, b, k)
    saves.update({c: "state" for c in _saved_cuts(cuts, b, k)})
    _spine(cuts[-2], b, k, saves)


def _saved_cuts(cuts: list[int], b: int, k: int) -> list[int]:
    # The last child starts where the run that lays out this segment stops; when it is a
    # leaf it goes on from that live state, so its start state is never needed again.
    return cuts[1:-2] if b - cuts[-2] <= k else cuts[1:-1]


def _reverse(a: int, b: int, k: int, done: bool, out: list[Action], cur: list[int]) -> None:
    """Records b..a+1 in reverse order. `done`: the first run already laid this segment out.
    `cur[0]`: the step whose state is current (live on the device)."""
    if b - a <= k:
        if not done:
            _run(a, range(a + 1, b + 1), {t: "record" for t in range(a + 1, b + 1)}, out, cur)
        out.extend(("reverse", t) for t in range(b, a, -1))
        return
    cuts = _cuts(a, b, k)
    saved = _saved_cuts(cuts, b, k)
    if not done:
        _run(a, range(a + 1, cuts[-2] + 1), dict.fromkeys(saved, "state"), out, cur)
    for i in range(k - 1, -1, -1):
        _reverse(cuts[i], cuts[i + 1], k, done and i == k - 1, out, cur)
        if cuts[i] in saved:
            out.append(("free", cuts[i]))


def _run(a: int, steps: range, saves: dict[int, str], out: list[Action], cur: list[int]) -> None:
    if cur[0] != a:
        out.append(("restore", a))
    out.extend(("run", t, saves.get(t)) for t in steps)
    cur[0] = steps[-1]


def is_direct(actions: tuple[Action, ...] | list[Action], i: int) -> bool:
    """A record consumed by the very next action stays where it is (it is never stored)."""
    act = actions[i]
    return act[0] == "run" and act[2] == "record" and i + 1 < len(actions) and actions[i + 1] == ("reverse", act[1])


def peak(actions: list[Action], record_units: tuple[int, int], state_units: int, unit: int) -> tuple[int, int]:
    """(items, bytes) held at most. record_units: (step 1, later steps) in |θ|-sized tensors."""
    held: dict[tuple[str, int], int] = {}
    most_items = most_bytes = 0
    for i, act in enumerate(actions):
        if act[0] == "run" and act[2] is not None and not is_direct(actions, i):
            kind, t = act[2], act[1]
            units = state_units if kind == "state" else record_units[t > 1]
            held[(kind, t)] = units * unit
        elif act[0] == "reverse":
            held.pop(("record", act[1]), None)
        elif act[0] == "free":
            del held[("state", act[1])]
        most_items, most_bytes = max(most_items, len(held)), max(most_bytes, sum(held.values()))
    return most_items, most_bytes


@functools.lru_cache(maxsize=64)
def choose(m: int, adam: bool, unit: int, budget: int | None, k: int | None = None) -> Plan:
    """The schedule with the fewest recomputed steps whose saved items fit in `budget` bytes.

    unit: bytes of one |θ|-sized tensor (the trainable parameters in the engine dtype).
    A record is θ_{t−1} (none for t = 1: θ_0 is always at hand) plus g_t, m_t, v_t for
    AdamW; a state is θ_t plus m_t, v_t. `k` forces the tree's branching.
    """
    record_units, state_units = (3, 4) if adam else (0, 1), 3 if adam else 1
    candidates = [k] if k is not None else _branchings(m)
    best = None
    for kk in candidates:
        plan = _plan(m, max(2, min(kk, m)), record_units, state_units, unit)
        fits = budget is None or plan.peak_bytes <= budget
        if fits and (best is None or (plan.runs, plan.peak_bytes) < (best.runs, best.peak_bytes)):
            best = plan
        if fits and plan.runs == m:
            break  # nothing recomputed: no schedule does better
    if best is None:
        least = _plan(m, max(2, min(k or 2, m)), record_units, state_units, unit).peak_bytes
        if k is None:
            least = min(least, *(_plan(m, kk, record_units, state_units, unit).peak_bytes for kk in _branchings(m)))
        raise DpgError(
            f"recipe.state_budget_gb = {budget / 2**30:.3g} GB cannot hold the saved states of M = {m} inner "
            f"steps: the smallest checkpoint schedule needs {least / 2**30:.3g} GB (one step's state is "
            f"{state_units * unit / 2**30:.3g} GB); raise recipe.state_budget_gb "
            "(with offload 'disk' it bounds disk space, not memory)"
        )
    return best


def _branchings(m: int) -> list[int]:
    """k to try: all saved first, every k up to 64, then k growing by ~8 % (long runs stay quick to plan)."""
    ks, k = list(range(2, min(m, 65))), 64.0
    while k * 1.08 < m:
        k *= 1.08
        ks.append(int(k))
    return [m] + sorted(set(ks))


def _plan(m: int, k: int, record_units: tuple[int, int], state_units: int, unit: int) -> Plan:
    actions = tree_actions(m, k)
    items, nbytes = peak(actions, record_units, state_units, unit)
    levels, span = 1, k
    while span < m:
        levels, span = levels + 1, span * k
    runs = sum(1 for a in actions if a[0] == "run")
    return Plan(k, levels, tuple(actions), runs, items, nbytes)


def describe(plan: Plan, m: int) -> str:
    """One line for logs: which schedule runs, what it holds and recomputes."""
    if plan.runs == m:
        return f"all {m} step states saved ({plan.peak_bytes / 2**30:.3g} GB at most), nothing recomputed"
    return (
        f"{plan.k}-ary checkpoint tree, {plan.levels} levels: at most {plan.peak_items} saved items "
        f"({plan.peak_bytes / 2**30:.3g} GB) at once, {plan.runs - m} of {m} steps recomputed"
    )
