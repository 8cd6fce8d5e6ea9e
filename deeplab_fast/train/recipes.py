"""The DeepLab papers' training recipes, as data: one entry per recipe. ``deeplab-fast train --recipe NAME`` applies
one, ``deeplab-fast train --model NAME`` takes its family's hyperparameters as defaults, and the README's recipe
table is ``recipes_table()`` (a test keeps the two equal).

Sources: v1: Chen et al., ICLR 2015, sec. 4.1 (batch 20, lr 1e-3, 6000 iterations; a step policy there, poly
here); v2: TPAMI 2017, sec. 4.1 / Table 4 (poly, batch 10, 20k iterations, 321 crops) with the ResNet lr 2.5e-4
of the released prototxt (kazuto1011/deeplab-pytorch ``configs/voc12.yaml``); v3: arXiv:1706.05587, sec. 4.1
(lr 7e-3, poly, crop 513, batch 16, output stride 16, 30k iterations).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

from ..models import model_entry

__all__ = ["Recipe", "RECIPES", "recipe_for_family", "recipes_table", "training_settings"]


@dataclass(frozen=True)
class Recipe:
    """One paper recipe. ``model_kwargs``: the recipe's model options; ``family_model_kwargs``: the part of them
    that is also the family's default (``train --model`` without ``--recipe``); ``init``: the registered
    weights the recipe starts from (``get_model_weights(model)`` member name); ``eval``: the ``deeplab-fast
    eval`` options of the paper's evaluation; ``settings``: what the paper says, for the README."""

    name: str
    title: str
    family: str
    model: str
    init: Optional[str]
    steps: int
    batch_size: int
    lr: float
    crop_size: int
    eval: str
    settings: str
    model_kwargs: Mapping = field(default_factory=dict)
    family_model_kwargs: Mapping = field(default_factory=dict)


_RECIPES = (
    Recipe(
        name="v1_largefov", title="v1 LargeFOV (Chen et al., ICLR 2015, sec. 4)", family="v1",
        model="deeplab_v1_largefov", init="IMAGENET1K_VGG16_BACKBONE", steps=6000, batch_size=20, lr=1e-3,
        crop_size=321, eval="--crf deeplab_v2_voc",
        settings="ImageNet VGG-16 init (torchvision's `vgg16` weights, into `features`); batch 20, crop 321, lr 1e-3 "
                 "(10x for fc8), momentum 0.9, weight decay 5e-4, 6000 iterations (the paper steps the lr by 0.1 "
                 "every 2000; here poly); loss against the labels downsampled by 8; CRF `deeplab_v2_voc`-style "
                 "kernels cross-validated on val"),
    Recipe(
        name="v2_aspp_l_msc", title="v2 ResNet-101 ASPP-L MSC (TPAMI 2017, sec. 4.1)", family="v2",
        model="deeplab_v2_resnet101", init="COCO_INIT_CAFFE", steps=20000, batch_size=10, lr=2.5e-4,
        crop_size=321, eval="--crf deeplab_v2_voc", model_kwargs={"msc": True},
        settings="COCO-initialised ResNet-101 (kazuto1011's converted Caffe `init` model; BN frozen); batch 10, "
                 "crop 321, lr 2.5e-4, poly 0.9, 20k iterations, random scaling 0.5-1.5 and flips; MSC loss over "
                 "1, 0.75/0.5 and max; eval at 1 scale (MSC inside the model) + CRF `deeplab_v2_voc`"),
    Recipe(
        name="v3_os16", title="v3 ResNet-101 OS16 (arXiv:1706.05587, sec. 4)", family="v3",
        model="deeplab_v3_resnet101", init="IMAGENET1K_BACKBONE", steps=30000, batch_size=16, lr=7e-3,
        crop_size=513, eval="--scales 0.5,0.75,1.0,1.25,1.5,1.75 --flip",
        model_kwargs={"head": "paper", "output_stride": 16}, family_model_kwargs={"output_stride": 16},
        settings="ImageNet ResNet-101 init (torchvision's weights, into `backbone`); batch 16, crop 513, lr 7e-3, "
                 "poly 0.9, output stride 16 (multi-grid 1, 2, 4), 30k iterations; eval over six scales with "
                 "flips (the paper also fine-tunes at OS8 with frozen BN)"),
)

