"""Training: the run's config, the loop, its results and its entry point.

- ``config``: ``TrainConfig`` (a torch-free dataclass, one flag per field; ``launch/`` reads it);
- ``trainer``: DMP + fused optimizers + ``TrainPipelineSparseDist``, evaluation, checkpoints;
- ``results``: ``TrainState`` (resumable progress) and ``RunResult`` (``metrics.json``);
- ``distributed_env``, ``cli``: process-group set-up and teardown, ``python -m memcom_torchrec.train``.

Depends on ``models/``, ``distributed/``, ``eval/``, ``data/`` and ``modules/``; ``launch/`` and
``experiment/`` depend on it.
"""
