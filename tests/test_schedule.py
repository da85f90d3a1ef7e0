"""Checkpoint schedules (schedule.py) and the engine running them: recomputed steps give the
all-saved scores, the store never holds more than the schedule's bound, budgets are honoured."""

import pytest
import torch

from dpg import DpgError, Recipe, example_metagrads
from tqdm.auto import tqdm

from dpg.metagrad import inner, pinned
from dpg.metagrad.engine import plan_steps
from dpg.metagrad.inner import ScheduledRun
from dpg.metagrad.schedule import choose, peak, tree_actions
from dpg.metagrad.store import StepStore
from dpg.metagrad.target import prepared
from reference import VOCAB
from test_engine import head_metric, ragged_examples, rel_err

ADAM_UNITS = (3, 4), 3  # |θ|-sized tensors in a record (step 1, later) and in a state


def replayed(actions):
    """Carry out a schedule on integers (the 'state' after step t is t): the reversed steps,
    the steps run, and checks that every restore finds its state and every run continues."""
    saved, cur, reversed_steps, runs = {}, None, [], 0
    for act in actions:
        if act[0] == "restore":
            assert act[1] == 0 or saved[("state", act[1])] == act[1]
            cur = act[1]
        elif act[0] == "run":
            assert cur == act[1] - 1, act  # a step runs from the state just before it
            cur, runs = act[1], runs + 1
            if act[2] is not None:
                saved[(act[2], act[1])] = act[1]
        elif act[0] == "reverse":
            reversed_steps.append(saved.pop(("record", act[1])))
            cur = None  # nothing may continue from a state once the reverse sweep has moved on
        else:
            del saved[("state", act[1])]
    assert not saved  # everything saved is used and dropped
    return reversed_steps, runs


@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 16, 31, 96])
def test_every_tree_reverses_each_step_once_in_order(m):
    for k in range(2, m + 2):
        reversed_steps, runs = replayed(tree_actions(m, k))
        assert reversed_steps == list(range(m, 0, -1))
        levels = 1
        while k**levels < m:
            levels += 1
        assert m <= runs <= levels * m  # each level below the first reruns each step at most once
        if k >= m:
            assert runs == m  # all saved: nothing recomputed


def test_hand_worked_schedules():
    # M = 4, k = 2: children [0, 2], [2, 4]; the first run keeps records 3, 4 (4 goes straight
    # to the reverse sweep), then steps 1, 2 are rerun from the start.
    assert tree_actions(4, 2) == [
        ("restore", 0), ("run", 1, None), ("run", 2, None), ("run", 3, "record"), ("run", 4, "record"),
        ("reverse", 4), ("reverse", 3),
        ("restore", 0), ("run", 1, "record"), ("run", 2, "record"), ("reverse", 2), ("reverse", 1),
    ]  # fmt: skip
    # M = 7 (AdamW; record 4 units, 3 for step 1; state 3 units):
    #   k = 2: s3 + r6 held = 7 units; runs 7 + 2 (4, 5) + 3 (1, 2, 3) + 1 = 13
    #   k = 3: cuts 0, 2, 4, 7: s2 + r5 + r6 = 11 units; runs 7 + 2 + 2 = 11
    #   k = 4: cuts 0, 1, 3, 5, 7: s1 + s3 + r6 = 10 units; runs 7 + 2 + 2 + 1 = 12
    #   k = 7: r1..r6 = 3 + 5·4 = 23 units; runs 7
    for k, items, units, runs in [(2, 2, 7, 13), (3, 3, 11, 11), (4, 3, 10, 12), (7, 6, 23, 7)]:
        assert peak(tree_actions(7, k), *ADAM_UNITS, unit=1) == (items, units)
        assert replayed(tree_actions(7, k))[1] == runs
    # The budget picks the fewest runs that fit; ties in runs go to the smaller peak.
    assert [choose(7, True, 1, b).k for b in (23, 22, 11, 10, 7)] == [7, 3, 3, 4, 2]
    with pytest.raises(DpgError, match="smallest checkpoint schedule needs"):
        choose(7, True, 1, 6)
    # SGD: a record is θ_{t−1} alone (none for step 1), a state is θ_t.
    assert peak(tree_actions(7, 2), (0, 1), 1, unit=1) == (2, 2)


