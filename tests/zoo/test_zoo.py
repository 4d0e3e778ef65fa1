"""The models people bring: real torchvision and timm models, built small from their configs with
random weights (nothing downloaded), each measured in float64 against the brute-force loop (norms,
grad reg) and the SVD null space (the projection), with the engine ``method="auto"`` takes.

Run by ``make test`` in a second environment (torch 2.14.1, torchvision 0.29.1, timm: torchvision
does not load beside the main suite's torch 2.13.0); skipped where torchvision is missing.
"""

import functools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import assert_rel_close, brute_jacobian, brute_reg_grad  # noqa: E402

from noisy_label_sgd import per_sample_sq_grad_norms, regularizer_grad, tangent_projection  # noqa: E402
from noisy_label_sgd.engines import select_engine  # noqa: E402
from noisy_label_sgd.engines.functional import forward_replacements, twice_differentiable  # noqa: E402

tv = torchvision.models


class GroupNorm2(nn.GroupNorm):
    def __init__(self, channels, **kwargs):
        super().__init__(2, channels, **kwargs)


def tv_convnext():
    blocks = tv.convnext.CNBlockConfig
    return tv.convnext.ConvNeXt([blocks(8, 16, 1), blocks(16, None, 1)], num_classes=3)


def tv_swin():
    return tv.swin_transformer.SwinTransformer([4, 4], 8, [1, 1], [1, 2], [2, 2], num_classes=3)


def tv_vit():
    return tv.vision_transformer.VisionTransformer(16, 8, 1, 2, 8, 16, num_classes=3)


def timm_vit():
    return timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, num_classes=3, embed_dim=8,
                                                            depth=1, num_heads=2, mlp_ratio=2.0)


def timm_mixer():
    return timm.models.mlp_mixer.MlpMixer(num_classes=3, img_size=16, patch_size=8, num_blocks=1, embed_dim=8)


# name: (build, input size, what "auto" measures it with: the fast engine, or where and why not)
MODELS = {
    "tv_resnet18": (lambda: tv.resnet18(num_classes=3), 16, "fast"),
    "tv_mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=3), 32, "fast"),
    "tv_efficientnet_b0": (lambda: tv.efficientnet_b0(num_classes=3), 16, "fast"),
    "tv_regnet_x_400mf": (lambda: tv.regnet_x_400mf(num_classes=3), 16, "fast"),
    "tv_convnext_narrow": (tv_convnext, 16, "fast"),
    # (its windows read in blocks, its bias table indexed in its attention's own code: see below)
    "tv_swin_small": (tv_swin, 16, "fast"),
    "tv_vit_small": (tv_vit, 16, "fast"),
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=3), 16, "fast"),
    "timm_tf_efficientnet_b0": (lambda: timm.create_model("tf_efficientnet_b0", num_classes=3), 16, "fast"),
    "timm_nf_resnet26": (lambda: timm.create_model("nf_resnet26", num_classes=3), 16,
                         "fast (per-module fallback"),  # (weight standardisation: its convolutions')
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=3), 32, "fast"),
    "timm_vit_tiny": (timm_vit, 16, "fast"),
    "timm_resnet18_groupnorm": (lambda: timm.create_model("resnet18", num_classes=3, norm_layer=GroupNorm2), 16,
                                "fast"),
    "timm_mixer": (timm_mixer, 16, "fast"),
}


class FirstOutput(nn.Module):
    """The model's first logit: one output per sample keeps the brute-force loop short."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[:, :1]


@functools.lru_cache(maxsize=None)
def built(name):
    build, size, _ = MODELS[name]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = FirstOutput(build()).double().eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, x


def flat(model, tensors):
    return torch.cat([tensors[n].reshape(-1) for n, p in model.named_parameters() if p.requires_grad])


@pytest.mark.parametrize("name", list(MODELS))
def test_a_real_model_is_measured_exactly_by_the_engine_auto_takes(name):
    model, x = built(name)
    expected_method = MODELS[name][2]
    engine = select_engine(model, x)
    with engine.measuring():
        norms = engine.sq_norms()
    assert engine.method.startswith(expected_method), engine.method
    J = brute_jacobian(model, x)
    assert_rel_close(norms, J.pow(2).sum(1))
    with twice_differentiable(), forward_replacements():  # (F.hardsigmoid's backward has no derivative)
        grad = brute_reg_grad(model, x)
    assert_rel_close(flat(model, regularizer_grad(model, x)), grad)
    v = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype)
         for n, p in model.named_parameters()}
    v, projected = flat(model, v), flat(model, tangent_projection(model, x, v, solver="dense"))
    # in null(J), and what it removed in the row space of J (by J's SVD: at init some of these
    # models' samples have nearly parallel gradients, so the rank kept may be either side of a
    # singular value near the cutoff, and both answers hold this)
    _, s, rows = torch.linalg.svd(J, full_matrices=False)
    assert float((J @ projected).norm()) <= 1e-7 * float(s[0]) * float(v.norm())
    removed = v - projected
    assert float((removed - rows.T @ (rows @ removed)).norm()) <= 1e-8 * float(v.norm())
    assert_rel_close(per_sample_sq_grad_norms(model, x), norms)


def tv_swin_shifted():
    return tv.swin_transformer.SwinTransformer([2, 2], 8, [2, 2], [1, 2], [2, 2], num_classes=3)


def timm_swin():
    return timm.models.swin_transformer.SwinTransformer(img_size=16, patch_size=2, embed_dim=8, depths=(2, 2),
                                                        num_heads=(1, 2), window_size=2, num_classes=3)


@pytest.mark.parametrize("build", [tv_swin_shifted, timm_swin])
def test_a_real_swin_is_measured_exactly_on_the_fast_engine(build):
    # windows merged into the batch (read as sample-major blocks, certified), shifted windows'
    # masks made from the samples' tensors, and a bias table indexed inside the attention's own
    # code (torchvision applies its qkv's and proj's weights there too): every operation by a
    # closed form, the table's per-sample gradients replayed where the scores meet it
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = FirstOutput(build()).double().eval()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    engine = select_engine(model, x, "fast")
    with engine.measuring():
        norms = engine.sq_norms()
    assert engine.method == "fast", engine.method
    J = brute_jacobian(model, x)
    assert_rel_close(norms, J.pow(2).sum(1))
    assert_rel_close(flat(model, regularizer_grad(model, x, method="fast")), brute_reg_grad(model, x))
    vector = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype)
              for n, p in model.named_parameters()}
    v = flat(model, vector)
    for solver in ("dense", "lsqr"):
        projected = flat(model, tangent_projection(model, x, vector, method="fast", solver=solver))
        _, s, rows = torch.linalg.svd(J, full_matrices=False)
        assert float((J @ projected).norm()) <= 1e-7 * float(s[0]) * float(v.norm())
        removed = v - projected
        assert float((removed - rows.T @ (rows @ removed)).norm()) <= 1e-8 * float(v.norm())
