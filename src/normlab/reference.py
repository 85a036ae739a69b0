r"""The float64 NumPy reference: forward and hand-derived backward of batch, layer, instance and group norm.

Every faster path in normlab is tested against this module. It is written for reading, step by step.

Forward (Ioffe & Szegedy 2015, Algorithm 1), over the m values that share one statistic::

    mean = 1/m Σ x                       (μ_B)
    var  = 1/m Σ (x - mean)²             (σ²_B, biased)
    rstd = (var + eps)^(-1/2)
    xhat = (x - mean) · rstd
    z    = xhat · w + b                  (w = γ, b = β)

Backward, by the chain rule, with ``dz = ∂l/∂z`` (the paper's equations, in this module's names)::

    dxhat = dz · w                                                       ∂l/∂x̂
    dvar  = Σ dxhat · (x - mean) · (-1/2) · (var + eps)^(-3/2)          ∂l/∂σ²
    dmean = Σ dxhat · (-rstd) + dvar · Σ (-2 (x - mean)) / m             ∂l/∂μ
    dx    = dxhat · rstd + dvar · 2 (x - mean) / m + dmean / m           ∂l/∂x
    dw    = Σ dz · xhat                                                  ∂l/∂γ
    db    = Σ dz                                                         ∂l/∂β

Why each term: x reaches the loss three ways, directly through xhat, through var and through mean. ``var``
depends on x through ``(x - mean)²``, giving ``2 (x - mean) / m``; ``mean`` depends on x with slope ``1/m``
and reaches the loss directly (through every xhat, slope ``-rstd``) and through var (slope ``-2 (x-mean)/m``
summed, which is zero in exact arithmetic but is kept here as the chain rule writes it). Substituting gives
the compact form used by the fast paths::

    dx = rstd · (dxhat - mean(dxhat) - xhat · mean(dxhat · xhat))

The sums run over the statistic's m values for dvar and dmean, and over the batch (and spatial) positions
of each affine entry for dw and db. Which values those are is the only thing that differs between the four
norms; :mod:`normlab.spec` decides it, and this module reads the plan: ``x`` is viewed as ``(N, G, K, R)``.

An optional activation ``f`` is fused ``"before"`` (``y = f(norm(x))``, as the paper places BN before the
non-linearity) or ``"after"`` (``y = norm(f(x))``); its derivative enters by the chain rule: ``dz = dy · f'(z)``
before, ``dx = dx_norm · f'(x)`` after.

Inference (Algorithm 2): with population statistics ``E[x]`` and ``Var[x] = m/(m-1) · E_B[σ²_B]``, the network
computes ``y = w / sqrt(Var[x] + eps) · x + (b - w E[x] / sqrt(Var[x] + eps))``.
"""

from __future__ import annotations

import math

import numpy as np

from normlab.spec import LEAKY_SLOPE, Plan, check_activation
from normlab.spec import plan as make_plan

_erf = np.frompyfunc(math.erf, 1, 1)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # tanh form: no overflow warning for large |x|


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def _gelu_grad(x):
    cdf = 0.5 * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


def _leaky_relu(slope):
    return lambda x: np.where(x > 0, x, slope * x), lambda x: np.where(x > 0, 1.0, slope)


# name -> (f, f'), both of the pre-activation value ("leaky_relu" at the default slope; see activation_functions()).
ACTIVATIONS = {
    "relu": (lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(np.float64)),
    "leaky_relu": _leaky_relu(LEAKY_SLOPE),
    "sigmoid": (_sigmoid, lambda x: _sigmoid(x) * (1.0 - _sigmoid(x))),
    "tanh": (np.tanh, lambda x: 1.0 - np.tanh(x) ** 2),
    "silu": (lambda x: x * _sigmoid(x), lambda x: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x)))),
    "gelu": (_gelu, _gelu_grad),
}


def activation_functions(name, negative_slope=LEAKY_SLOPE):
    """``(f, f')`` of the activation ``name``, or None; leaky_relu with ``negative_slope``."""
    check_activation(name, "before", negative_slope)
    if name == "leaky_relu":
        return _leaky_relu(negative_slope)
    return None if name is None else ACTIVATIONS[name]