RECIPES: Mapping[str, Recipe] = MappingProxyType({r.name: r for r in _RECIPES})


def recipe_for_family(family: str) -> Recipe:
    """The recipe whose hyperparameters are the defaults of a model family ("v1", "v2", "v3")."""
    for r in _RECIPES:
        if r.family == family:
            return r
    raise ValueError(f"no recipe for the model family {family!r}")


def _kwargs_json(kwargs: Mapping) -> str:
    return json.dumps(dict(kwargs))


def recipes_table() -> str:
    """The README's table of the recipes (markdown), from ``RECIPES``."""
    lines = ["| recipe | command | what it sets | settings (paper) |", "|---|---|---|---|"]
    for r in _RECIPES:
        sets = [f"`--model {r.model}`"]
        if r.model_kwargs:
            sets.append(f"`--model-kwargs '{_kwargs_json(r.model_kwargs)}'`")
        if r.init:
            sets.append(f"`--init {r.init}`")
        sets.append(f"`--steps {r.steps} --batch-size {r.batch_size} --lr {r.lr:g} --crop-size {r.crop_size}`")
        command = f"`train --recipe {r.name} --augmented --data ROOT`; eval: `{r.eval}`"
        lines.append(f"| {r.title} | {command} | {', '.join(sets)} | {r.settings} |")
    return "\n".join(lines) + "\n"


def training_settings(*, model: Optional[str] = None, recipe: Optional[str] = None,
                      init_args: Optional[Mapping] = None, num_classes: Optional[int] = None,
                      model_kwargs: Optional[Mapping] = None, init=None, preprocessing: Optional[str] = None,
                      steps: Optional[int] = None, batch_size: Optional[int] = None, lr: Optional[float] = None,
                      crop_size: Optional[int] = None) -> dict:
    """The :class:`~deeplab_fast.train.TrainConfig` fields of a run from what was given (None: not given) and
    the defaults, as ``deeplab-fast train`` applies them. Each field takes, in order: the given value; the
    ``recipe``'s (a :data:`RECIPES` name: its model, model options, ``init`` weights and hyperparameters); those
    of a ``deeplab-fast train`` checkpoint given as ``init`` (``init_args``, its ``"args"``: the model, options,
    classes and preprocessing, when it is of the same model and no recipe is given); the model family's recipe
    (:func:`recipe_for_family`: hyperparameters and ``family_model_kwargs``). ``model_kwargs`` updates the
    defaults' model options; ``num_classes`` defaults to 21; ``preprocessing`` stays None when nothing gives it
    (``train`` resolves it from the ``init`` weights or the model).

    Returns a dict with ``model``, ``num_classes``, ``model_kwargs``, ``init``, ``preprocessing``, ``steps``,
    ``batch_size``, ``lr``, ``crop_size``. ValueError for an unknown recipe, no model at all, or a recipe of
    another model family than ``model``."""
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
    family = model_entry(model).family
    if chosen is not None and chosen.family != family:
        raise ValueError(f"recipe {chosen.name} is for {chosen.model} ({chosen.family}), not {model}")
    defaults = chosen or recipe_for_family(family)
    if chosen is not None:
        kwargs = dict(chosen.model_kwargs)
    else:
        kwargs = dict(from_init["model_kwargs"] if "model_kwargs" in from_init else defaults.family_model_kwargs)
    kwargs.update(model_kwargs or {})
    return dict(model=model, num_classes=num_classes or int(from_init.get("num_classes") or 21), model_kwargs=kwargs,
                init=init if init is not None else (chosen.init if chosen else None),
                preprocessing=preprocessing or from_init.get("preprocessing"), steps=steps or defaults.steps,
                batch_size=batch_size or defaults.batch_size, lr=lr or defaults.lr,
                crop_size=crop_size or defaults.crop_size)
