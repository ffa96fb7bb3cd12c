"""The end-to-end pipeline: SFT -> candidates -> labels -> reward model -> RL -> eval -> report.

:mod:`~rlhfkit.pipeline.run` composes the training recipes and inference commands into stages
(each skipped when done, resumed from its checkpoints); :mod:`~rlhfkit.pipeline.evaluation` is
its evaluation stage and report data.
"""
