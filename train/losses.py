"""Distillation losses between the dense teacher's and the sparse student's samples (paper eq. 8,
Table 6): LPIPS when its weights are on disk, a feature loss on the pretrained MNIST classifier (the
perceptual loss that works offline), SSIM and L2. The total is the weighted sum of those with a
non-zero weight; each term is a mean over the batch, so DDP's gradient averaging matches one
process on the whole batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffsparse.mnist.metrics import classifier_input, load_classifier, ssim_per_image


@dataclass
class DistillLossConfig:
    """Weights of each term (0 = off). Default: classifier features plus L2, since LPIPS's
    backbones cannot be downloaded on our machines; `lpips_weights` names a local LPIPS
    checkpoint for the `lpips` package (AlexNet variant) when one is available."""

    features: float = 1.0
    l2: float = 1.0
    ssim: float = 0.0
    lpips: float = 0.0
    lpips_weights: str | None = None


class DistillLoss(nn.Module):
    def __init__(self, cfg: DistillLossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or DistillLossConfig()
        if not any((cfg.features, cfg.l2, cfg.ssim, cfg.lpips)):
            raise ValueError("every distillation loss weight is 0: enable at least one of features, l2, ssim, lpips")
        self.classifier = None
        if cfg.features:
            self.classifier = load_classifier().requires_grad_(False).eval()
        self.lpips = _load_lpips(cfg.lpips_weights) if cfg.lpips else None

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        teacher = teacher.detach()
        terms: dict[str, torch.Tensor] = {}
        if self.cfg.l2:
            terms["l2"] = ((student - teacher) ** 2).mean()
        if self.cfg.features:
            if student.shape[1] != 1 or student.shape[-2:] not in ((28, 28), (32, 32)):
                raise ValueError(f"the classifier feature loss needs 1-channel 28x28 or 32x32 images (the MNIST "
                                 f"model); these are {tuple(student.shape[1:])}: set its weight to 0 "
                                 "(--loss-features 0) and use l2/ssim/lpips")
            fs = self.classifier.features(classifier_input(student))
            ft = self.classifier.features(classifier_input(teacher))
            # per-sample relative error, so the batch mean splits exactly across DDP ranks
            terms["features"] = (((fs - ft) ** 2).mean(1) / ft.pow(2).mean(1).clamp_min(1e-8)).mean()
        if self.cfg.ssim:
            terms["ssim"] = 1.0 - ssim_per_image(student, teacher).mean()
        if self.cfg.lpips:
            def rgb(x):
                return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

            terms["lpips"] = self.lpips(rgb(student), rgb(teacher)).mean()
        weights = {"l2": self.cfg.l2, "features": self.cfg.features, "ssim": self.cfg.ssim, "lpips": self.cfg.lpips}
        total = sum(weights[k] * v for k, v in terms.items())
        return total, {k: float(v.detach()) for k, v in terms.items()}


def _load_lpips(weights: str | None) -> nn.Module:
    try:
        import lpips
    except ImportError:
        raise RuntimeError("the LPIPS loss needs the `lpips` package (pip install lpips) and its backbone "
                           "weights on disk; use the features/ssim/l2 losses offline") from None
    if not weights:
        raise RuntimeError("the LPIPS loss needs --lpips-weights: a local LPIPS checkpoint (nothing is downloaded)")
    model = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
    model.load_state_dict(torch.load(weights, map_location="cpu"), strict=False)
    return model.requires_grad_(False).eval()
