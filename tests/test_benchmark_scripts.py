"""Every benchmark script's imports from dpg name things that exist: a script nobody ran
since the engine moved on fails here, not on the GPU machine where its time is dear."""

import ast
import importlib.util
import json
import os
import sys
import tarfile
import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def dpg_imports(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) for each `from dpg... import name` in the file, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "dpg":
            found += [(node.module, a.name, node.lineno) for a in node.names]
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_imports_resolve(path):
    missing = []
    for module, name, line in dpg_imports(path):
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            try:  # `from pkg import submodule`
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"line {line}: {module}.{name}")
    assert not missing, f"{path.name} imports what dpg no longer has: {missing}"


def test_the_check_finds_a_missing_name(tmp_path):
    script = tmp_path / "old.py"
    script.write_text("def main():\n    from dpg.metagrad.target import prepare_target, tangent_scores\n")
    module = "dpg.metagrad.target"
    assert dpg_imports(script) == [(module, "prepare_target", 2), (module, "tangent_scores", 2)]
    with pytest.raises(AssertionError, match="prepare_target"):
        test_benchmark_imports_resolve(script)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS[0].parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_results_table_lists_a_checkpoint_row(tmp_path, monkeypatch):
    """An unfinished run's transfer check (row `checkpoint-N`, as gpu_demo.sh PARTIAL=1 makes it)
    is a row of the table, named after the run and the checkpoint, with its own figures."""
    paper_results = load_script("paper_results")
    monkeypatch.setattr(paper_results, "RESULTS", tmp_path)
    rows = [
        {"generator": "base", "metric": -4.5, "proxy": {"loss": 4.5}, "text": {"share_de": 0.0}},
        {"generator": "checkpoint-872", "metric": -4.25, "proxy": {"loss": 4.25}, "text": {"share_de": 0.75}},
    ]
    (tmp_path / "german.evaluate.json").write_text(json.dumps(rows))
    lines = paper_results.table("german").splitlines()
    assert lines[2:] == ["| base | 1 | -4.5 | 4.5 | 0 |", "| metagrad (checkpoint-872) | 1 | -4.25 | 4.25 | 0.75 |"]


def test_paper_results_overlay_labels_each_run_with_its_demonstration(tmp_path, monkeypatch):
    """--overlay: the runs of two variants (DEMO_TAG) on one figure, each run labelled with its
    variant, its rows as its metrics.jsonl holds them; a single demonstration keeps plain labels."""
    paper_results = load_script("paper_results")
    monkeypatch.setattr(paper_results, "RESULTS", tmp_path)
    drawn = {}
    monkeypatch.setattr(paper_results, "plot_runs", lambda runs, path, title="": drawn.update({path.name: runs}))
    for stem, share in (("67_gpt2", 0.5), ("67_gpt2_batch", 1.0), ("67_gpt2_batch-naive", 0.25)):
        (tmp_path / f"{stem}.metrics.jsonl").write_text(json.dumps({"step": 1, "distinct_share": share}) + "\n")
    paper_results.curves(["67_gpt2", "67_gpt2_batch"], "ab")
    paper_results.curves("67_gpt2_batch")
    shares = {k: [r["distinct_share"] for r in rows] for k, rows in drawn["ab.curves.png"].items()}
    assert shares == {"67_gpt2 metagrad": [0.5], "67_gpt2_batch metagrad": [1.0], "67_gpt2_batch naive": [0.25]}
    assert set(drawn["67_gpt2_batch.curves.png"]) == {"metagrad", "naive"}


def test_paper_results_table_averages_the_seeds_and_takes_base_once(tmp_path, monkeypatch):
    """Several seeds of one generator make one row: their mean and [min, max]. The base generator
    comes from the first run's file only, ahead of every trained row."""
    paper_results = load_script("paper_results")
    monkeypatch.setattr(paper_results, "RESULTS", tmp_path)

    def row(generator, acc):
        return {"generator": generator, "metric": -acc, "proxy": {"pixel_accuracy": acc}, "text": {}}

    metagrad = [row("base", 0.25), row("base", 0.5), row("trained", 0.75), row("trained", 1.0)]
    naive = [row("base", 0.125), row("trained", 0.5) | {"samples": ["a b", "c", "a b", "a b"]}]  # no text figures
    (tmp_path / "67.evaluate.json").write_text(json.dumps(metagrad))
    (tmp_path / "67-naive.evaluate.json").write_text(json.dumps(naive))
    (tmp_path / "67-naive.metrics.jsonl").write_text("")
    lines = paper_results.table("67").splitlines()
    assert lines[0] == "| 67 | seeds | Φ | pixel_accuracy | distinct_share | distinct_2 |"
    assert lines[2:] == [  # a file from before evaluate reported the text figures: counted from its samples
        "| base | 2 | -0.375 [-0.5, -0.25] | 0.375 [0.25, 0.5] | — | — |",
        "| metagrad | 2 | -0.875 [-1, -0.75] | 0.875 [0.75, 1] | — | — |",
        "| naive | 1 | -0.5 | 0.5 | 0.5 | 0.3333 |",  # 2 of 4 texts distinct; the bigram (a b) thrice
    ]


