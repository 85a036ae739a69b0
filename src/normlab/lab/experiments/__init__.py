"""The experiments, one module each; :mod:`normlab.lab.registry` imports every module here."""
