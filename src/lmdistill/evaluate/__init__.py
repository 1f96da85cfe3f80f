"""Evaluation of a trained model: held-out loss and calibration, divergence to the teacher, answers.

- :mod:`.run`: the evaluation run (``lmdistill eval``): every metric of a model on its run's
  held-out rows, written to ``eval.json`` (:func:`~.run.evaluate_run`, :func:`~.run.evaluate_path`);
- :mod:`.answers`: answers generated to held-out prompts and their scores, per decoding;
- :mod:`.metrics`: pure answer metrics (ROUGE-L, exact match, final answers, length buckets);
- :mod:`.divergence`: forward and reverse KL to the teacher, teacher-forced.

The teacher-forced statistics (cross-entropy, next-token accuracy, calibration) are
:mod:`lmdistill.heldout`, below the methods and the training loop, which use them too; decoding is
:mod:`lmdistill.generation`. This package sits above the methods (the run reads a method's rows),
so nothing below it imports it.
"""

# Until their callers import the modules above (methods/distillm.py: lmdistill.heldout.ce_sums;
# train.py and tests/test_methods_hidden_mixture.py: lmdistill.heldout, .answers, .divergence).
from lmdistill.evaluate.answers import answer_accuracy_counts  # noqa: F401
from lmdistill.evaluate.divergence import teacher_divergences  # noqa: F401
from lmdistill.heldout import TokenStats, ce_sums, heldout_stats  # noqa: F401
