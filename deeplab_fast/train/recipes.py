"""The training recipes, as data: each :class:`~deeplab_fast.train.families.Family` holds its own (the papers'
and torchvision's; sources in :mod:`deeplab_fast.train.families`). ``deeplab-fast train --recipe NAME`` applies
one, ``deeplab-fast train --model NAME`` takes the model's recipe (or its family's) as defaults, and
docs/guide/training.md's recipe table is ``recipes_table()`` (a test keeps the two equal).
"""
from __future__ import annotations

import json
from types import MappingProxyType
from typing import Mapping, Optional

from ..models import model_entry
from .families import DEFAULT_WEIGHT_DECAY, FAMILIES, Recipe, family

__all__ = ["Recipe", "RECIPES", "recipe_for_family", "recipe_for_model", "recipes_table", "training_settings"]

_RECIPES = tuple(r for f in FAMILIES.values() for r in f.recipes)

RECIPES: Mapping[str, Recipe] = MappingProxyType({r.name: r for r in _RECIPES})


def recipe_for_family(name: str) -> Recipe:
    """The default recipe of a model family (a ``FAMILIES`` key); ValueError for an unknown family."""
    return family(name).recipe


def recipe_for_model(model: str) -> Recipe:
    """The recipe whose hyperparameters are the defaults of ``train --model MODEL``: the first recipe of that model,
    else its family's default recipe."""
    fam = family(model_entry(model).family)
    return next((r for r in fam.recipes if r.model == model), fam.recipe)


def _kwargs_json(kwargs: Mapping) -> str:
    return json.dumps(dict(kwargs))


def recipes_table() -> str:
    """docs/guide/training.md's table of the recipes (markdown), from ``RECIPES``."""
    lines = ["| recipe | command | what it sets | settings (source) |", "|---|---|---|---|"]
    for r in _RECIPES:
        sets = [f"`--model {r.model}`"]
        if r.model_kwargs:
            sets.append(f"`--model-kwargs '{_kwargs_json(r.model_kwargs)}'`")
        if r.init:
            sets.append(f"`--init {r.init}`")
        sets.append(f"`--steps {r.steps} --batch-size {r.batch_size} --lr {r.lr:g} --crop-size {r.crop_size}"
                    + (f" --weight-decay {r.weight_decay:g}`" if r.weight_decay != DEFAULT_WEIGHT_DECAY else "`"))
        command = f"`train --recipe {r.name} --augmented --data ROOT`; eval: `{r.eval}`"
        lines.append(f"| {r.title} | {command} | {', '.join(sets)} | {r.settings} |")
    return "\n".join(lines) + "\n"


def training_settings(*, model: Optional[str] = None, recipe: Optional[str] = None,
                      init_args: Optional[Mapping] = None, num_classes: Optional[int] = None,
                      model_kwargs: Optional[Mapping] = None, init=None, preprocessing: Optional[str] = None,
                      steps: Optional[int] = None, batch_size: Optional[int] = None, lr: Optional[float] = None,
                      crop_size: Optional[int] = None, weight_decay: Optional[float] = None) -> dict:
    """The :class:`~deeplab_fast.train.TrainConfig` fields of a run from what was given (None: not given) and
    the defaults, as ``deeplab-fast train`` applies them. Each field takes, in order: the given value; the
    ``recipe``'s (a :data:`RECIPES` name: its model, model options, ``init`` weights and hyperparameters); those
    of a ``deeplab-fast train`` checkpoint given as ``init`` (``init_args``, its ``"args"``: the model, options,
    classes and preprocessing, when it is of the same model and no recipe is given); the model's recipe
    (:func:`recipe_for_model`: hyperparameters and ``family_model_kwargs``). ``model_kwargs`` updates the
    defaults' model options; ``num_classes`` defaults to 21; ``preprocessing`` stays None when nothing gives it
    (``train`` resolves it from the ``init`` weights or the model).

    Returns a dict with ``model``, ``num_classes``, ``model_kwargs``, ``init``, ``preprocessing``, ``steps``,
    ``batch_size``, ``lr``, ``crop_size``, ``weight_decay``. ValueError for an unknown recipe, no model at all,
    or a recipe of another model family than ``model``."""
    chosen = None
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        chosen = RECIPES[recipe]
    from_init = dict(init_args or {}) if chosen is None else {}
    if from_init and model not in (None, from_init.get("model")):
        from_init = {}  # another architecture: only tensors that match by name and shape are loaded
    model = model or (chosen.model if chosen else None) or from_init.get("model")
    if model is None:
        raise ValueError("give a model or a recipe")
    model_family = model_entry(model).family
    if chosen is not None and chosen.family != model_family:
        raise ValueError(f"recipe {chosen.name} is for {chosen.model} ({chosen.family}), not {model}")
    defaults = chosen or recipe_for_model(model)
    if chosen is not None:
        kwargs = dict(chosen.model_kwargs)
    else:
        kwargs = dict(from_init["model_kwargs"] if "model_kwargs" in from_init else defaults.family_model_kwargs)
    kwargs.update(model_kwargs or {})
    return dict(model=model, num_classes=num_classes or int(from_init.get("num_classes") or 21), model_kwargs=kwargs,
                init=init if init is not None else (chosen.init if chosen else None),
                preprocessing=preprocessing or from_init.get("preprocessing"), steps=steps or defaults.steps,
                batch_size=batch_size or defaults.batch_size, lr=lr or defaults.lr,
                crop_size=crop_size or defaults.crop_size,
                weight_decay=defaults.weight_decay if weight_decay is None else weight_decay)
