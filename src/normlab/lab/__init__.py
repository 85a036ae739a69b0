"""normlab's lab: the experiments of the batch-norm paper, reproduced (needs the ``lab`` extra).

- :mod:`normlab.lab.data`: MNIST (read, download, shipped sample).
- :mod:`normlab.lab.train`: the Figure 1 experiment; :mod:`normlab.lab.numpy_engine`: the same with NumPy only.
- :mod:`normlab.lab.cli`: the ``normlab`` command.
"""
