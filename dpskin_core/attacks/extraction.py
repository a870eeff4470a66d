"""Model extraction: a copycat (Correia-Silva et al. 2018) or knockoff (Orekondy et al. 2019)
attacker with black-box access to a victim's predicted probabilities (or labels only) steals
a model by querying it with images from a pool disjoint from its training data (synthetic
images, or held-out real ones).

Reported per query budget: *fidelity*, the stolen model's agreement with the victim, and its
balanced accuracy on labelled test images. Registered as the ``copycat`` attack in
:data:`dpskin_core.attacks.ATTACKS`::

    from dpskin_core.attacks.extraction import extract_model, synthetic_pool
    res = extract_model(victim, synthetic_pool(2000, 32), data.x_test, data.y_test,
                        budgets=(250, 1000), mode="probs")
    res.table          # budget, mode, fidelity, balanced_accuracy, victim_balanced_accuracy
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..constants import CLASSES
from ..errors import ConfigError
from ..training import RunConfig
from ..training.backbones import build_backbone
from ..training.metrics import balanced_accuracy
from .arrays import as_array, same_length
from .victims import TrainedModel


def fidelity(pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    """Agreement of two label vectors: the fraction of inputs where they predict alike."""
    a, b = as_array("pred_a", pred_a, 1), as_array("pred_b", pred_b, 1)
    same_length(pred_a=a, pred_b=b)
    return float(np.mean(a == b))


@dataclass
class ExtractionResult:
    """Fidelity and balanced accuracy of the stolen model per query budget."""

    mode: str                   # probs | labels
    table: pd.DataFrame         # budget, fidelity, balanced_accuracy, victim_balanced_accuracy
    students: List[TrainedModel] = field(default_factory=list)

    def summary(self) -> Dict[str, Any]:
        return {"mode": self.mode, "rows": self.table.to_dict(orient="records")}


def _fit_student(student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, soft: bool,
                 epochs: int, lr: float, batch_size: int, seed: int) -> None:
    """Adam on soft cross-entropy (probabilities) or cross-entropy (labels), with flips."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    student.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(inputs), generator=g).split(batch_size):
            xb, tb = inputs[idx], targets[idx]
            if torch.rand((), generator=g) < 0.5:  # cheap augmentation: the batch's mirror image
                xb = xb.flip(3)
            out = student(xb)
            loss = (-(tb * torch.log_softmax(out, 1)).sum(1).mean() if soft
                    else nn.functional.cross_entropy(out, tb))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    student.eval()


def extract_model(
    victim: TrainedModel, query_x: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
    budgets: Sequence[int] = (250, 1000, 4000), mode: str = "probs",
    attacker_backbone: str = "smallcnn", attacker_factory: Optional[Callable[[], nn.Module]] = None,
    epochs: int = 20, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
    progress: bool = True,
) -> ExtractionResult:
    """Copycat / knockoff attack: query the victim's black-box API with the first N images of
    a seeded shuffle of ``query_x`` (a pool disjoint from its training data: synthetic images
    or held-out real ones), train a student on the answers, and compare on ``test_x``.

    ``mode="probs"``: the API returns probabilities (student trained on soft labels);
    ``"labels"``: only the predicted class. The student is a fresh ``attacker_backbone``
    (or ``attacker_factory()``) on pixels normalised with public constants: the attacker knows
    nothing of the victim's pipeline. Budgets are nested (a larger budget includes the
    smaller one's queries). Fidelity is agreement with the victim's labels on ``test_x``.
    """
    if mode not in ("probs", "labels"):
        raise ConfigError(f"mode={mode!r}; expected probs or labels")
    query_x = as_array("query_x", query_x, 4)
    test_x, test_y = as_array("test_x", test_x, 4), as_array("test_y", test_y, 1)
    same_length(test_x=test_x, test_y=test_y)
    budgets = sorted(int(b) for b in budgets)
    if not budgets or budgets[0] < 1 or budgets[-1] > len(query_x):
        raise ConfigError(f"budgets must be in 1..{len(query_x)} (the query pool), got {budgets}")
    order = np.random.default_rng([seed, 7]).permutation(len(query_x))[:budgets[-1]]
    queries = query_x[order]
    answers = victim.predict_proba(queries)               # the only access the attacker has
    victim_pred = victim.predict(test_x)
    student_cfg = RunConfig(backbone=attacker_backbone, image_size=int(test_x.shape[1]), progress=False)
    rows, students = [], []
    for b in tqdm(budgets, desc=f"extraction ({mode})", disable=not progress):
        torch.manual_seed(seed)
        if attacker_factory is not None:
            net = attacker_factory()
        else:
            net = build_backbone(attacker_backbone, num_classes=len(CLASSES))
        student = TrainedModel(net, student_cfg)
        inputs = student.encode(queries[:b])
        targets = (torch.from_numpy(answers[:b]).float() if mode == "probs"
                   else torch.from_numpy(answers[:b].argmax(1)))
        _fit_student(net, inputs, targets, mode == "probs", epochs, lr, batch_size, seed)
        pred = student.predict(test_x)
        rows.append({"budget": b, "mode": mode, "fidelity": fidelity(pred, victim_pred),
                     "balanced_accuracy": balanced_accuracy(test_y, pred),
                     "victim_balanced_accuracy": balanced_accuracy(test_y, victim_pred)})
        students.append(student)
    return ExtractionResult(mode, pd.DataFrame(rows), students)


def synthetic_pool(n: int, image_size: int, cache_dir: Optional[str] = None,
                   seed: int = 1) -> np.ndarray:
    """``n`` uint8 images (N, S, S, 3) of :mod:`dpskin_core.data.synth`: a query pool disjoint from
    any real data, and, with ``seed`` != 0, from the embedded synthetic dataset too (it is
    generated with seed 0; the same seed would share lesions with it, even the same images).

    Generated once into the image cache (``cache_dir``: see :mod:`dpskin_core.data.imagecache`).
    """
    from ..data import DataSpec, generated_synthetic, load_official_layout
    from ..data.synth import GENERATOR_VERSION

    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n must be a positive int, got {n!r}")
    gen_size = max(64, int(image_size))
    root = generated_synthetic(f"synthetic_pool_n{n}_seed{seed}_v{GENERATOR_VERSION}_s{gen_size}",
                               int(n), gen_size, int(seed), cache_dir)
    b = load_official_layout(root, DataSpec(dataset="synthetic", image_size=int(image_size),
                                            cache_dir=cache_dir, synth_n=int(n)), "synthetic pool")
    return np.concatenate([b.x_train, b.x_val, b.x_test])


__all__ = ["ExtractionResult", "extract_model", "fidelity", "synthetic_pool"]
