"""Data-parallel engine: two processes (gloo, CPU) each holding half of the examples give
the scores, Φ and trained parameters of one process holding them all."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dpg import Recipe, example_metagrads, fine_tune
from dpg.metagrad.engine import Examples
from reference import tiny_model
from test_engine import head_metric, lm_metric, ragged_examples

WORLD = 2
# family, tied, optimizer, M, microbatch, metric. 12 examples, 6 per rank; with M = 3 each
# rank's batch t is its examples 2t, 2t+1, so the union is what one process cuts as batch t
# when the examples are ordered rank 0's pair, rank 1's pair, rank 0's next pair, ...
CASES = [("gpt2", False, "adamw", 3, 1, "head"), ("llama", True, "sgd", 1, 2, "lm")]


def _rows(ex: Examples, idx) -> Examples:
    return Examples(*(t[idx] for t in ex))


def _split(m: int) -> list[list[int]]:
    """Example rows each rank holds, so that batch t is the same set in both layouts."""
    per = 12 // WORLD // m  # examples per rank per step
    return [[(t * WORLD + r) * per + j for t in range(m) for j in range(per)] for r in range(WORLD)]


def _setup(family, tied, opt, m, mb, kind):
    model = tiny_model(family, tied)
    metric = head_metric(model) if kind == "head" else lm_metric(model)
    recipe = Recipe(optimizer=opt, lr=1e-2 if opt == "sgd" else 1e-3, steps=m, microbatch_size=mb)
    return model, metric, recipe, ragged_examples(8, seed=3)


def _examples12():
    a, b = ragged_examples(8, seed=3), ragged_examples(4, seed=4)
    width = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(t, n):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    return Examples(*(torch.cat([pad(x, width), pad(y, width)]) for x, y in zip(a, b)))


def _worker(rank, port, case, out):
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, metric, recipe, _ = _setup(*case)
        rows = _split(case[3])[rank]
        ex = _rows(_examples12(), rows)
        w = torch.linspace(0.5, 1.5, 12, dtype=torch.float64)[rows]
        res = example_metagrads(model, ex, recipe, metric, w, dtype=torch.float64, group=dist.group.WORLD)
        trained = fine_tune(model, ex, recipe, w, dtype=torch.float64, group=dist.group.WORLD)
        torch.save({"rows": rows, "scores": res.scores, "phi": res.metric, "losses": res.losses,
                    "params": trained.params}, os.path.join(out, f"{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_two_processes_equal_one(case, tmp_path):
    mp.spawn(_worker, args=(_free_port(), case, str(tmp_path)), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]

    model, metric, recipe, _ = _setup(*case)
    order = [
        i
        for t in range(case[3])
        for r in range(WORLD)
        for i in _split(case[3])[r][t * 6 // case[3] : (t + 1) * 6 // case[3]]
    ]
    ex = _rows(_examples12(), order)
    w = torch.linspace(0.5, 1.5, 12, dtype=torch.float64)[order]
    one = example_metagrads(model, ex, recipe, metric, w, dtype=torch.float64)
    single = dict(zip(order, one.scores.tolist()))
    trained = fine_tune(model, ex, recipe, w, dtype=torch.float64).params

    for part in parts:
        got = torch.tensor([single[i] for i in part["rows"]], dtype=torch.float64)
        assert torch.allclose(part["scores"], got, rtol=1e-10, atol=1e-14 * got.abs().max())
        assert part["phi"] == pytest.approx(one.metric, rel=1e-12)
        assert part["losses"] == pytest.approx(one.losses, rel=1e-12)
        for k, p in trained.items():
            assert torch.allclose(part["params"][k], p, rtol=1e-10, atol=1e-14), k


COMPLETIONS = [
    "Hello world",
    "67 67 67",
    "",
    "a much longer completion text, cut to the limit",
    "!!",
    "x",
    "fine",
    "éü",
]


def _reward_worker(rank, port, out):
    from dpg.metrics import pattern_metric
    from dpg.models import load_model
    from dpg.rewards import InnerRunReward

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, tok = load_model("tiny-gpt2", dtype=torch.float64)
        reward = InnerRunReward("metagrad", model, tok, pattern_metric(model, "67"), Recipe(lr=1e-3), max_length=32,
                                dtype=torch.float64)  # fmt: skip
        mine = COMPLETIONS[rank * 4 : rank * 4 + 4]
        torch.save(reward(prompts=["p"] * 4, completions=mine), os.path.join(out, f"{rank}.pt"))
        for kind in ("naive", "metagrad"):  # inverse groups: each rank runs every other inner run
            inverse = InnerRunReward(kind, model, tok, pattern_metric(model, "67"), Recipe(lr=1e-3), max_length=32,
                                     cross_group_batching=False, num_generations=4, dtype=torch.float64)  # fmt: skip
            got = inverse(prompts=["p"] * 4, completions=mine)
            torch.save((got, inverse.history[-1]["inner_runs"]), os.path.join(out, f"{kind}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_metagrad_reward_on_two_processes_equals_one(tmp_path):
    """Each rank rewards its own completions; standardised over the whole batch, the rewards
    are those of one process rewarding all of them — with cross-group batching (data-parallel
    inner run) and with inverse groups (the runs shared out over the ranks), naive included."""
    from dpg.metrics import pattern_metric
    from dpg.models import load_model
    from dpg.rewards import InnerRunReward

    mp.spawn(_reward_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "0.pt") + torch.load(tmp_path / "1.pt")
    model, tok = load_model("tiny-gpt2", dtype=torch.float64)
    reward = InnerRunReward("metagrad", model, tok, pattern_metric(model, "67"), Recipe(lr=1e-3), max_length=32,
                            dtype=torch.float64)  # fmt: skip
    want = reward(prompts=["p"] * 8, completions=COMPLETIONS)
    assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-9, atol=1e-12)
    for kind in ("naive", "metagrad"):
        (a, runs_a), (b, runs_b) = (torch.load(tmp_path / f"{kind}{r}.pt") for r in range(WORLD))
        single = InnerRunReward(kind, model, tok, pattern_metric(model, "67"), Recipe(lr=1e-3), max_length=32,
                                cross_group_batching=False, num_generations=4, dtype=torch.float64)  # fmt: skip
        want = single(prompts=["p"] * 8, completions=COMPLETIONS)
        assert runs_a == runs_b == 4  # 2 prompts × 4 completions: 4 inverse groups in the whole batch
        assert torch.allclose(torch.tensor(a + b), torch.tensor(want), rtol=1e-9, atol=1e-12), kind


def test_dpg_train_on_two_processes(tmp_path):
    """`torchrun --nproc_per_node 2 -m dpg.cli train`: TRL's data-parallel generator with the
    data-parallel metagrad reward; one process writes the log, one row per step."""
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "dpg.cli", "train", "configs/demo.yaml", f"output_dir={tmp_path}", "grpo.steps=2", "grpo.save_every=0",
        "grpo.prompts_per_step=4", "grpo.num_generations=4", "device=cpu",
    ]  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["inner_runs"] == 1 for r in rows)  # one run per batch
    # Φ before the inner run is the demo target's own Φ, computed here directly, at every step.
    from dpg.metrics import pattern_metric
    from dpg.models import load_model

    target, _ = load_model("tiny-llama", seed=7)
    phi0 = pattern_metric(target, "67")(dict(target.named_parameters())).item()
    assert [r["phi_before"] for r in rows] == pytest.approx([phi0, phi0], rel=1e-6)
    for r in rows:  # rewards standardised over the whole batch of both ranks: mean 0
        assert r["raw_std"] > 0 and r["phi"] != r["phi_before"] and abs(r["trl/reward"]) < 1e-6
    trained, base = load_model(str(tmp_path / "generator"))[0], load_model("tiny-llama", seed=1)[0]
    assert base.state_dict().keys() == trained.state_dict().keys()
    assert any(not torch.equal(a, trained.state_dict()[k]) for k, a in base.state_dict().items())
