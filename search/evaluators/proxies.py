"""Zero-cost proxies: scores of an untrained network that are meant to rank architectures
by the accuracy they would reach after training, computed in well under a second.

Each function takes a freshly initialized model and returns a float where higher means
"predicted better". They follow the published definitions and the reference practice of
the zero-cost-proxy literature:

* :func:`synflow` (Tanaka et al. 2020, "Pruning neural networks without any data by
  iteratively conserving synaptic flow"; used as a NAS proxy by Abdelfattah et al. 2021):
  every parameter replaced by its absolute value, BatchNorm removed, an all-ones input,
  ``R = sum(f(1))``; the score is ``sum |theta * dR/dtheta|`` over the weights of every
  convolution and linear layer. We return its natural log (the raw score grows
  geometrically with depth).
* :func:`naswot` (Mellor et al. 2021, "Neural Architecture Search without Training"):
  binary codes ``c_i = [pre-activation > 0]`` over every rectifier-like unit for each
  input of a minibatch; kernel ``K = C C^T + (1 - C)(1 - C)^T`` (inputs x inputs: units
  on which two inputs agree); score ``log |det K|``.
* :func:`grad_norm` (Abdelfattah et al. 2021): cross-entropy on a minibatch, backward
  once, the sum over convolution and linear weights of the L2 norm of their gradient.
* :func:`zico` (Li et al. 2023, "ZiCo: Zero-shot NAS via Inverse Coefficient of Variation
  on Gradients"): the gradient of the cross-entropy with respect to every weight on each
  of several minibatches; per layer ``l`` the sum over its weights of
  ``mean_b |g| / std_b(g)`` (weights whose gradient has zero spread are left out), and
  the score ``sum_l log`` of that sum.
* :func:`meco` (Jiang et al. 2023, "MeCo: Zero-Shot NAS with One Data and Single Forward
  Pass via Minimum Eigenvalue of Correlation"): one forward pass of one input; for every
  layer's feature map (``C x H x W`` read as ``C`` vectors of ``H*W``) the Pearson
  correlation matrix of its channels; the score is the sum of their least eigenvalues.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

# Rectifier-like activations: output > 0 exactly when input > 0, so the sign of the
# pre-activation is the unit's on/off code. Gates (sigmoid, hard-sigmoid) are not units.
RECTIFIERS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU,
                                           nn.LeakyReLU, nn.ELU)
WEIGHTED: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm,
                                      nn.LayerNorm)


class ProxyError(ValueError):
    """A proxy that has no meaningful value for this network (one-line message)."""


def _replace(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> int:
    n = 0
    for name, child in list(model.named_children()):
        if isinstance(child, kinds):
            setattr(model, name, nn.Identity())
            n += 1
        else:
            n += _replace(child, kinds)
    return n


def synflow(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[float, dict]:
    """log SynFlow score of ``model`` for inputs of shape ``C,H,W``.

    Computed on a float64 copy (the caller's model is not touched) with BatchNorm removed,
    which is the reference practice for this proxy. Rectifier-like activations are
    replaced by identity as well: with non-negative weights and an all-ones input every
    ReLU is already the identity, so for ReLU networks this is exactly the published
    computation, and for ReLU6 it avoids the clip at 6 that would otherwise zero the flow
    behind the first saturated layer. SE gates (sigmoid / hard-sigmoid) are kept.
    """
    net = copy.deepcopy(model).double()
    removed_norms = _replace(net, NORMS)
    _replace(net, RECTIFIERS)
    net.eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    weights = [m.weight for m in net.modules() if isinstance(m, WEIGHTED)]
    net.zero_grad(set_to_none=True)
    x = torch.ones((1, *input_shape), dtype=torch.float64)
    r = net(x).sum()
    if not torch.isfinite(r):
        raise ProxyError("synflow overflowed float64 (network too deep for this proxy)")
    grads = torch.autograd.grad(r, weights, allow_unused=True)
    total = 0.0
    with torch.no_grad():
        for w, g in zip(weights, grads, strict=True):
            if g is not None:
                total += float((w * g).abs().sum())
    if not math.isfinite(total) or total <= 0.0:
        raise ProxyError(f"synflow score is {total!r}; no finite positive flow through the "
                         "network")
    return math.log(total), {"log_R": math.log(float(r.detach())), "norms_removed": removed_norms,
                             "layers": len(weights)}


def naswot(model: nn.Module, x: torch.Tensor) -> tuple[float, dict]:
    """log-determinant of the NASWOT binary-activation kernel over minibatch ``x``.

    The model runs in training mode (BatchNorm on batch statistics, as in the reference
    code) on a copy, so running statistics of the caller's model are left alone.
    """
    n = x.shape[0]
    if n < 2:
        raise ProxyError("NASWOT needs a minibatch of at least 2 inputs")
    net = copy.deepcopy(model)
    net.train()
    kernel = torch.zeros((n, n), dtype=torch.float64)
    units = 0

    def hook(_module: nn.Module, args: tuple) -> None:
        nonlocal kernel, units
        codes = (args[0].detach().reshape(n, -1) > 0).to(torch.float64)
        kernel += codes @ codes.T + (1.0 - codes) @ (1.0 - codes).T
        units += codes.shape[1]

    handles = [m.register_forward_pre_hook(hook) for m in net.modules()
               if isinstance(m, RECTIFIERS)]
    try:
        if not handles:
            raise ProxyError("NASWOT needs rectifier-like activations (ReLU, ReLU6, hswish, "
                             "swish, GELU); this network has none")
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    sign, logdet = torch.linalg.slogdet(kernel)
    if sign <= 0 or not torch.isfinite(logdet):
        raise ProxyError("NASWOT kernel is singular: the network gives distinct inputs "
                         "identical activation patterns")
    return float(logdet), {"units": units, "activations": len(handles)}


def grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict]:
    """Sum over conv/linear weights of ||d CE(model(x), y) / d W||_2 (training mode)."""
    net = copy.deepcopy(model)
    net.train()
    weights = [m.weight for m in net.modules() if isinstance(m, WEIGHTED)]
    loss = nn.functional.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, weights, allow_unused=True)
    total = 0.0
    for g in grads:
        if g is not None:
            total += float(torch.linalg.vector_norm(g.double()))
    if not math.isfinite(total):
        raise ProxyError("grad_norm is not finite")
    return total, {"loss": float(loss.detach()), "layers": len(weights)}


def zico(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
         ) -> tuple[float, dict]:
    """ZiCo over ``batches`` (at least two labelled minibatches), training mode.

    Following the reference code, a layer is each convolution and linear layer; its
    weights' gradients over the minibatches give a mean absolute value and a (population)
    standard deviation per weight; weights with zero deviation are skipped and a layer
    whose sum is zero contributes nothing (log 0 is not a score).
    """
    if len(batches) < 2:
        raise ProxyError("ZiCo needs at least two minibatches")
    net = copy.deepcopy(model)
    net.train()
    layers = [m for m in net.modules() if isinstance(m, WEIGHTED)]
    grads: list[list[torch.Tensor]] = [[] for _ in layers]
    for x, y in batches:
        loss = nn.functional.cross_entropy(net(x), y)
        gs = torch.autograd.grad(loss, [m.weight for m in layers], allow_unused=True)
        for store, g in zip(grads, gs, strict=True):
            if g is not None:
                store.append(g.detach().double().flatten())
    total, used = 0.0, 0
    for store in grads:
        if len(store) < 2:
            continue
        g = torch.stack(store)
        std = g.std(dim=0, unbiased=False)
        keep = std > 0
        s = float((g.abs().mean(dim=0)[keep] / std[keep]).sum())
        if s > 0.0 and math.isfinite(s):
            total += math.log(s)
            used += 1
    if used == 0:
        raise ProxyError("ZiCo has no layer with varying gradients")
    return total, {"layers": used, "batches": len(batches)}


def meco(model: nn.Module, x: torch.Tensor) -> tuple[float, dict]:
    """MeCo of ``model`` for the first input of ``x``.

    The network runs in eval mode: with one input, training-mode BatchNorm has no batch
    statistics on a 1x1 map, and a fresh network's eval-mode BatchNorm is the identity
    (running mean 0, variance 1), so nothing is lost. Feature maps are the outputs of
    every convolution. A channel that is constant over the map has no correlation: its
    NaN entries count as 0 (the reference code's rule). Maps of one channel or one pixel
    have no correlation matrix and are skipped.
    """
    net = copy.deepcopy(model)
    net.eval()
    values: list[float] = []

    def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        fea = out[0].detach().double()
        c = fea.shape[0]
        fea = fea.reshape(c, -1)
        if c < 2 or fea.shape[1] < 2:
            return
        corr = torch.corrcoef(fea)
        corr = torch.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)
        values.append(float(torch.linalg.eigvalsh(corr)[0]))

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            net(x[:1] if x.shape[0] > 1 else x)
    finally:
        for h in handles:
            h.remove()
    if not values:
        raise ProxyError("MeCo needs a convolution with a feature map of >= 2 channels and "
                         ">= 2 pixels")
    return float(sum(values)), {"layers": len(values)}
