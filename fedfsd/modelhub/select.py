"""Non-private training with model selection on validation episodes.

Shared by public pretraining (`fedfsd model pretrain`) and a region's personalisation
(`fedfsd region finetune`): both train WITHOUT differential privacy, with the same per-vehicle
Poisson sampling as the DP trainer (`VehicleDPSGD(private=False)`), score the model on validation
episodes every `eval_every` steps and keep the best checkpoint. The starting model is candidate 0,
so the result is never worse on validation than what it started from. Test episodes are never
read here: every choice (step, early stop) sees validation episodes only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedfsd.data.frames import VehicleFramesLike

METRIC = "fde"  # selection metric: FDE@3s on validation episodes, metres
EVAL_BATCH = 8192


@dataclass
class SelectResult:
    """The best checkpoint and the validation curve that chose it."""

    weights: dict[str, np.ndarray]  # float32, the best checkpoint (the start if nothing beat it)
    best_step: int  # 0 = the starting model
    steps_run: int  # steps actually trained (≤ max_steps; fewer after early stopping)
    val_before: dict[str, float]  # validation metrics of the starting model
    val_best: dict[str, float]  # validation metrics of the selected checkpoint
    curve: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, val metrics)
    train_seconds: float = 0.0
    stopped_early: bool = False


class _Scorer:
    """Scores a live torch model on fixed validation frames (no copy of the model per eval)."""

    def __init__(self, frames: VehicleFramesLike, model_name: str) -> None:
        from fedfsd.data.feature_spec import LABEL_SCALES

        self.bev = model_name == "bev_cnn"
        self.x, self.y = frames.all_frames("bev" if self.bev else "objects")
        if len(self.y) == 0:
            raise ValueError("the validation split has no frames")
        self.scales = np.asarray(LABEL_SCALES, dtype=np.float64)

    def __call__(self, model: Any) -> dict[str, float]:
        import torch

        from fedfsd.privacy.objective import predict_physical
        from fedfsd.region.evaluation import score_predictions

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        preds = []
        with torch.no_grad():
            for i in range(0, len(self.x), EVAL_BATCH):
                xb = torch.from_numpy(np.asarray(self.x[i : i + EVAL_BATCH])).to(device)
                preds.append(predict_physical(model, xb).cpu())
        model.train(was_training)
        return score_predictions(torch.cat(preds).numpy(), self.y, self.scales)


def train_select(
    train: Any,
    val: Any,
    weights: Mapping[str, np.ndarray],
    model_name: str,
    *,
    max_steps: int,
    eval_every: int,
    lr: float,
    vehicles_per_step: int,
    frames_per_vehicle: int = 8,
    patience: int | None = None,
    seed: int | None = None,
    device: str = "cpu",
    on_step: Callable[[int, int], None] | None = None,
    on_eval: Callable[[int, dict[str, float], bool], None] | None = None,
) -> SelectResult:
    """Train non-privately from `weights` on `train`; return the best checkpoint on `val`.

    `patience`: stop after this many evaluations without improvement (None: run `max_steps`).
    `on_eval(step, metrics, is_best)` is called for the start (step 0) and every evaluation.
    """
    from fedfsd.config import DPParams
    from fedfsd.models import build_model, get_weights, set_weights
    from fedfsd.privacy.dpsgd import VehicleDPSGD
    from fedfsd.privacy.objective import model_kwargs

    if max_steps < 0 or eval_every < 1 or vehicles_per_step < 1 or frames_per_vehicle < 1:
        raise ValueError("need max_steps ≥ 0, eval_every ≥ 1, vehicles/frames per step ≥ 1")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if train.features.shape[1] != val.features.shape[1]:
        raise ValueError("train and validation frames have different feature counts")
    kw = model_kwargs(train, model_name)
    model = build_model(model_name, train.features.shape[1], train.labels.shape[1], **kw)
    set_weights(model, {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})
    params = DPParams(
        noise_multiplier=0.0,
        clip_norm=math.inf,
        steps=max_steps,
        vehicles_per_step=vehicles_per_step,
        frames_per_vehicle=frames_per_vehicle,
        lr=lr,
        update_norm_bound=math.inf,
    )
    trainer = VehicleDPSGD(
        model,
        params,
        train.n_vehicles,
        private=False,
        modality="bev" if model_name == "bev_cnn" else "objects",
        seed=seed,
        device=device,
    )
    score = _Scorer(val, model_name)
    before = score(trainer.model)
    best_w, best_step, best = get_weights(trainer.model), 0, before
    curve = [(0, before)]
    if on_eval is not None:
        on_eval(0, before, True)
    since_best, step, stopped = 0, 0, False
    started = time.perf_counter()
    while step < max_steps:
        trainer.step(train)
        step += 1
        if on_step is not None:
            on_step(step, max_steps)
        if step % eval_every and step != max_steps:
            continue
        m = score(trainer.model)
        curve.append((step, m))
        better = math.isfinite(m[METRIC]) and m[METRIC] < best[METRIC]
        if better:
            best_w, best_step, best, since_best = get_weights(trainer.model), step, m, 0
        else:
            since_best += 1
        if on_eval is not None:
            on_eval(step, m, better)
        if patience is not None and since_best >= patience:
            stopped = step < max_steps
            break
    return SelectResult(
        weights=best_w,
        best_step=best_step,
        steps_run=step,
        val_before=before,
        val_best=best,
        curve=curve,
        train_seconds=time.perf_counter() - started,
        stopped_early=stopped,
    )
