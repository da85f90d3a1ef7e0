"""The methods of benchmarks/attribution.py: dpg's exact metagradients and the influence tools
people use, each called as published (kronfluence, traker, dattri; `pip install -e
'.[attribution-bench]'`), never re-implemented.

Every method returns a (N,) float64 tensor on dpg's scale: positive = up-weighting the example
raises Φ. Each library is given a "query" whose decrease is an increase of Φ (german: the loss
of each held-out text, Φ = −their mean; pattern: −Φ itself, computed through the LM head's
forward so that libraries which collect gradients by module hooks see it), and its own sign
convention, read from its source, is turned into dpg's:
  dattri (TracIn, Grad-Dot, DataInf, LoGra) and kronfluence score g_queryᵀ·H⁻¹·g_train
      (H = I for TracIn / Grad-Dot): positive = training on the example lowers the query loss.
  TRAK scores the effect on a model output f (here −loss-like margins, or Φ): positive = raises f.
"""

from __future__ import annotations

import copy
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from attribution import Task
from dpg.metagrad.engine import Recipe, example_metagrads, fine_tune


METHODS = {  # benchmark name -> function below
    "dpg": "dpg_scores", "grad_dot": "grad_dot_scores", "tracin": "tracin_scores",
    "kronfluence_ekfac": "kronfluence_scores", "trak": "trak_scores",
    "dattri_datainf": "datainf_scores",
}  # fmt: skip


def run_method(name: str, task: Task) -> tuple[Tensor, float]:
    """Scores of `name` on `task` and the seconds they took (training θ_M included where needed)."""
    fn = globals()[METHODS[name]]
    start = time.perf_counter()
    scores = fn(task).detach().double().flatten().cpu()
    return scores, time.perf_counter() - start


# ---------------------------------------------------------------- shared pieces


