"""``ModelConfig``: the shape of a model. Plain dataclass, importable without torch."""

from dataclasses import dataclass, field, fields
from typing import Any, List, Mapping

MODELS = ("next_item", "ranknet")


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
    """

    model: str = "next_item"
    method: str = "memcom"
    compression_ratio: float = 16.0
    compressed_tables: List[str] = field(default_factory=lambda: ["item"])
    embedding_dim: int = 64
    hidden: List[int] = field(default_factory=lambda: [256])
    dropout: float = 0.0
    num_negatives: int = 4

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model '{self.model}'; choose one of {list(MODELS)}")

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "ModelConfig":
        """This config's fields out of a flat dict (e.g. a saved ``TrainConfig``); other keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in flags.items() if k in names})
