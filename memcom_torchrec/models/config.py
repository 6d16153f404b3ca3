"""``ModelConfig``: the shape of a model. Plain dataclass, importable without torch."""

from dataclasses import dataclass, field, fields
from typing import Any, List, Mapping

MODELS = ("next_item", "ranknet")
# Each model's scorers, its default first (here, torch-free, for configs and CLIs;
# NextItemClassifier and RankNet implement them).
SCORERS = {"next_item": ("linear", "tied"), "ranknet": ("dot", "mlp")}


@dataclass
class ModelConfig:
    """The shape of a model (the trainer's ``TrainConfig`` extends it with how to train).

    Args:
        model (str): ``next_item`` (softmax classifier) or ``ranknet`` (pairwise ranking).
        method (str): a registered embedding method (``modules.methods.method_names()``).
        compression_ratio (float): target ratio of the compressed tables.
        compressed_tables (List[str]): which of ``item``/``user`` are compressed.
        embedding_dim (int): ``d``.
        hidden (List[int]): MLP widths.
        dropout (float): MLP dropout.
        num_negatives (int): sampled negatives per positive (``ranknet``).
        use_user_id (bool): pool the user id into the query (False: phone-shaped,
            the model needs only the user's recent items and holds no user table).
        scorer (str): how items are scored, one of ``SCORERS[model]`` ("": the
            model's default, ``linear`` / ``dot``).
    """

    model: str = "next_item"
    method: str = "memcom"
    compression_ratio: float = 16.0
    compressed_tables: List[str] = field(default_factory=lambda: ["item"])
    embedding_dim: int = 64
    hidden: List[int] = field(default_factory=lambda: [256])
    dropout: float = 0.0
    num_negatives: int = 4
    use_user_id: bool = True
    scorer: str = ""

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model '{self.model}'; choose one of {list(MODELS)}")
        self.scorer = self.scorer or SCORERS[self.model][0]
        if self.scorer not in SCORERS[self.model]:
            raise ValueError(
                f"unknown scorer '{self.scorer}' for model '{self.model}'; choose one of {list(SCORERS[self.model])}"
            )
        if not self.use_user_id and "user" in self.compressed_tables:
            raise ValueError("compressed_tables names 'user' but use_user_id is False (the model has no user table)")

    @property
    def scores_catalogue(self) -> bool:
        """Whether the model reads items from its item table through a ``candidate`` feature.

        Such a model builds that feature inside its forward, so TorchRec's sparse-dist
        pipeline cannot start its input all-to-all early.
        """
        return self.model == "ranknet" or self.scorer == "tied"

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "ModelConfig":
        """This config's fields out of a flat dict (e.g. a saved ``TrainConfig``); other keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in flags.items() if k in names})
