"""``ModelConfig``: the shape of a model. Plain dataclass, importable without torch."""

from dataclasses import dataclass, field, fields
from typing import Any, List, Mapping

from memcom_torchrec.models.scorers import NEXT_ITEM, Scorer, check_model, default_scorer, get_scorer


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
        scorer (str): how items are scored, a scorer of ``model`` registered in
            ``models.scorers`` ("": the model's default, ``linear`` / ``dot``).
    """

    model: str = NEXT_ITEM
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
        check_model(self.model)
        self.scorer = self.scorer or default_scorer(self.model).name
        get_scorer(self.model, self.scorer)  # raises naming the model's scorers
        if not self.use_user_id and "user" in self.compressed_tables:
            raise ValueError("compressed_tables names 'user' but use_user_id is False (the model has no user table)")

    @property
    def scorer_spec(self) -> Scorer:
        """The registry entry of the model's scorer."""
        return get_scorer(self.model, self.scorer)

    @property
    def scores_catalogue(self) -> bool:
        """Whether the model reads items from its item table through a ``candidate`` feature.

        Such a model builds that feature inside its forward, so TorchRec's sparse-dist
        pipeline cannot start its input all-to-all early.
        """
        return self.scorer_spec.scores_catalogue

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "ModelConfig":
        """This config's fields out of a flat dict (e.g. a saved ``TrainConfig``); other keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in flags.items() if k in names})