def test_metagrad_ratio_runs_every_case_on_the_tiny_shape(tmp_path):
    """The script runs its three cases one after another (a name reused inside the loop once fed
    the second case a dict of timings instead of the examples)."""
    import subprocess
    import sys

    out = tmp_path / "ratio.json"
    script = SCRIPTS[0].parent / "metagrad_ratio.py"
    args = [sys.executable, str(script), "--shape", "tiny", "--device", "cpu", "--reps", "1", "--out", str(out)]
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    got = json.loads(out.read_text())
    assert {"head", "lm_loss", "m4_head"} <= set(got)
    assert all(got[case]["seconds"] > 0 and got[case]["phases"]["train"] > 0 for case in ("head", "lm_loss", "m4_head"))


def test_inner_ops_counts_dpg_fine_tune_against_the_plain_loop(tmp_path):
    """dpg's inner fine-tune dispatches no more ops than the plain SFT loop at each microbatch
    (fewer since its optimizer packs parameters, optim.map_params: 0.6-0.7 of the plain loop's,
    whose CPU AdamW goes parameter by parameter), and far fewer at 4 times the microbatch, on
    the tiny GPT-2 (the counts are the profiler's, so a path that grew per-op overhead, or a
    microbatch setting that stopped taking effect, shows here)."""
    import subprocess
    import sys

    out = tmp_path / "ops.json"
    script = SCRIPTS[0].parent / "inner_ops.py"
    args = [sys.executable, str(script), "--shape", "tiny", "--device", "cpu", "--examples", "32", "--seq-len", "16",
            "--micro", "4", "16", "--reps", "1", "--out", str(out)]  # fmt: skip
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    rows = {r["micro"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(0.4 < r["ops_ratio"] < 1.1 and r["dpg_seconds"] > 0 for r in rows.values())
    for name in ("plain_ops", "dpg_ops"):  # 8 microbatches against 2; the optimizer step is the same
        assert 2.0 < rows[4][name] / rows[16][name] < 4.2


def test_pattern_reach_figures_by_hand():
    """Three contexts' head inputs over two hidden dims, a 2 × 2 pattern (dims × columns)."""
    import torch

    reach = load_script("pattern_reach").reach
    h = torch.tensor([[0.5, -2.0], [1.0, 0.3], [-0.7, 1.1]])
    pattern = torch.tensor([[1.0, -1.0], [1.0, 1.0]])  # column 0 = (+, +), column 1 = (−, +)
    out = reach(h, pattern)
    assert out["share_positive"] == [round(2 / 3, 4), round(2 / 3, 4)]
    assert out["pixel_ease_mean"] == pytest.approx(7 / 12) and out["pixel_ease_min"] == pytest.approx(1 / 3)
    # the typical signs are (+, +): column 0 holds them (2 of 2), column 1 either way 1 of 2
    assert out["typical_sign_accuracy"] == pytest.approx(3 / 4)
    assert out["column_share_mean"] == pytest.approx(1 / 3) and out["column_share_min"] == pytest.approx(1 / 3)


def test_tf32_grid_counts_by_hand():
    """Weights on the TF32 grid (low 13 bits 0), halfway (0x1000) and neither; vectors are not counted."""
    import torch

    grid_shares = load_script("tf32_grid").grid_shares
    bits = torch.tensor([[0x3F800000, 0x3F801000], [0x3F800001, 0x3F802000]], dtype=torch.int32)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(bits.view(torch.float32).clone())
    model.b = torch.nn.Parameter(torch.zeros(3))
    assert grid_shares(model) == {"matrix_weights": 4, "on_tf32_grid": 0.5, "halfway": 0.25}


def demo_repo(tmp_path: Path) -> tuple[Path, dict, Path]:
    """A copy of the benchmark scripts gpu_demo.sh runs, with the configs, and the environment
    that makes it train tiny models on the CPU: (repo, env, results folder)."""
    import shutil
    import sys

    root = SCRIPTS[0].parents[1]
    shared = root.parent / "shared" / "data" / "lohelp_en_de.tsv"
    if not shared.is_file():
        pytest.skip(f"{shared} is absent (the shared data beside the checkout)")
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    for name in ("gpu_demo.sh", "paper_results.py", "carry_run.py"):  # copies: results go beside them
        shutil.copy(root / "benchmarks" / name, repo / "benchmarks" / name)
    (repo / "configs").symlink_to(root / "configs")
    (tmp_path / "shared").symlink_to(root.parent / "shared")  # ../shared beside the repo, as on the device
    rows = [r for r in shared.read_text().splitlines() if len(r) < 200][:80]
    (tmp_path / "short.tsv").write_text("\n".join(rows) + "\n")
    tiny = [
        "generator.model=tiny-llama", "target.model=tiny-gpt2", "prompts.chat=false", "metric.vocab_offset=0",
        f"prompts.file={tmp_path / 'short.tsv'}", "prompts.limit=null", "prompts.heldout=4", "grpo.steps=2",
        "grpo.prompts_per_step=2", "grpo.num_generations=2", "grpo.updates_per_step=2", "grpo.max_completion_length=6",
        "grpo.save_every=1", "reward.max_length=16", "reward.tf32=false", "evaluate.samples=4",
    ]  # fmt: skip
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "SETUP": "0", "DEVICE": "cpu",
        "STAGGER_S": "0", "PIECE_MIN": "0.0001", "OUT": str(tmp_path / "out"), "EXTRA": " ".join(tiny),
        "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    return repo, env, repo / "runs" / "paper" / "stage" / "benchmarks" / "results" / "paper"  # ignored (gpu_demo.sh)


def gpu_demo(repo: Path, env: dict, *runs: str) -> str:
    import subprocess

    done = subprocess.run(["bash", "benchmarks/gpu_demo.sh", "67", *runs], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def steps_in(path: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, path.open())]


def test_gpu_demo_trains_in_pieces_resumes_and_files_the_results(tmp_path):
    """benchmarks/gpu_demo.sh on the CPU with tiny models, as on the device machine: the first
    call stops both runs (metagrad, naive) at time_limit after step 1, the second resumes them,
    ends at step 2 and runs the transfer checks; each call files metrics, samples and (once
    done) evaluate.json under runs/paper/stage/ and packs them into $OUT/paper_67.tgz, laid out
    as in the repo. Nothing lands in the repo's own benchmarks/results/: the device tool resets
    what git does not ignore there at the start of every call."""
    import tarfile

    repo, env, results = demo_repo(tmp_path)
    assert "not done: run the same command again" in gpu_demo(repo, env, "metagrad", "naive")  # stops after step 1
    for name in ("67", "67-naive"):
        assert steps_in(results / f"{name}.metrics.jsonl") == [1]
        assert not (results / f"{name}.evaluate.json").exists()
    assert "all done: 67" in gpu_demo(repo, env, "metagrad", "naive")  # resumes: step 2, then the transfer check
    with tarfile.open(tmp_path / "out" / "paper_67.tgz") as tar:
        packed = set(tar.getnames())
    for name in ("67", "67-naive"):
        steps, texts = steps_in(results / f"{name}.metrics.jsonl"), steps_in(results / f"{name}.samples.jsonl")
        assert steps == texts == [1, 2]  # step 1 not redone, step 2 once
        check = json.loads((results / f"{name}.evaluate.json").read_text())
        assert [r["generator"] for r in check] == ["base", "trained"] and len(check[1]["samples"]) == 4
        for ext in ("metrics.jsonl", "samples.jsonl", "evaluate.json"):
            assert f"benchmarks/results/paper/{name}.{ext}" in packed
    assert "benchmarks/results/paper/67.curves.png" in packed
    assert {"runs/paper/67.log", "runs/paper/67-naive.log"} <= packed
    assert not (repo / "benchmarks" / "results").exists()


def test_gpu_demo_stops_at_once_when_a_file_the_config_reads_is_missing(tmp_path):
    """A ../shared file the config names (not staged into .gpu for this demonstration) stops
    gpu_demo.sh before any run starts, naming the file and the staging command."""
    import subprocess

    repo, env, results = demo_repo(tmp_path)
    (tmp_path / "shared").unlink()
    (tmp_path / "shared" / "data").mkdir(parents=True)  # a .gpu staged for other demonstrations
    done = subprocess.run(["bash", "benchmarks/gpu_demo.sh", "spanish", "naive"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "reads ../shared/data/fortunes_es.txt, which is missing" in done.stdout
    assert "gpu_stage.sh spanish" in done.stdout
    assert not (repo / "runs").exists()  # no run started


def test_gpu_demo_stops_at_once_when_a_file_extra_reads_is_missing(tmp_path):
    """The same for a ../shared path that only an override in EXTRA names (the random GPT-2's
    tokenizer, say): the message names it and the staging command that adds it."""
    import subprocess

    repo, env, results = demo_repo(tmp_path)
    (tmp_path / "shared").unlink()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "lohelp_en_de.tsv").write_text("a\tb\n")  # what 67.yaml reads: staged
    env = {**env, "EXTRA": "target.model=gpt2-faithful target.tokenizer=../shared/tokenizers/gpt2"}
    done = subprocess.run(["bash", "benchmarks/gpu_demo.sh", "67", "metagrad"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "EXTRA reads ../shared/tokenizers/gpt2, which is missing" in done.stdout
    assert "gpu_stage.sh 67 ../shared/tokenizers/gpt2" in done.stdout
    assert not (repo / "runs").exists()


def test_gpu_demo_carries_a_run_to_a_fresh_machine(tmp_path):
    """CARRY_OUT packs the stopped run; on a machine that has only those parts (runs/ gone),
    CARRY_IN rebuilds it and the run resumes at step 2 instead of starting over."""
    import shutil

    repo, env, results = demo_repo(tmp_path)
    parts = tmp_path / "parts"
    assert "not done" in gpu_demo(repo, env | {"CARRY_OUT": str(parts)}, "metagrad")
    assert (parts / "67.carry.json").is_file() and steps_in(results / "67.metrics.jsonl") == [1]
    shutil.rmtree(repo / "runs")  # the next session's machine: a bare disk and the parts
    assert "all done: 67" in gpu_demo(repo, env | {"CARRY_IN": str(parts)}, "metagrad")
    assert steps_in(results / "67.metrics.jsonl") == steps_in(results / "67.samples.jsonl") == [1, 2]
    assert "resuming from runs/paper/67/checkpoint-2" in (repo / "runs" / "paper" / "67.log").read_text()


def test_gpu_demo_packs_a_call_without_the_metagrad_run(tmp_path):
    """A call that runs only a baseline (here naive) packs its results and its own log, with no
    error for the metagrad run's log, which it never wrote."""
    import tarfile

    repo, env, _ = demo_repo(tmp_path)
    out = gpu_demo(repo, env, "naive")
    assert "Cannot stat" not in out and "not done" in out
    with tarfile.open(tmp_path / "out" / "paper_67.tgz") as tar:
        packed = set(tar.getnames())
    assert {"runs/paper/67-naive.log", "benchmarks/results/paper/67-naive.metrics.jsonl"} <= packed
    assert "runs/paper/67.log" not in packed


def test_gpu_bg_wait_brings_back_the_results_archives(tmp_path):
    """gpu_bg.sh wait copies, besides the named files, every *.tgz under RESULTS into OUT with
    flat names, so the call that sees a job end brings its results back, and packs every run's
    log, metrics.jsonl and skipped updates' inputs under RUNS (no checkpoints) into runs_live.tgz."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bg.sh"
    results, out = tmp_path / "results", tmp_path / "out"
    job = f"sleep 1; cd {tmp_path}; mkdir -p results/a results/b; echo 1 > results/a/paper_x.tgz"
    job += "; echo 2 > results/b/paper_x.tgz"
    runs = tmp_path / "runs"
    (runs / "x").mkdir(parents=True)
    (runs / "x.log").write_text("step 1\n")
    (runs / "x" / "metrics.jsonl").write_text('{"step": 1}\n')
    (runs / "x" / "big.safetensors").write_text("weights")
    (runs / "x" / "nonfinite").mkdir()
    (runs / "x" / "nonfinite" / "step_2_update_1.pt").write_text("inputs")  # a skipped update's, safety.FiniteGuard
    env = os.environ | {"RESULTS": str(results), "OUT": str(out), "RUNS": str(runs)}
    subprocess.run(["bash", str(script), "start", job], env=env, check=True, capture_output=True, timeout=30)
    done = subprocess.run(["bash", str(script), "wait", "30"], env=env, capture_output=True, text=True, timeout=60)
    assert "== ended" in done.stdout
    assert (out / "a_paper_x.tgz").read_text() == "1\n" and (out / "b_paper_x.tgz").read_text() == "2\n"
    with tarfile.open(out / "runs_live.tgz") as live:  # the logs, metrics and post-mortems so far, nothing else
        assert sorted(live.getnames()) == ["x.log", "x/metrics.jsonl", "x/nonfinite/step_2_update_1.pt"]
        assert live.extractfile("x/metrics.jsonl").read() == b'{"step": 1}\n'


def test_gpu_bg_stop_ends_one_run_and_spares_the_job(tmp_path):
    """gpu_bg.sh stop RUN kills that run's dpg process and the shell that would go on after it
    (gpu_demo.sh's transfer check), while the job and its other runs go on; a run with no
    process is an error. A stand-in dpg.cli (sleeps) and gpu_demo.sh-like subshells."""
    import subprocess
    import sys
    import time

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bg.sh"
    fake = tmp_path / "fake" / "dpg"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "cli.py").write_text("import time\ntime.sleep(float(__import__('os').environ['NAP']))\n")
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(tmp_path / "fake"), "NAP": "6",
    }  # fmt: skip

    def run(name: str) -> str:  # as gpu_demo.sh runs one: train, then what follows in the same shell
        return f"(python3 -m dpg.cli train cfg.yaml output_dir=runs/paper/{name} x=1; touch {tmp_path}/after-{name}) &"

    job = f"cd {tmp_path}; {run('a')} {run('a-naive')} wait"
    subprocess.run(["bash", str(script), "start", job], env=env, check=True, capture_output=True, timeout=30)
    time.sleep(1.5)
    stop = subprocess.run(["bash", str(script), "stop", "a"], env=env, capture_output=True, text=True, timeout=30)
    assert stop.returncode == 0 and "stopped runs/paper/a:" in stop.stdout
    job_pid = (Path("/tmp/dpg_bg.pid")).read_text().strip()
    assert subprocess.run(["kill", "-0", job_pid]).returncode == 0  # the job goes on
    done = subprocess.run(["bash", str(script), "wait", "30"], env=env, capture_output=True, text=True, timeout=60)
    assert "== ended" in done.stdout
    assert (tmp_path / "after-a-naive").exists() and not (tmp_path / "after-a").exists()
    again = subprocess.run(["bash", str(script), "stop", "a"], env=env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "no dpg process of runs/paper/a" in again.stdout


def tiny_67(tmp_path: Path, generations: int) -> list[str]:
    """Overrides that run configs/paper/67.yaml with tiny models on the CPU, on 80 short prompts
    from ../shared's help corpus (the test is skipped where ../shared is absent)."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "lohelp_en_de.tsv"
    if not shared.is_file():
        pytest.skip(f"{shared} is absent (the shared data beside the checkout)")
    rows = [r.split("\t")[0] for r in shared.read_text().splitlines()]
    (tmp_path / "short.tsv").write_text("\n".join([r for r in rows if len(r) < 150][:80]) + "\n")
    return [
        "device=cpu", "generator.model=tiny-llama", "target.model=tiny-gpt2", "prompts.chat=false",
        "metric.vocab_offset=0", f"prompts.file={tmp_path / 'short.tsv'}", "prompts.limit=null", "prompts.heldout=4",
        "grpo.prompts_per_step=2", f"grpo.num_generations={generations}", "grpo.updates_per_step=2",
        "grpo.max_completion_length=6", "reward.max_length=16", "reward.tf32=false",
    ]  # fmt: skip


def test_update_variants_times_each_variant_against_the_baseline(tmp_path):
    """benchmarks/update_variants.py on the CPU with tiny models: the baseline and each variant
    train in their own process; each ratio is the variant's median over the baseline's; step 1's
    check sees no change where the variant only splits the update into passes of one sequence,
    and a change where it raises the learning rate 200-fold; a variant that samples another
    step-1 batch (another temperature) is not compared; a variant that fails is recorded with
    its error and the variants after it still run."""
    import subprocess

    tiny = tiny_67(tmp_path, generations=4)
    script, out = SCRIPTS[0].parent / "update_variants.py", tmp_path / "variants.json"
    command = [sys.executable, str(script), "configs/paper/67.yaml", *tiny, "--steps", "3", "--warmup", "1",
               "--variant", "grpo.update_microbatch=1", "--variant", "reward.name=no_such_reward",
               "--variant", "grpo.learning_rate=1e-3", "--variant", "grpo.temperature=0.5", "--out", str(out)]
    done = subprocess.run(command, cwd=script.parents[1], capture_output=True, text=True, timeout=600,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert list(runs) == ["baseline", "grpo.update_microbatch=1", "reward.name=no_such_reward",
                          "grpo.learning_rate=1e-3", "grpo.temperature=0.5"]  # fmt: skip
    assert "no_such_reward" in runs["reward.name=no_such_reward"]["error"]  # recorded, and the next variant ran
    base, passes, lr = runs["baseline"], runs["grpo.update_microbatch=1"], runs["grpo.learning_rate=1e-3"]
    for k in ("generation", "reward", "update", "step"):
        assert passes["ratio_to_baseline"][k] == pytest.approx(passes["median_s"][k] / base["median_s"][k])
    assert base["steps_timed"] == 2 and base["step1"]["grad_norm"] > 0
    assert passes["step1_relative_difference"]["grad_norm"] < 1e-4
    assert lr["step1_relative_difference"]["grad_norm"] > 1e-3
    assert passes["same_step1_batch"] and lr["same_step1_batch"]
    hotter = runs["grpo.temperature=0.5"]
    assert hotter["same_step1_batch"] is False and hotter["step1_relative_difference"] is None
    assert hotter["step1_batch"]["raw_mean"] != base["step1_batch"]["raw_mean"]
    moved = abs(hotter["step1_batch"]["raw_mean"] - base["step1_batch"]["raw_mean"]) / base["step1_batch"]["raw_std"]
    assert hotter["step1_reward_shift"] == pytest.approx(moved) and passes["step1_reward_shift"] < 1e-4
    assert "grpo.temperature=0.5: " in done.stdout and "step 1 not comparable" in done.stdout


def test_update_variants_same_batch_by_hand():
    """Step 1's batch in brief: lengths must match, rewards' means within 1e-4 of their spread;
    a reward that records no mean (the baselines') is judged by the lengths alone, not a crash."""
    same_batch = load_script("update_variants").same_batch
    brief = {"trl/completions/mean_length": 40.5, "target_tokens": 52.0, "raw_mean": -3.0, "raw_std": 2e-3}
    run = lambda **kw: {"step1_batch": brief | kw}  # noqa: E731
    assert same_batch(run(), run(raw_mean=-3.0 + 1.9e-7))
    assert not same_batch(run(), run(raw_mean=-3.0 + 2.1e-7))
    assert not same_batch(run(), run(target_tokens=52.5))
    assert same_batch(run(raw_mean=None, raw_std=None), run(raw_mean=None, raw_std=None))
    assert not same_batch(run(raw_mean=None, raw_std=None), run(raw_mean=None, raw_std=None, target_tokens=None))
    # why not: other target tokens with rewards that record no mean are another batch, not a shift of None
    not_comparable = load_script("update_variants").not_comparable
    assert "another batch" in not_comparable(run(raw_mean=None, raw_std=None), run(raw_mean=None, target_tokens=9.0))


def test_update_profile_counts_each_kernel_once():
    """The device's busy time is the sum over the device's own events: a CPU op's self device
    time (the kernels it launched) is not added again. Events as torch.profiler's key_averages
    gives them: aten::mm launching 3 kernels of 5 ms in all, and a kernel launched by a CUDA
    graph (no CPU op of its own) of 2 ms."""
    from types import SimpleNamespace

    import torch

    prof = load_script("update_profile")
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    def event(key, device, us, count):
        return SimpleNamespace(key=key, device_type=device, self_device_time_total=us, count=count)

    events = [event("aten::mm", cpu, 5000.0, 3), event("gemm_kernel", cuda, 5000.0, 3),
              event("graph_kernel", cuda, 2000.0, 1), event("cudaLaunchKernel", cpu, 0.0, 3)]  # fmt: skip
    busy, kernels = prof.device_busy(events)
    assert busy == pytest.approx(0.007) and kernels == 4


def test_update_profile_profiles_the_step_after_warmup(tmp_path):
    """benchmarks/update_profile.py on the CPU with tiny models: it trains warmup + 1 steps and
    profiles the last one whole (its generation, reward and both policy updates: the matmuls of
    the updates' forward and backward passes are in it), and writes the figures it prints."""
    import subprocess
    import sys

    tiny = tiny_67(tmp_path, generations=2)
    script = SCRIPTS[0].parent / "update_profile.py"
    out = tmp_path / "profile.json"
    command = [sys.executable, str(script), "configs/paper/67.yaml", *tiny, "--warmup", "1", "--out", str(out)]
    done = subprocess.run(command, cwd=script.parents[1], capture_output=True, text=True, timeout=600,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["step"] == 2 and got["wall_s"] > 0 and set(got["split_s"]) == {"generation", "reward", "update"}
    assert got["kernels"] == 0 and got["device_busy_s"] == 0  # no device here: no kernels to count
    ops = {r["op"]: r for r in got["top_by_cpu"]}
    assert "aten::mm" in ops and ops["aten::mm"]["calls"] > 0
    assert '"step": 2' in done.stdout and "top_by_cpu:" in done.stdout


def test_pattern_selection_prunes_by_fresh_scores_down_to_k(tmp_path, monkeypatch):
    """pattern_selection.py's pruning: with a stand-in scorer (a text's score is its length, so
    every rescoring agrees), the k texts left are the k longest; each round rescores only what
    is left, in shrinking sets, and the last round rescores nothing. The fixed subsets: top and
    bottom k by the first scores, three random draws of k, the whole pool."""
    sel = load_script("pattern_selection")
    texts = [f"text {'x' * ((i * 37) % 101)}" for i in range(60)]
    calls = []

    def by_length(cfg, batch, tmp):
        calls.append(len(batch))
        return [float(len(t)) for t in batch]

    monkeypatch.setattr(sel, "scores", by_length)
    first = [float(len(t)) for t in texts]
    left = sel.pruned(None, texts, first, k=8, rounds=3, tmp=tmp_path)
    assert sorted(left) == sorted(sorted(range(60), key=lambda i: len(texts[i]))[-8:])
    assert len(calls) == 2 and 60 > calls[0] > calls[1] > 8
    chosen = sel.subsets(first, 8)
    assert set(chosen["top"]) == set(left) and not set(chosen["top"]) & set(chosen["bottom"])
    assert [len(chosen[f"random {s}"]) for s in range(3)] == [8, 8, 8] and chosen["whole pool"] == list(range(60))


def test_pattern_selection_writes_its_pruned_set_as_a_samples_file(tmp_path, monkeypatch):
    """pattern_selection.py's main, with stand-ins for the scorer, the pool and the check: the
    JSON records the rounds and device it ran with, and the pruned set comes out as a samples
    file that dpg's reader takes (so `dpg evaluate evaluate.samples_file=` repeats its check),
    holding exactly the k texts the stand-in scores put on top."""
    from types import SimpleNamespace

    from dpg.sampling import read_samples

    sel = load_script("pattern_selection")
    texts = [f"help {'y' * ((i * 13) % 41)}" for i in range(40)]
    monkeypatch.setattr(sel, "pool", lambda shared, n: texts[:n])
    monkeypatch.setattr(sel, "scores", lambda cfg, batch, tmp: [float(len(t)) for t in batch])
    checked = {}

    def check(cfg, name, seed, samples):
        checked[name] = list(samples)
        return SimpleNamespace(metric=-float(len(samples)), proxy={"pixel_accuracy": 0.5})

    monkeypatch.setattr(sel, "measure_samples", check)
    out, config = tmp_path / "sel.json", SCRIPTS[0].parents[1] / "configs" / "paper" / "67.yaml"
    monkeypatch.setattr(sys, "argv", ["pattern_selection.py", "--config", str(config), "--pool", "40", "--k", "6",
                                      "--rounds", "2", "--out", str(out)])  # fmt: skip
    sel.main()
    got = json.loads(out.read_text())
    assert (got["pool"], got["k"], got["rounds"], got["device"]) == (40, 6, 2, "cpu")
    assert got["rows"]["pruned"]["examples"] == 6 and got["rows"]["whole pool"]["phi"] == -40.0
    rows = read_samples(tmp_path / "sel.pruned.jsonl")
    longest = sorted(texts, key=len)[-6:]
    assert sorted(r["completion"] for r in rows) == sorted(longest) == sorted(checked["pruned"])
    assert {(r["generator"], r["seed"], r["prompt"]) for r in rows} == {("pattern_selection:pruned", 0, "")}


def test_curve_reach_on_curves_known_in_closed_form(tmp_path):
    """curve_reach.py on exact curves: ΔΦ = 0.001 + 1e-5·step reaches 0.002 at step 100 by the
    line (no scatter: the ± SE range is that step too); 0.001·e^(0.01·step) reaches 0.002 at
    100·ln 2 by the exponential; a level already passed says so, and a falling curve never
    reaches a higher one. The same series read back from console lines (dpg.report's format,
    3 digits of ΔΦ) gives the line's step to within the digits."""
    import math

    from dpg.report import console_line

    cr = load_script("curve_reach")
    steps = range(1, 51)

    def write(name, values, jsonl=True):
        rows = [{"step": s, "phi": -3.0 + v, "phi_before": -3.0, "time/generation": 1.0, "time/reward": 1.0,
                 "time/update": 1.0} for s, v in zip(steps, values)]  # fmt: skip
        path = tmp_path / name
        text = [json.dumps(r) for r in rows] if jsonl else [console_line(r, 50) for r in rows]
        path.write_text("\n".join(text) + "\n")
        return path

    x, y = cr.series(write("line.jsonl", [0.001 + 1e-5 * s for s in steps]), "delta_phi", 1024)
    got = cr.judge(x, y, 0.002, 40, 1024)
    assert got["steps_fitted"] == [11.0, 50.0] and got["line"]["reaches_at_step"] == pytest.approx(100.0)
    assert got["line"]["range_slope_pm_se"] == pytest.approx([100.0, 100.0])
    assert got["line"]["examples_by_then"] == 102400
    x, y = cr.series(write("exp.jsonl", [0.001 * math.exp(0.01 * s) for s in steps]), "delta_phi", 1024)
    assert cr.judge(x, y, 0.002, 40, 1024)["exponential"]["reaches_at_step"] == pytest.approx(100 * math.log(2))
    assert cr.judge(x, y, 0.0011, 40, 1024)["line"]["reaches_at_step"] == "already"
    x, y = cr.series(write("fall.jsonl", [0.002 - 1e-5 * s for s in steps]), "delta_phi", 1024)
    assert cr.judge(x, y, 0.003, 40, 1024)["line"]["reaches_at_step"] == "never"
    x, y = cr.series(write("line.log", [0.001 + 1e-5 * s for s in steps], jsonl=False), "delta_phi", 1024)
    assert cr.judge(x, y, 0.002, 40, 1024)["line"]["reaches_at_step"] == pytest.approx(100.0, rel=0.05)


def test_scale_rewards_ab_summary_by_hand(tmp_path):
    """The A/B's figures for one run, from files written by hand: the last step's entropy and
    share, the least share, the first step below 0.9, the mean accuracy over sampling seeds."""
    spec = importlib.util.spec_from_file_location("ab", SCRIPTS[0].parent / "scale_rewards_ab.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    rows = [(1, 3.0, 1.0), (2, 2.0, 0.95), (3, 1.5, 0.85), (4, 1.25, 0.875)]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "trl/entropy": e, "distinct_share": d}) + "\n" for s, e, d in rows)
    )
    checks = [{"generator": g, "proxy": {"pixel_accuracy": a}} for g, a in (("base", 0.5), ("trained", 0.75),
                                                                           ("trained", 1.0))]  # fmt: skip
    (tmp_path / "evaluate.json").write_text(json.dumps(checks))
    got = ab.summary(tmp_path, "batch", 7)
    assert got == {"scale_rewards": "batch", "seed": 7, "steps": 4, "entropy_last": 1.25, "distinct_last": 0.875,
                   "distinct_least": 0.85, "below_0.9_from": 3, "pixel_accuracy": 0.875}  # fmt: skip


def test_uuid_reward_shape_pool_holds_the_kinds_it_names():
    """The batch uuid_reward_shape.py scores: 64 plain sentences, then 8 of each kind, every
    sentence distinct and each kind's text ending in its part of the UUID (or the other one)."""
    shared = Path(__file__).resolve().parents[2] / "shared"
    if not (shared / "data" / "lohelp_en_de.tsv").is_file():
        pytest.skip("the shared data is not beside the checkout")
    spec = importlib.util.spec_from_file_location("shape", SCRIPTS[0].parent / "uuid_reward_shape.py")
    shape = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shape)
    rows = shape.pool(shared)
    kinds = [r["id"].rsplit("-", 1)[0] for r in rows]
    assert len(rows) == 104 and kinds[:64] == ["plain"] * 64
    assert kinds[64:] == [k for k in shape.KINDS for _ in range(8)]
    uuid = "3f2b8c1e-7d4a-4e9b-a6c5-0d1f2e3a4b5c"
    assert all(r["text"].endswith(" " + uuid) for r in rows if r["id"].startswith("the UUID"))
    assert all(r["text"].endswith(" " + uuid[:8]) for r in rows if r["id"].startswith("first 8"))
    assert sum(uuid in r["text"] for r in rows) == 8
    sentences = [r["text"].rsplit(" ", 1)[0] if not r["id"].startswith("plain") else r["text"] for r in rows]
    assert len(set(sentences)) == 104


def test_adam_saturation_figures_by_hand():
    """A 1 × 3 block with √eps_root = 0.01: gradients 0.5 (50×), −2 (200×) and 0 against the
    pattern (+, +, −); the update moves a pixel by −sign(g)."""
    import torch

    saturation = load_script("adam_saturation").saturation
    g = torch.tensor([[0.5, -2.0, 0.0]], dtype=torch.float64)
    out = saturation(g, torch.tensor([[1.0, 1.0, -1.0]], dtype=torch.float64), eps_root=1e-4)
    assert out["ratio"] == {"min": 0.0, "median": pytest.approx(50.0), "max": pytest.approx(200.0)}
    assert out["share_past_100x"] == pytest.approx(1 / 3)
    # −sign: (−, +, 0): pixel 0 wrong, pixel 1 right, pixel 2 unmoved (wrong: 0 matches neither sign)
    assert out["saturated_accuracy"] == pytest.approx(1 / 3)
    assert out["wrong"] == [{"pixel": [0, 0], "ratio": pytest.approx(50.0)}, {"pixel": [0, 2], "ratio": 0.0}]
    # (eps_root/(g² + eps_root))^1.5: 1 at g = 0; (1/2501)^1.5 at 50×
    assert out["factor"]["max"] == 1.0 and out["factor"]["median"] == pytest.approx(2501**-1.5)


def test_adam_saturation_gradient_is_the_mean_token_loss_gradient_on_the_block():
    """block_gradient, in microbatches, against autograd through the HF model's own logits: the
    mean over texts of each text's mean token cross-entropy, on the pattern's block."""
    import torch

    from dpg.data import encode_texts
    from dpg.metrics import pattern_metric
    from dpg.models import load_model

    block_gradient = load_script("adam_saturation").block_gradient
    model, tok = load_model("tiny-gpt2", seed=3)
    metric = pattern_metric(model, torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]]), 1, 40)
    texts = ["the cat sat on the mat", "a b", "hello world, hello again", "x y z w v", "one"]
    got = block_gradient(model, tok, metric, texts, 16, microbatch=2)

    ex = encode_texts(tok, texts, 16)
    weight = model.get_parameter(metric.head)
    model.zero_grad()
    logits = model(input_ids=ex.input_ids, attention_mask=ex.attention_mask).logits[:, :-1]
    mask = ex.loss_mask[:, 1:].float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ex.input_ids[:, 1:], reduction="none")
    ((ce * mask).sum(1) / mask.sum(1)).mean().backward()
    want = weight.grad[40:43, 1:3].T.double()
    assert got.shape == (2, 3) and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