def forward(x, w, b, eps, p: Plan, activation=None, placement="before", negative_slope=LEAKY_SLOPE):
    """Normalize ``x`` by plan ``p`` (float64); returns ``(y, cache)``.

    Args:
        x: input of shape ``p.shape``.
        w, b: affine weight and bias with ``p.affine_size`` entries, or None (1 and 0).
        eps: added to the variance.
        p: the :class:`~normlab.spec.Plan`.
        activation: None or a name in :data:`ACTIVATIONS`; placement ``"before"`` or ``"after"`` the norm.
        negative_slope: leaky_relu's slope for negative inputs.
    """
    f = activation_functions(activation, negative_slope)
    x = np.asarray(x, dtype=np.float64)
    w = np.ones(p.affine_size) if w is None else np.asarray(w, dtype=np.float64).reshape(-1)
    b = np.zeros(p.affine_size) if b is None else np.asarray(b, dtype=np.float64).reshape(-1)
    a = f[0](x) if (f and placement == "after") else x    # (shape) what gets normalized
    a4 = a.reshape(p.view_shape)                            # (N, G, K, R)
    mean = a4.mean(axis=p.stat_axes, keepdims=True)         # (N|1, G, 1, 1)
    xc = a4 - mean                                          # (N, G, K, R)
    var = (xc**2).mean(axis=p.stat_axes, keepdims=True)     # (N|1, G, 1, 1) biased
    rstd = 1.0 / np.sqrt(var + eps)                         # (N|1, G, 1, 1)
    xhat = xc * rstd                                        # (N, G, K, R)
    z = xhat * w.reshape(1, p.G, p.K, 1) + b.reshape(1, p.G, p.K, 1)  # (N, G, K, R)
    y = f[0](z) if (f and placement == "before") else z     # (N, G, K, R)
    cache = (x, w, b, mean, rstd, var, eps, p, f, placement)
    return y.reshape(p.shape), cache


def backward(dy, cache):
    """Backward of :func:`forward`, step by step; returns ``(dx, dw, db)`` (dw, db flat, ``p.affine_size``)."""
    x, w, b, mean, rstd, var, eps, p, f, placement = cache
    w4 = w.reshape(1, p.G, p.K, 1)                          # (1, G, K, 1)
    a = f[0](x) if (f and placement == "after") else x      # (shape)
    a4 = a.reshape(p.view_shape)                            # (N, G, K, R)
    dy4 = np.asarray(dy, dtype=np.float64).reshape(p.view_shape)  # (N, G, K, R)
    xc = a4 - mean                                          # (N, G, K, R)
    xhat = xc * rstd                                        # (N, G, K, R) recomputed, not cached
    if f and placement == "before":
        z = xhat * w4 + b.reshape(1, p.G, p.K, 1)           # (N, G, K, R) pre-activation, recomputed
        dz = dy4 * f[1](z)                                  # (N, G, K, R)
    else:
        dz = dy4                                            # (N, G, K, R)
    ax, m = p.stat_axes, p.m
    dxhat = dz * w4                                                               # (N, G, K, R)
    dvar = np.sum(dxhat * xc, axis=ax, keepdims=True) * -0.5 * (var + eps) ** -1.5  # (N|1, G, 1, 1)
    dmean = np.sum(dxhat * -rstd, axis=ax, keepdims=True) + dvar * np.sum(-2.0 * xc, axis=ax, keepdims=True) / m
    da = dxhat * rstd + dvar * 2.0 * xc / m + dmean / m                           # (N, G, K, R)
    dw = np.sum(dz * xhat, axis=p.affine_axes).reshape(-1)                        # (G*K,)
    db = np.sum(dz, axis=p.affine_axes).reshape(-1)                               # (G*K,)
    da = da.reshape(p.shape)
    dx = da * f[1](x) if (f and placement == "after") else da                     # (shape)
    return dx, dw, db


def batch_norm_forward(x, w, b, eps=1e-5, activation=None, placement="before"):
    """Batch norm of ``x`` ``(N, C, *S)``: statistics per channel over N and S. Returns ``(y, cache)``."""
    return forward(x, w, b, eps, make_plan("batch", np.shape(x)), activation, placement)


def instance_norm_forward(x, w, b, eps=1e-5, activation=None, placement="before"):
    """Instance norm of ``x`` ``(N, C, *S)``: statistics per sample and channel over S. Returns ``(y, cache)``."""
    return forward(x, w, b, eps, make_plan("instance", np.shape(x)), activation, placement)


def group_norm_forward(x, groups, w, b, eps=1e-5, activation=None, placement="before"):
    """Group norm of ``x`` ``(N, C, *S)``: statistics per sample over each group of C/groups channels."""
    return forward(x, w, b, eps, make_plan("group", np.shape(x), groups=groups), activation, placement)


def layer_norm_forward(x, normalized_ndim, w, b, eps=1e-5, activation=None, placement="before"):
    """Layer norm over the last ``normalized_ndim`` dims of ``x``; w, b have one entry per normalized element."""
    p = make_plan("layer", np.shape(x), normalized_ndim=normalized_ndim)
    return forward(x, w, b, eps, p, activation, placement)


