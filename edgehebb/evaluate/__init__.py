"""Stage 3 of the pipeline: accuracy of trained models, clean, under the paper's shadows and under
camera conditions (:mod:`~edgehebb.evaluate.accuracy`), with the pictures that show it. The image
perturbations themselves live in :mod:`edgehebb.camera`, which training uses for augmentation too."""

from edgehebb.evaluate.accuracy import accuracy_report, evaluate, evaluate_conditions, predict

__all__ = ["accuracy_report", "evaluate", "evaluate_conditions", "predict"]