def checkpoint(task: Task, steps: int) -> dict[str, Tensor]:
    """θ_t after the first `steps` of the inner run (θ_0 for 0): its batches are the pool's
    first N/M, second N/M... examples, as in the full run."""
    params = {k: p.detach().clone() for k, p in task.model.named_parameters()}
    if steps == 0:
        return params
    n, m = task.examples.input_ids.shape[0], task.recipe.steps
    assert n % m == 0, "the pool must split evenly into M batches"
    recipe = Recipe(**{**task.recipe.__dict__, "steps": steps, "batch_size": n // m})
    return params | fine_tune(task.model, task.examples, recipe).params


def model_at(task: Task, params: dict[str, Tensor]) -> torch.nn.Module:
    model = copy.deepcopy(task.model)
    model.load_state_dict(params, strict=False)
    return model.eval()


def token_losses(logits: Tensor, ids: Tensor) -> Tensor:
    """(B, T, V), (B, T) -> (B,): mean cross-entropy of tokens 1..T−1, dpg's per-example loss."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)


def functional_loss(model, params: dict[str, Tensor], ids: Tensor) -> Tensor:
    """One example's loss (ids: (T,) or (1, T)) at `params`, for the torch.func-style libraries."""
    ids = ids.reshape(1, -1)
    logits = functional_call(model, params, (ids,), {"use_cache": False}).logits
    return token_losses(logits, ids)[0]


def pattern_from_head(task: Task, head_out: Tensor) -> Tensor:
    """Φ of the pattern task from the LM head applied to unit vectors of the block's hidden
    dims ((h, V): row a is W[:, hidden_offset + a]), so Φ passes through the head's forward."""
    m = task.metric
    h, w = m.pattern.shape
    block = head_out[:, m.vocab_offset : m.vocab_offset + w]  # (h, w), the pattern's layout
    delta = block - m.initial.T.to(block)
    return -F.softplus(-m.sharpness * m.pattern.to(delta) * delta).mean()


def head_inputs(task: Task) -> Tensor:
    m = task.metric
    h = m.pattern.shape[0]
    return torch.eye(task.model.config.hidden_size)[m.hidden_offset : m.hidden_offset + h]


def query_ids(task: Task) -> Tensor:
    """German: the held-out texts; pattern: one placeholder row (Φ reads no text)."""
    return task.query.input_ids if task.query is not None else task.examples.input_ids[:1]


class Rows(Dataset):
    def __init__(self, ids: Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i]


# ---------------------------------------------------------------- dpg


def dpg_scores(task: Task) -> Tensor:
    return example_metagrads(task.model, task.examples, task.recipe, task.metric).scores


# ---------------------------------------------------------------- dattri


class Tuples(Rows):
    def __getitem__(self, i):
        return (self.ids[i],)  # dattri moves and vmaps over tuples of tensors


def dattri_task(task: Task, checkpoints: list[dict[str, Tensor]]):
    from dattri.task import AttributionTask

    model = model_at(task, checkpoints[-1])

    def loss(params, data):
        return functional_loss(model, params, data[0])

    def target(params, data):  # the query loss: lower is higher Φ
        if task.query is None:
            return -task.metric(params) + 0.0 * data[0].sum()  # keeps vmap's batch dimension
        return functional_loss(model, params, data[0])

    def load(m, ckpt):
        m.load_state_dict(ckpt, strict=False)
        return m.eval()

    return AttributionTask(loss_func=loss, model=model, checkpoints=checkpoints, target_func=target,
                           checkpoints_load_func=load)  # fmt: skip


def dattri_loaders(task: Task, train_batch: int = 32) -> tuple[DataLoader, DataLoader]:
    """TracIn's attribute() recomputes the query gradients for every training batch: larger
    training batches only save that repeated work (same scores; the projection is seeded per
    checkpoint, not per batch)."""
    train = DataLoader(Tuples(task.examples.input_ids), batch_size=train_batch, shuffle=False)
    test = DataLoader(Tuples(query_ids(task)), batch_size=32, shuffle=False)
    return train, test


def device_of(task: Task) -> str:
    return str(next(task.model.parameters()).device)


def grad_dot_scores(task: Task) -> Tensor:
    """Grad-Dot (dattri's TracInAttributor on θ_M alone, weight 1): g_queryᵀ·g_train."""
    from dattri.algorithm import TracInAttributor

    dev = device_of(task)
    attributor = TracInAttributor(
        dattri_task(task, [checkpoint(task, task.recipe.steps)]), weight_list=torch.ones(1),
        normalized_grad=False, projector_kwargs={"device": dev}, device=dev,
    )  # fmt: skip
    return attributor.attribute(*dattri_loaders(task, train_batch=128)).mean(1)


def tracin_scores(task: Task) -> Tensor:
    """TracIn (dattri): Σ_t lr·g_query(θ_{t−1})ᵀ·g_train(θ_{t−1}) over the M checkpoints the
    inner run passed through."""
    from dattri.algorithm import TracInAttributor

    dev = device_of(task)
    ckpts = [checkpoint(task, t) for t in range(task.recipe.steps)]
    attributor = TracInAttributor(
        dattri_task(task, ckpts), weight_list=torch.full((len(ckpts),), task.recipe.lr),
        normalized_grad=False, projector_kwargs={"device": dev}, device=dev,
    )  # fmt: skip
    return attributor.attribute(*dattri_loaders(task, train_batch=128)).mean(1)


def datainf_scores(task: Task) -> Tensor:
    """DataInf (dattri's IFAttributorDataInf on θ_M, its documented regularization 0.1)."""
    from dattri.algorithm import IFAttributorDataInf

    dev = device_of(task)
    attributor = IFAttributorDataInf(dattri_task(task, [checkpoint(task, task.recipe.steps)]), device=dev,
                                     regularization=0.1)  # fmt: skip
    train, test = dattri_loaders(task)
    attributor.cache(train)
    return attributor.attribute(train, test).mean(1)


# ---------------------------------------------------------------- kronfluence


def kronfluence_scores(task: Task) -> Tensor:
    """EK-FAC influence (kronfluence, as in its language-model examples): factors fitted on the
    pool at θ_M with the summed token loss, the measurement is the query loss (or −Φ)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task as KTask

    class LMTask(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].flatten(0, 1).float()
            if sample:  # the true Fisher: labels drawn from the model itself
                with torch.no_grad():
                    labels = torch.multinomial(F.softmax(logits.detach(), -1), 1).flatten()
            else:
                labels = batch[:, 1:].flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            if task.query is None:  # −Φ through the LM head's forward
                head = model.get_output_embeddings()
                return -pattern_from_head(task, head(head_inputs(task).to(head.weight)))
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].flatten(0, 1).float()
            return F.cross_entropy(logits, batch[:, 1:].flatten(), reduction="sum")

        def get_influence_tracked_modules(self):
            # Φ of the pattern task reads the LM head alone: every other module's block of the
            # (block-diagonal) EK-FAC scores contributes exactly zero, and kronfluence needs a
            # measurement gradient in every module it tracks.
            return ["lm_head"] if task.query is None else None

    kt = LMTask()
    model = prepare_model(model_at(task, checkpoint(task, task.recipe.steps)), kt)
    dev = device_of(task)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("dpg_bench", model=model, task=kt, cpu=dev == "cpu", output_dir=out, disable_tqdm=True)
        train, query = Rows(task.examples.input_ids), Rows(query_ids(task))
        analyzer.fit_all_factors("ekfac", dataset=train, per_device_batch_size=32,
                                 factor_args=FactorArguments(strategy="ekfac"))  # fmt: skip
        analyzer.compute_pairwise_scores("s", factors_name="ekfac", query_dataset=query, train_dataset=train,
                                         per_device_query_batch_size=32, per_device_train_batch_size=32)  # fmt: skip
        scores = analyzer.load_pairwise_scores("s")["all_modules"]  # (queries, N)
    return scores.sum(0).cpu()  # positive: lowers the query loss, raises Φ


# ---------------------------------------------------------------- TRAK


def trak_scores(task: Task) -> Tensor:
    """TRAK (traker, CPU-capable BasicProjector) on θ_M. Model output, as traker's text
    classifier: the margin log(p / (1 − p)) with p = exp(−loss) the example's per-token
    probability, Q = 1 − p; the pattern task's target output is Φ itself."""
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    class LMOutput(AbstractModelOutput):
        def __init__(self):
            pass

        @staticmethod
        def get_output(model, weights, buffers, ids, is_phi):
            margin = -_margin_loss(model, weights, buffers, ids)
            if task.query is None:  # a target row stands for Φ, a train row for its margin
                return is_phi * task.metric(weights) + (1 - is_phi) * margin
            return margin

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            ids = batch[0]
            logits = functional_call(model, (weights, buffers), (ids,), {"use_cache": False}).logits
            p = torch.exp(-token_losses(logits, ids))
            return (1 - p).detach().unsqueeze(-1)

    dev = device_of(task)
    model = model_at(task, checkpoint(task, task.recipe.steps))
    grad_dim = sum(p.numel() for p in model.parameters())
    proj_dim = 256  # below the pool size, so XᵀX (proj_dim²) is invertible
    projector = BasicProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.rademacher,
                               device=dev, dtype=torch.float32)  # fmt: skip
    n = task.examples.input_ids.shape[0]
    with tempfile.TemporaryDirectory() as out:
        traker = TRAKer(model=model, task=LMOutput(), train_set_size=n, save_dir=out, device=dev,
                        projector=projector, use_half_precision=False)  # fmt: skip
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for ids in task.examples.input_ids.to(dev).split(32):
            traker.featurize(batch=(ids, torch.zeros(len(ids), device=dev)), num_samples=len(ids))
        traker.finalize_features()
        q = query_ids(task).to(dev)
        traker.start_scoring_checkpoint(exp_name="q", checkpoint=model.state_dict(), model_id=0, num_targets=len(q))
        traker.score(batch=(q, torch.ones(len(q), device=dev)), num_samples=len(q))
        scores = torch.as_tensor(traker.finalize_scores(exp_name="q"))  # (N, targets)
    return scores.float().sum(1)  # positive: raises the output (−loss-like margin, or Φ)


def _margin_loss(model, weights, buffers, ids):
    """−log(p / (1 − p)) for one example (ids: (T,)), p = exp(−its mean token loss)."""
    ids = ids.reshape(1, -1)
    logits = functional_call(model, (weights, buffers), (ids,), {"use_cache": False}).logits
    loss = token_losses(logits, ids)[0]
    return loss + torch.log1p(-torch.exp(-loss))