# Every kind's backward is the same function: the cache carries its plan.
batch_norm_backward = instance_norm_backward = group_norm_backward = layer_norm_backward = backward


def batch_stats(x):
    """Per-channel batch mean and biased variance of ``x`` ``(N, C, *S)`` (float64), and the count m."""
    p = make_plan("batch", np.shape(x))
    x4 = np.asarray(x, dtype=np.float64).reshape(p.view_shape)
    mean = x4.mean(axis=p.stat_axes)                                    # (1, C)
    var = ((x4 - mean[..., None, None]) ** 2).mean(axis=p.stat_axes)    # (1, C)
    return mean.reshape(-1), var.reshape(-1), p.m


def population_stats(batch_means, batch_vars, m):
    """Algorithm 2's population statistics from per-batch ones: ``E[x] = E_B[μ_B]``, ``Var[x] = m/(m-1) E_B[σ²_B]``.

    Args:
        batch_means, batch_vars: ``(num_batches, C)`` per-batch means and biased variances.
        m: values per statistic in each batch (equal batches, as in the paper).
    """
    return np.mean(batch_means, axis=0), m / (m - 1) * np.mean(batch_vars, axis=0)


def batch_norm_inference(x, w, b, mean, var, eps=1e-5):
    """Algorithm 2's inference transform of ``x`` ``(N, C, *S)`` with population ``mean``, ``var`` ``(C,)``."""
    x = np.asarray(x, dtype=np.float64)
    bshape = (1, -1) + (1,) * (x.ndim - 2)
    inv = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    scale = np.asarray(w, dtype=np.float64) * inv
    shift = np.asarray(b, dtype=np.float64) - scale * np.asarray(mean, dtype=np.float64)
    return scale.reshape(bshape) * x + shift.reshape(bshape)


def running_update(running, batch, momentum):
    """One moving-average step of a running statistic: ``(1 - momentum) · running + momentum · batch``."""
    return (1.0 - momentum) * np.asarray(running, dtype=np.float64) + momentum * np.asarray(batch, dtype=np.float64)


# ---- batch renormalization (Ioffe 2017) -------------------------------------------------------------------------


def batch_renorm_forward(x, w, b, running_mean, running_var, rmax=3.0, dmax=5.0, eps=1e-5, activation=None,
                         placement="before", negative_slope=LEAKY_SLOPE):
    r"""Batch renorm of ``x`` ``(N, C, *S)`` in training, the paper's Algorithm 1 step by step; returns ``(y, cache)``.

    ``running_mean`` and ``running_var`` ``(C,)`` are the running statistics before this batch (``σ = sqrt(running_var
    + eps)``); r and d are taken from them and are constants of the backward (stop_gradient). The running update
    itself is batch norm's (:func:`batch_stats`, :func:`running_update`)::

        μB = 1/m Σ x,  σB = sqrt(1/m Σ (x - μB)² + eps)
        r = clip(σB / σ, 1/rmax, rmax),  d = clip((μB - μ) / σ, -dmax, dmax)
        x̂ = (x - μB) / σB · r + d,  y = γ x̂ + β
    """
    p = make_plan("batch", np.shape(x))
    f = activation_functions(activation, negative_slope)
    x = np.asarray(x, dtype=np.float64)
    c4 = (1, p.G, 1, 1)
    w4 = (np.ones(p.G) if w is None else np.asarray(w, dtype=np.float64)).reshape(c4)      # (1, C, 1, 1) γ
    b4 = (np.zeros(p.G) if b is None else np.asarray(b, dtype=np.float64)).reshape(c4)     # (1, C, 1, 1) β
    a = f[0](x) if (f and placement == "after") else x                    # (shape) what gets normalized
    a4 = a.reshape(p.view_shape)                                            # (N, C, 1, R)
    mu_b = a4.mean(axis=p.stat_axes, keepdims=True)                         # (1, C, 1, 1) μB
    sigma_b = np.sqrt(((a4 - mu_b) ** 2).mean(axis=p.stat_axes, keepdims=True) + eps)  # (1, C, 1, 1) σB
    mu = np.asarray(running_mean, dtype=np.float64).reshape(c4)             # (1, C, 1, 1) μ
    sigma = np.sqrt(np.asarray(running_var, dtype=np.float64).reshape(c4) + eps)  # (1, C, 1, 1) σ
    r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax)                          # (1, C, 1, 1) stop_gradient
    d = np.clip((mu_b - mu) / sigma, -dmax, dmax)                           # (1, C, 1, 1) stop_gradient
    xhat = (a4 - mu_b) / sigma_b * r + d                                    # (N, C, 1, R)
    z = w4 * xhat + b4                                                      # (N, C, 1, R)
    y = f[0](z) if (f and placement == "before") else z                     # (N, C, 1, R)
    cache = (x, a4, w4, mu_b, sigma_b, r, xhat, z, p, f, placement)
    return y.reshape(p.shape), cache


