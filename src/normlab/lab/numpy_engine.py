"""The MNIST networks trained with nothing but NumPy and :mod:`normlab.reference` (``--engine numpy``).

The batch-norm layers' forward and backward are :func:`normlab.reference.batch_norm_forward` and
:func:`~normlab.reference.batch_norm_backward`, the paper's equations derived by hand; the running statistics
use :func:`~normlab.reference.batch_stats` and :func:`~normlab.reference.running_update` (unbiased variance, as
torch keeps it), and evaluation uses :func:`~normlab.reference.batch_norm_inference`. Linear layers, the
sigmoid of the network without BN, softmax cross-entropy and SGD are written out here. Everything is float64.

:class:`NumpyNet` is an arm of the ``mnist`` experiment, as :class:`normlab.lab.experiment.TorchArm` is.
"""

from __future__ import annotations

import numpy as np
import torch

from normlab import reference as ref
from normlab.diagnostics import percentiles
from normlab.lab.metrics import accuracy, softmax_cross_entropy

sigmoid, sigmoid_grad = ref.ACTIVATIONS["sigmoid"]


class NumpyMLP:
    """The 784-100-100-100-10 sigmoid network in float64 NumPy, with or without BN before each sigmoid.

    Weights are ``(out, in)`` as in ``torch.nn.Linear``; hidden biases exist only without BN.
    """

    def __init__(self, weights: list[np.ndarray], bn: bool, momentum: float = 0.1, eps: float = 1e-5):
        self.bn, self.momentum, self.eps = bn, momentum, eps
        self.params: dict[str, np.ndarray] = {}
        for i, w in enumerate(weights):
            hidden = i < len(weights) - 1
            self.params[f"W{i}"] = np.array(w, dtype=np.float64)
            if bn and hidden:
                self.params[f"gamma{i}"] = np.ones(w.shape[0])
                self.params[f"beta{i}"] = np.zeros(w.shape[0])
            else:
                self.params[f"b{i}"] = np.zeros(w.shape[0])
        self.buffers: dict[str, np.ndarray] = {}
        if bn:
            for i in range(len(weights) - 1):
                self.buffers[f"running_mean{i}"] = np.zeros(weights[i].shape[0])
                self.buffers[f"running_var{i}"] = np.ones(weights[i].shape[0])
        self.layers = len(weights)

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        """One SGD step on the batch ``x`` ``(B, 784)``, labels ``y`` ``(B,)``; returns the batch's mean loss."""
        p = self.params
        a, saved = x, []
        for i in range(self.layers - 1):
            if self.bn:
                h = a @ p[f"W{i}"].T                                            # (B, 100)
                mean, var, m = ref.batch_stats(h)
                self.buffers[f"running_mean{i}"] = ref.running_update(self.buffers[f"running_mean{i}"], mean,
                                                                      self.momentum)
                self.buffers[f"running_var{i}"] = ref.running_update(self.buffers[f"running_var{i}"],
                                                                     var * m / (m - 1), self.momentum)
                a_next, cache = ref.batch_norm_forward(h, p[f"gamma{i}"], p[f"beta{i}"], self.eps,
                                                       activation="sigmoid", placement="before")
            else:
                h = a @ p[f"W{i}"].T + p[f"b{i}"]                               # (B, 100)
                a_next, cache = sigmoid(h), h
            saved.append((a, cache))
            a = a_next
        last = self.layers - 1
        logits = a @ p[f"W{last}"].T + p[f"b{last}"]                            # (B, 10)
        loss, dlogits = softmax_cross_entropy(logits, y)

        grads = {f"W{last}": dlogits.T @ a, f"b{last}": dlogits.sum(axis=0)}
        da = dlogits @ p[f"W{last}"]                                            # (B, 100)
        for i in reversed(range(self.layers - 1)):
            a_prev, cache = saved[i]
            if self.bn:
                dh, grads[f"gamma{i}"], grads[f"beta{i}"] = ref.batch_norm_backward(da, cache)
            else:
                dh = da * sigmoid_grad(cache)
                grads[f"b{i}"] = dh.sum(axis=0)
            grads[f"W{i}"] = dh.T @ a_prev
            if i > 0:  # the input needs no gradient
                da = dh @ p[f"W{i}"]
        for k, g in grads.items():
            p[k] -= lr * g
        return loss

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inference on ``x`` ``(N, 784)``: logits ``(N, 10)`` and the last hidden layer's sigmoid inputs (N, 100)."""
        p, a, pre = self.params, x, None
        for i in range(self.layers - 1):
            if self.bn:
                pre = ref.batch_norm_inference(a @ p[f"W{i}"].T, p[f"gamma{i}"], p[f"beta{i}"],
                                               self.buffers[f"running_mean{i}"], self.buffers[f"running_var{i}"],
                                               self.eps)
            else:
                pre = a @ p[f"W{i}"].T + p[f"b{i}"]
            a = sigmoid(pre)
        last = self.layers - 1
        return a @ p[f"W{last}"].T + p[f"b{last}"], pre


class NumpyNet:
    """One network of the experiment (``variant`` ``"plain"`` or ``"bn"``) with its data, SGD and evaluation.

    The four methods of an arm (:class:`normlab.lab.experiment.Arm`): ``train``, ``evaluate``, ``state_dict``,
    ``load_state_dict``; states hold float64 torch tensors so that one checkpoint format serves both engines.

    Args:
        variant: ``"plain"`` or ``"bn"``.
        weights: the shared initial weights from :func:`normlab.lab.models.init_weights`.
        inputs: :class:`normlab.lab.data.Inputs`, float32.
        order: the :class:`normlab.lab.data.DataOrder` both networks follow.
        lr, momentum, eps, probe_unit: see :class:`normlab.lab.experiments.mnist.MnistConfig`.
    """

    def __init__(self, variant, weights, inputs, order, lr, momentum, eps, probe_unit):
        self.net = NumpyMLP(weights, bn=(variant == "bn"), momentum=momentum, eps=eps)
        self.train_x, self.train_y = inputs.train_x, inputs.train_y.astype(np.int64)
        self.test_x, self.test_y = inputs.test_x.astype(np.float64), inputs.test_y.astype(np.int64)
        self.order, self.lr, self.probe_unit = order, lr, probe_unit

    def train(self, start: int, end: int) -> float:
        """SGD steps ``start`` to ``end - 1`` (0-based) on the batches of ``order``; returns their mean loss."""
        total = 0.0
        for step in range(start, end):
            idx = self.order.indices(step)
            total += self.net.train_step(self.train_x[idx].astype(np.float64), self.train_y[idx], self.lr)
        return total / max(end - start, 1)

    def evaluate(self) -> dict:
        """Test loss, accuracy and the probe unit's sigmoid-input percentiles over the whole test set."""
        logits, pre = self.net.predict(self.test_x)
        loss, _ = softmax_cross_entropy(logits, self.test_y)
        return {"test_loss": loss, "test_acc": accuracy(logits, self.test_y),
                **percentiles(pre[:, self.probe_unit])}

    def state_dict(self) -> dict:
        """Every parameter and running statistic, as float64 torch tensors (copies)."""
        return {k: torch.from_numpy(v.copy()) for k, v in {**self.net.params, **self.net.buffers}.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` gave; raises KeyError naming a missing entry."""
        for k in list(self.net.params):
            self.net.params[k] = state[k].numpy().astype(np.float64, copy=True)
        for k in list(self.net.buffers):
            self.net.buffers[k] = state[k].numpy().astype(np.float64, copy=True)
