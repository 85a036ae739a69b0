"""normlab's lab: the experiments of the batch-norm paper, reproduced (needs the ``lab`` extra).

- :mod:`normlab.lab.experiment`: how an experiment is defined (config dataclass, arms, hooks);
  :mod:`normlab.lab.registry`: the experiments by name; :mod:`normlab.lab.experiments`: one module each.
- :mod:`normlab.lab.runner`: the one runner (run folder, workers, resume, progress); :mod:`normlab.lab.rundir`:
  the run-folder reader; :mod:`normlab.lab.plots`: saving figures, ``normlab plot``; :mod:`normlab.lab.report`:
  one self-contained HTML page of every run under a folder, ``normlab report``.
- :mod:`normlab.lab.models`: the network factory (MLP, small CNN) by norm kind, placement, activation.
- :mod:`normlab.lab.data`: MNIST (read, download, shipped sample); :mod:`normlab.lab.numpy_engine`: Figure 1 with
  NumPy only.
- :mod:`normlab.lab.cli`: the ``normlab`` command.
"""