def batch_renorm_backward(dy, cache):
    """Backward of :func:`batch_renorm_forward`, the paper's equations (r, d constants); returns ``(dx, dw, db)``
    (dw, db ``(C,)``)::

        ∂l/∂x̂ = ∂l/∂y · γ
        ∂l/∂σB = Σ ∂l/∂x̂ · (x - μB) · (-r / σB²)
        ∂l/∂μB = Σ ∂l/∂x̂ · (-r / σB)
        ∂l/∂x = ∂l/∂x̂ · r / σB + ∂l/∂σB · (x - μB) / (m σB) + ∂l/∂μB / m
        ∂l/∂γ = Σ ∂l/∂y · x̂,  ∂l/∂β = Σ ∂l/∂y
    """
    x, a4, w4, mu_b, sigma_b, r, xhat, z, p, f, placement = cache
    dy4 = np.asarray(dy, dtype=np.float64).reshape(p.view_shape)           # (N, C, 1, R)
    dz = dy4 * f[1](z) if (f and placement == "before") else dy4            # (N, C, 1, R)
    ax, m = p.stat_axes, p.m
    dxhat = dz * w4                                                         # (N, C, 1, R) ∂l/∂x̂
    dsigma_b = np.sum(dxhat * (a4 - mu_b) * (-r / sigma_b**2), axis=ax, keepdims=True)  # (1, C, 1, 1) ∂l/∂σB
    dmu_b = np.sum(dxhat * (-r / sigma_b), axis=ax, keepdims=True)          # (1, C, 1, 1) ∂l/∂μB
    da = dxhat * r / sigma_b + dsigma_b * (a4 - mu_b) / (m * sigma_b) + dmu_b / m  # (N, C, 1, R) ∂l/∂x
    dw = np.sum(dz * xhat, axis=p.affine_axes).reshape(-1)                  # (C,) ∂l/∂γ
    db = np.sum(dz, axis=p.affine_axes).reshape(-1)                         # (C,) ∂l/∂β
    da = da.reshape(p.shape)
    dx = da * f[1](x) if (f and placement == "after") else da              # (shape)
    return dx, dw, db


# ---- ghost batch norm (Hoffer et al. 2017) -----------------------------------------------------------------------


def _virtual_batches(x, virtual_batch_size):
    """``x`` split along N into virtual batches of ``virtual_batch_size`` samples (the last one smaller)."""
    x = np.asarray(x, dtype=np.float64)
    return np.split(x, range(virtual_batch_size, x.shape[0], virtual_batch_size))


def ghost_batch_norm_forward(x, w, b, virtual_batch_size, eps=1e-5, activation=None, placement="before",
                             negative_slope=LEAKY_SLOPE):
    """Ghost batch norm of ``x`` ``(N, C, *S)`` in training: batch norm of each virtual batch on its own, a Python
    loop over them. Returns ``(y, cache)``."""
    outs = [forward(xv, w, b, eps, make_plan("batch", xv.shape), activation, placement, negative_slope)
            for xv in _virtual_batches(x, virtual_batch_size)]
    return np.concatenate([y for y, _ in outs]), [cache for _, cache in outs]


def ghost_batch_norm_backward(dy, cache):
    """Backward of :func:`ghost_batch_norm_forward`: each virtual batch's; dw and db summed over them."""
    dy = np.asarray(dy, dtype=np.float64)
    sizes = [c[0].shape[0] for c in cache]
    grads = [backward(g, c) for g, c in zip(np.split(dy, np.cumsum(sizes)[:-1]), cache)]
    return np.concatenate([g[0] for g in grads]), sum(g[1] for g in grads), sum(g[2] for g in grads)


def ghost_batch_stats(x, virtual_batch_size):
    """The per-channel statistics a ghost batch norm's running buffers take from ``x``: the virtual batches' means
    and unbiased variances, averaged with weights (samples in the virtual batch) / N. Returns ``(mean, var)``."""
    parts = _virtual_batches(x, virtual_batch_size)
    n = sum(xv.shape[0] for xv in parts)
    mean, var = 0.0, 0.0
    for xv in parts:
        mu, v, m = batch_stats(xv)
        mean, var = mean + xv.shape[0] / n * mu, var + xv.shape[0] / n * v * m / (m - 1)
    return mean, var
