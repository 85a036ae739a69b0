"""normlab: batch normalization and its family for PyTorch.

- :mod:`normlab.spec`: the one place the four norms differ (the ``(N, G, K, R)`` view), and the ``Call`` every tier
  receives.
- :mod:`normlab.reference`: NumPy float64 forward and hand-derived backward.
- :mod:`normlab.functional`: torch functions with the hand-derived backward and fused activations.
- :mod:`normlab.nn`: drop-in layers (torch.nn's classes, normlab's forward).
- :func:`normlab.precise_bn`: exact population statistics over a set of batches.
- :mod:`normlab.conversion`: existing models: :func:`convert` (torch.nn's norms to normlab's and back, fusing
  activations), :func:`freeze_stats` / :func:`unfreeze_stats`, :func:`fold_bn`.
- :mod:`normlab.diagnostics`: hooks that record what each norm layer of a model sees (percentiles, train/eval
  statistics gap, batch noise).
- :mod:`normlab.distributed`: what :class:`normlab.nn.SyncBatchNorm` and ``precise_bn`` do across the ranks of a
  torch.distributed process group.
- backends, chosen in :mod:`normlab.backend`: :mod:`normlab.numba_ops` (compiled CPU loops), :mod:`normlab.torch_ops`
  (tensor operations; the fallback), :mod:`normlab.kernels` (fused Triton kernels; GPU, optional).
- :mod:`normlab.lab`: the experiments (optional; needs the ``lab`` extra).
"""

from normlab import functional, nn, reference, spec
from normlab.conversion import convert, fold_bn, freeze_stats, unfreeze_stats
from normlab.precise import precise_bn

__all__ = ["convert", "fold_bn", "freeze_stats", "functional", "nn", "precise_bn", "reference", "spec",
           "unfreeze_stats"]
__version__ = "0.1.0"
