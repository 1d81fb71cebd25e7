"""Stage 1 of the pipeline: learn a filter bank from image patches with the Krotov-Hopfield rule.

- :mod:`~edgehebb.learn.hebbian`: the rule itself, the reference every faster backend is tested against;
- :mod:`~edgehebb.learn.patches`: patches cut from images on the fly, and their preprocessing;
- :mod:`~edgehebb.learn.loop`: epochs, shuffling, annealing, the choice of backend (:class:`LearnConfig`);
- :mod:`~edgehebb.learn.torch_backend` / :mod:`~edgehebb.learn.pycuda_backend`: the CPU/CUDA torch learner
  and our CUDA kernel's learner;
- :mod:`~edgehebb.learn.directory`: ``edgehebb learn`` into a directory, checkpoints and resume.

This stage imports nothing from the later ones (nnl, evaluate, deploy).
"""

from edgehebb.learn.directory import learn_to_dir
from edgehebb.learn.loop import LearnConfig, learn

__all__ = ["LearnConfig", "learn", "learn_to_dir"]
