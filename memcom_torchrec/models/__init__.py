"""Models built on the embedding collections, and their round trip through checkpoints.

- ``embeddings``: a model's tables under one registered embedding method;
- ``next_item``, ``ranknet``: the next-item classifier and the pairwise ranker;
- ``config``: ``ModelConfig``, the shape of a model (a torch-free dataclass);
- ``scorers``: the scorer registry (each model's scorers and what callers ask about them; torch-free);
- ``builder``: ``ModelConfig`` -> model, and checkpoint -> trained model;
- ``checkpoint``: atomic, re-shardable DCP checkpoints.

Depends on ``modules/`` only; ``train/`` and ``export/`` depend on it.
"""
