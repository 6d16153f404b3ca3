"""The scorers, each defined once: how a model turns its query into a score per item.

A scorer belongs to one model kind (``next_item`` or ``ranknet``). Its registry
entry holds everything the rest of the package asks about it:

- ``scores_catalogue``: items are scored by their vectors in the (possibly
  compressed) item table, which the model reads through a ``candidate`` feature
  (the builder adds that feature to the item table, the trainer knows the model
  builds it inside its forward);
- ``output_layer``: an output layer with one uncompressed row per item (the item
  table is an input only; ``--cluster-vectors output`` needs one);
- ``pair_network``: a network over each (query, item) pair, whose working memory
  is ``batch x num_items x d`` (the export bounds such a program's batch);
- ``slim_parts``: how the export copies the trained module's query network and
  scorer, as a ``"module:function"`` path in ``export/`` resolved on use
  (``slim_parts_builder``, called by ``export/`` only), so that ``models/`` does
  not import ``export/``.

Configs, models, training and export look a scorer up here (``get_scorer``); none
of them compares scorer names. Torch-free, like ``models.config``, which reads it.
Adding a scorer means writing its branch of the model, its slim parts in
``export/scorers.py`` and one ``register_scorer`` call.
"""

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

NEXT_ITEM, RANKNET = "next_item", "ranknet"
# The model kinds (``ModelConfig.model``); each model class declares its own as ``model_kind``.
MODELS = (NEXT_ITEM, RANKNET)


@dataclass(frozen=True)
class Scorer:
    """One scorer of one model kind (see the module docstring).

    Args:
        name (str): the name used in configs and on the command line (``--scorer``).
        model (str): the model kind it belongs to, one of ``MODELS``.
        description (str): one line for help texts and reports.
        scores_catalogue (bool): items are scored by their vectors in the item table,
            read through a ``candidate`` feature.
        output_layer (bool): an output layer with one uncompressed row per item.
        pair_network (bool): a network over each (query, item) pair
            (``batch x num_items x d`` working memory in full ranking).
        slim_parts (str): ``"module:function"`` in ``export/``: trained model ->
            ``(query network, slim scorer)`` ("": no slim export).
    """

    name: str
    model: str
    description: str
    scores_catalogue: bool
    output_layer: bool = False
    pair_network: bool = False
    slim_parts: str = ""

    @property
    def kind(self) -> str:
        """``model/name``, e.g. ``next_item/tied`` (what reports and exported models call it)."""
        return f"{self.model}/{self.name}"

    def slim_parts_builder(self) -> Callable[[Any], Tuple[Any, Any]]:
        """The export's function: trained model -> ``(query network, slim scorer)``.

        Raises:
            ValueError: the scorer has no slim export.
        """
        if not self.slim_parts:
            raise ValueError(f"scorer '{self.name}' of model '{self.model}' has no slim export")
        module, _, name = self.slim_parts.partition(":")
        return getattr(importlib.import_module(module), name)


_SCORERS: Dict[Tuple[str, str], Scorer] = {}


def register_scorer(scorer: Scorer) -> Scorer:
    """Adds a scorer to the registry (a ``(model, name)`` pair is registered once)."""
    if scorer.model not in MODELS:
        raise ValueError(f"scorer '{scorer.name}': unknown model '{scorer.model}'; choose one of {list(MODELS)}")
    key = (scorer.model, scorer.name)
    if key in _SCORERS:
        raise ValueError(f"scorer '{scorer.name}' of model '{scorer.model}' is already registered")
    _SCORERS[key] = scorer
    return scorer


def check_model(model: str) -> str:
    """``model`` if it is a known model kind.

    Raises:
        ValueError: naming the unknown model and the known ones.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model '{model}'; choose one of {list(MODELS)}")
    return model


def scorer_names(model: str) -> List[str]:
    """The scorers of ``model``, its default first (registration order)."""
    check_model(model)
    return [name for (m, name) in _SCORERS if m == model]


def default_scorer(model: str) -> Scorer:
    """The scorer ``model`` gets when none is named (``--scorer ""``)."""
    return _SCORERS[(model, scorer_names(model)[0])]


def get_scorer(model: str, name: str) -> Scorer:
    """The registered scorer ``name`` of ``model``.

    Raises:
        ValueError: naming the unknown model, or the unknown scorer and the model's scorers.
    """
    if (check_model(model), name) not in _SCORERS:
        raise ValueError(f"unknown scorer '{name}' for model '{model}'; choose one of {scorer_names(model)}")
    return _SCORERS[(model, name)]


def all_scorers() -> List[Scorer]:
    """Every registered scorer, in registration order."""
    return list(_SCORERS.values())


# ----------------------------------------------------------------- the scorers
LINEAR: Scorer = register_scorer(Scorer(
    name="linear",
    model=NEXT_ITEM,
    description="an output layer with one uncompressed row per item, logit_i = <h, o_i> + b_i",
    scores_catalogue=False,
    output_layer=True,
    slim_parts="memcom_torchrec.export.scorers:linear_parts",
))
TIED: Scorer = register_scorer(Scorer(
    name="tied",
    model=NEXT_ITEM,
    description="logits from the input item table, logit_i = <q, e_i> + b_i (q: the MLP's output projected to d)",
    scores_catalogue=True,
    slim_parts="memcom_torchrec.export.scorers:tied_parts",
))
DOT: Scorer = register_scorer(Scorer(
    name="dot",
    model=RANKNET,
    description="<q, e_i> with e_i from the item table",
    scores_catalogue=True,
    slim_parts="memcom_torchrec.export.scorers:dot_parts",
))
MLP: Scorer = register_scorer(Scorer(
    name="mlp",
    model=RANKNET,
    description="the paper's pair network over [q, e_i]: Linear(2d, d) -> ReLU -> Linear(d, 1)",
    scores_catalogue=True,
    pair_network=True,
    slim_parts="memcom_torchrec.export.scorers:pair_mlp_parts",
))