def small_model():
    """One layer, 8 wide: the recomputation tests run many inner steps."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=16, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config).to(torch.float64).eval()
    model.set_attn_implementation("sdpa")
    return model


def recipe_for(opt, m):
    return Recipe(optimizer=opt, lr=1e-2 if opt == "adamw" else 0.5, steps=m, batch_size=2, weight_decay=0.1)


def reversed_records(model, recipe, k, offload="cpu"):
    """The records the reverse sweep receives, in order, and the items the store held at once
    (counted here, independently of the store's own count)."""
    device = torch.device("cpu")
    opt = recipe.optimizer_record()
    store, held, most = StepStore(offload, device), set(), [0]
    put, drop = store.put, store.drop
    store.put = lambda key, record: (held.add(key), most.__setitem__(0, max(most[0], len(held))), put(key, record))
    store.drop = lambda key: (held.discard(key), drop(key))
    sched = choose(recipe.steps, opt.__class__.__name__ == "AdamW", 1, None, k)
    weights = torch.ones(6, dtype=torch.float64)
    with prepared(model, torch.float64, device) as target, tqdm(disable=True) as bar:
        plan = plan_steps(ragged_examples(), weights, recipe, device, torch.float64)
        run = ScheduledRun(target, opt, plan, sched.actions, store, bar, {})
        theta, losses = run.forward()
        out = [
            (t, {g: {n: x.clone() for n, x in ts.items()} for g, ts in rec.items()})
            for t, rec in run.reversed_records()
        ]
    store.close()
    return out, theta, losses, most[0], sched


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
@pytest.mark.parametrize("m", [1, 2, 7, 16])
def test_recomputed_records_are_bitwise_the_saved_ones(opt, m):
    """What the reverse sweep consumes, recomputed from checkpoints, equals the all-saved run's
    records bit for bit; the store holds no more than the schedule's bound."""
    model = small_model()
    saved, theta_saved, losses_saved, most, _ = reversed_records(model, recipe_for(opt, m), max(m, 2))
    assert [t for t, _ in saved] == list(range(m, 0, -1)) and most == max(m - 1, 0)  # record M never stored
    for k in (2, 3):
        offload = "disk" if m == 7 else "cpu"
        replayed_, theta, losses, most, sched = reversed_records(model, recipe_for(opt, m), k, offload)
        assert losses == losses_saved and all(torch.equal(theta[n], theta_saved[n]) for n in theta)
        for (t, rec), (t_saved, rec_saved) in zip(replayed_, saved, strict=True):
            assert t == t_saved and rec.keys() == rec_saved.keys()
            assert all(torch.equal(x, rec_saved[g][n]) for g, ts in rec.items() for n, x in ts.items()), (k, t)
        assert m <= k or sched.runs > m  # something was recomputed
        assert most == sched.peak_items <= (sched.levels - 1) * (k - 1) + k  # O(k log_k M)


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_recomputed_steps_give_the_all_saved_scores(opt):
    model = small_model()
    metric, recipe = head_metric(model), recipe_for(opt, 7)

    def run(k):
        return example_metagrads(model, ragged_examples(), recipe, metric, dtype=torch.float64, checkpoint_k=k)

    everything = run(7)
    assert everything.schedule["recomputed"] == 0
    for k in (2, 3) if opt == "adamw" else (2,):  # SGD's records: test_recomputed_records_are_bitwise...
        res = run(k)
        assert rel_err(res.scores, everything.scores) <= 1e-12, k
        s = res.schedule
        assert s["recomputed"] == s["runs"] - 7 > 0
        assert s["held_items"] == s["peak_items"] and s["held_bytes"] == s["peak_bytes"]


def test_budget_picks_the_schedule_and_one_too_small_fails_before_any_compute(monkeypatch):
    model = small_model()
    unit = sum(p.numel() * 8 for p in model.parameters())  # bytes of θ in fp64 (untied: every parameter)
    metric = head_metric(model)
    examples = ragged_examples()
    # 11 units fit the 3-ary tree over M = 7 (see test_hand_worked_schedules), not all-saved.
    recipe = Recipe(lr=1e-2, steps=7, batch_size=2, state_budget_gb=(11 * unit + 64) / 2**30)
    res = example_metagrads(model, examples, recipe, metric, dtype=torch.float64)
    assert res.schedule["k"] == 3 and res.schedule["held_bytes"] == res.schedule["peak_bytes"] == 11 * unit
    assert res.schedule["recomputed"] == 4
    assert res.timings["replay"] > 0
    calls = []
    monkeypatch.setattr(inner, "train_step", lambda *a, **k: calls.append(1))
    tiny = Recipe(lr=1e-2, steps=7, batch_size=2, state_budget_gb=unit / 2**30)  # less than one state (3 units)
    with pytest.raises(DpgError, match="recipe.state_budget_gb"):
        example_metagrads(model, examples, tiny, metric, dtype=torch.float64)
    assert not calls
    with pytest.raises(DpgError, match="state_budget_gb must be positive"):
        Recipe(state_budget_gb=0)


def test_pinned_chunks_pack_tensors_without_overlap():
    """The layout of saved tensors in pinned chunks (no CUDA needed to check the packing)."""
    mib = 2**20
    record = {
        "theta": {"a": torch.empty(40 * mib, dtype=torch.uint8), "b": torch.empty(7 * mib // 4)},  # 40, 7 MiB
        "g": {"a": torch.empty(40 * mib, dtype=torch.uint8), "c": torch.empty(100 * mib // 8, dtype=torch.float64)},
        "m": {"d": torch.empty(3)},  # 12 bytes: padded to 64
    }
    size = pinned.chunk_bytes(record)
    assert size == 128 * mib  # the largest tensor (100 MiB) rounded up to a power of two
    layout = pinned.pack(record, size)
    # First fit, largest first: [c 100, b 7, d] and [a 40, a 40]: two chunks.
    assert [sorted(name for _, name, _ in chunk) for chunk in layout] == [["b", "c", "d"], ["a", "a"]]
    for chunk in layout:
        spans = sorted((off, off + record[g][n].nbytes) for g, n, off in chunk)
        assert all(off % 64 == 0 for off, _ in spans) and spans[-1][1] <= size
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
