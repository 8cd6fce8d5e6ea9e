"""The model registry and weights by name, in ``torchvision.models``' conventions.

- ``list_models()``: the registered model names.
- ``get_model(name, *, weights=None, progress=True, **kwargs)``: builds a model, with random initialisation
  (``weights=None``) or loaded weights. ``weights`` may be a registered weights name of that model
  (``"DEFAULT"``, ``"COCO_WITH_VOC_LABELS_V1"``, or qualified as ``"DeepLabV3_ResNet101_Weights.DEFAULT"``), a
  ``WeightsEnum`` member, a local path, or an ``http(s)://`` / ``file://`` URL.
- ``get_model_weights(name)``: the model's ``WeightsEnum`` class; ``get_weight("Enum.MEMBER")``: one member.
- ``resolve_weights(name, weights)``: what ``get_model`` loads, as a ``Weights`` (or a member): its ``meta``
  (``num_classes``, ``categories``, ``normalization``, ``source``, ``recipe``) and ``transforms()`` (the input
  preprocessing), for a path or URL too (the model's default normalisation, unless the file name is that of a
  registered weights file, whose entry then applies).
- ``load_weights_state_dict(weights)``: the state dict of resolved weights, converted to the model's key names.

Registered weights (``Weights``: ``url``, ``transforms``, ``meta``, and here also a ``converter`` from the
file's key names to the model's, ``backbone_only`` for ImageNet backbones, the ``model_kwargs`` the weights
fix, e.g. ``num_classes`` and torchvision's ``aux_loss``):

- given by name, the entry's ``model_kwargs`` apply (a conflicting keyword is a ValueError), as in torchvision;
  given a path or URL without ``num_classes``, the class count is read from the checkpoint's classifier (the key
  the model's registration names);
- downloads go through ``torch.hub.load_state_dict_from_url(..., check_hash=True, weights_only=True)`` into
  torch.hub's cache (``torch.hub.get_dir()/checkpoints``), with a progress bar; a file already in the cache is
  used without the network; a download whose sha256 does not start with the file name's hash prefix
  (``name-<sha256 prefix>.pth``) is refused and nothing is left in the cache; a downloaded file that is not a
  checkpoint is removed from the cache again;
- ``backbone_only`` weights (ImageNet classifiers) load into the backbone, which they must fit exactly; the rest
  of the model keeps its initialisation;
- weights of another architecture raise a ValueError listing the missing and unexpected keys.

Errors: ValueError for unknown names, unusable files and weights that do not fit; FileNotFoundError for a
missing local file; OSError for a failed download.
"""
from __future__ import annotations

import dataclasses
import enum
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Type, Union
from urllib.parse import urlparse

from torch import nn

__all__ = ["Weights", "WeightsEnum", "ModelEntry", "register_model", "list_models", "get_model", "build_model",
           "get_model_builder", "get_model_weights", "get_weight", "model_entry", "resolve_weights",
           "resolve_backbone_weights", "load_weights_state_dict", "preprocess"]

_URL_SCHEMES = ("http", "https", "file")


@dataclass(frozen=True, eq=False)
class Weights:
    """One set of weights: where it comes from, how to preprocess inputs for it, and what it is.

    ``url``: the download URL (``None`` for files that must be produced locally, see ``meta["how"]``; for weights
    resolved from a local path, the path). ``transforms``: a callable returning the preprocessing (called
    without arguments, as torchvision's ``weights.transforms()``). ``meta``: ``num_classes``, ``categories``,
    ``normalization``, ``source``, ``recipe`` and notes. ``converter``: maps the file's state dict to the
    model's key names (None: the same names). ``backbone_only``: the weights cover the backbone only.
    ``model_kwargs``: the builder arguments the weights fix. ``check_hash``: the file name carries a sha256
    prefix (torch.hub's ``name-<hash>.ext``). ``file_name``: the name in torch.hub's cache (default: the
    URL's)."""

    url: Optional[str]
    transforms: Callable[..., Any]
    meta: Dict[str, Any]
    converter: Optional[Callable[[Mapping], Mapping]] = None
    backbone_only: bool = False
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    check_hash: bool = True
    file_name: Optional[str] = None

    @property
    def cache_name(self) -> Optional[str]:
        """The file's name in torch.hub's cache."""
        if self.file_name:
            return self.file_name
        return os.path.basename(urlparse(self.url).path) if self.url else None


class WeightsEnum(enum.Enum):
    """The registered weights of one model, as torchvision's ``WeightsEnum``: each member's value is a
    ``Weights``, whose fields the member exposes (``member.url``, ``member.meta``, ``member.transforms()``);
    ``DEFAULT`` (where defined) is an alias of the recommended member."""

    @classmethod
    def verify(cls, obj):
        """``obj`` (a member, its name, ``"Enum.MEMBER"`` or None) as a member of ``cls``; ValueError otherwise."""
        if obj is None or isinstance(obj, cls):
            return obj
        if isinstance(obj, str):
            name = obj[len(cls.__name__) + 1:] if obj.startswith(cls.__name__ + ".") else obj
            if name in cls.__members__:
                return cls.__members__[name]
        raise ValueError(f"{obj!r} is not one of the weights of {cls.__name__}: "
                         f"{', '.join(cls.__members__)}")

    def get_state_dict(self, progress: bool = True):
        """The state dict, downloaded into torch.hub's cache if needed, converted to the model's key names."""
        return load_weights_state_dict(self, progress=progress)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.value, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self._name_}"


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder (the architecture's constructor, called with the model keyword
    arguments), weights enum, family (``"v1"``, ``"v2"``, ``"v3"``: the training loss and BN handling follow it),
    default input normalisation (``"caffe"`` or ``"torchvision"``) for weights that do not say,
    ``classifier_key(**kwargs)``: the state-dict key of the classifier's weight for a model built with ``kwargs``
    (the class count is its first dimension), and ``function``: the public builder in torchvision's form
    (``name(*, weights=None, progress=True, weights_backbone=None, **kwargs)``), which ``get_model_builder``
    returns. ``foreign(state_dict, kwargs)``: recognises another library's layout of this model's state dicts
    (e.g. segmentation_models_pytorch's) and returns it in the model's key names, checking ``kwargs`` (the
    builder arguments) fit it; other state dicts unchanged."""

    name: str
    builder: Callable[..., nn.Module]
    weights: Type[WeightsEnum]
    family: str
    default_mode: str
    classifier_key: Callable[..., str]
    function: Optional[Callable[..., nn.Module]] = None
    foreign: Optional[Callable[[Mapping, dict], Mapping]] = None


_REGISTRY: "OrderedDict[str, ModelEntry]" = OrderedDict()


def register_model(name: str, builder: Callable[..., nn.Module], *, weights: Type[WeightsEnum], family: str,
                   default_mode: str, classifier_key: Callable[..., str],
                   function: Optional[Callable[..., nn.Module]] = None,
                   foreign: Optional[Callable[[Mapping, dict], Mapping]] = None) -> ModelEntry:
    """Adds a model to the registry (ValueError for a name that is taken); returns its entry."""
    if name in _REGISTRY:
        raise ValueError(f"register_model: {name!r} is already registered")
    entry = ModelEntry(name, builder, weights, family, default_mode, classifier_key, function, foreign)
    _REGISTRY[name] = entry
    return entry


def list_models() -> List[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The registration of ``name``; ValueError listing the valid names for an unknown one."""
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return entry


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The public builder of ``name`` (torchvision's form: ``builder(*, weights=None, progress=True,
    weights_backbone=None, **kwargs)``)."""
    entry = model_entry(name)
    return entry.function or entry.builder


def get_model_weights(name) -> Type[WeightsEnum]:
    """The ``WeightsEnum`` class of model ``name`` (or of the model a builder function registers)."""
    if callable(name) and not isinstance(name, str):
        for entry in _REGISTRY.values():
            if entry.builder is name or entry.function is name:
                return entry.weights
        raise ValueError(f"get_model_weights: {name!r} is not a registered model builder")
    return model_entry(name).weights


def get_weight(name: str) -> WeightsEnum:
    """The member ``"EnumName.MEMBER"`` of any registered weights enum."""
    if not isinstance(name, str) or "." not in name:
        raise ValueError(f"get_weight: expected 'EnumName.MEMBER', got {name!r}")
    enum_name, member = name.split(".", 1)
    for entry in _REGISTRY.values():
        if entry.weights.__name__ == enum_name:
            return entry.weights.verify(member)
    raise ValueError(f"get_weight: no registered weights enum is called {enum_name!r}")


def _weights_name(weights) -> str:
    return repr(weights) if isinstance(weights, WeightsEnum) else str(weights.url)


def _is_url(text: str) -> bool:
    return urlparse(text).scheme in _URL_SCHEMES


def _registered_by_file_name(entry: ModelEntry, file_name: str) -> Optional[WeightsEnum]:
    for member in entry.weights:
        if member.cache_name == file_name:
            return member
    return None


def _default_weights(entry: ModelEntry, location: str) -> Weights:
    from .transforms import SegmentationPreset, normalization_meta

    return Weights(url=location, transforms=lambda: SegmentationPreset(entry.default_mode),
                   meta={"num_classes": None, "categories": None,
                         "normalization": normalization_meta(entry.default_mode), "source": location,
                         "recipe": None}, check_hash=True)


def _available(entry: ModelEntry) -> str:
    return ", ".join(entry.weights.__members__) or "none"


def _by_url(entry: ModelEntry, weights) -> WeightsEnum:
    """Another library's weights member (torchvision's ``WeightsEnum``: it has a ``url``) as the member of
    ``entry`` for the same file; ValueError when none is."""
    file_name = os.path.basename(urlparse(weights.url).path)
    member = _registered_by_file_name(entry, file_name)
    if member is None:
        raise ValueError(f"weights {weights!r} ({weights.url}) are not registered for {entry.name} (its weights: "
                         f"{entry.weights.__name__}: {_available(entry)})")
    return member


def resolve_weights(name: str, weights) -> Union[WeightsEnum, Weights]:
    """What ``get_model(name, weights=weights)`` loads: a registered member, or for a path / URL a ``Weights``
    whose ``url`` is that location (with the registered entry's converter and meta when the file name is that
    of a registered weights file of this model, else the model's default normalisation)."""
    entry = model_entry(name)
    if isinstance(weights, Weights):
        return weights
    if isinstance(weights, WeightsEnum):
        if not isinstance(weights, entry.weights):
            raise ValueError(f"weights {weights!r} are not weights of {name} (its weights: "
                             f"{entry.weights.__name__}: {_available(entry)})")
        return weights
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if isinstance(weights, enum.Enum) and isinstance(getattr(weights, "url", None), str):
        return _by_url(entry, weights)
    if not isinstance(weights, str) or not weights:
        raise ValueError(f"weights must be None, a weights name, a path or a URL, got {weights!r}")
    if weights in entry.weights.__members__:
        return entry.weights.__members__[weights]
    enums = {e.weights.__name__ for e in _REGISTRY.values()}
    if weights.split(".", 1)[0] in enums and not os.path.exists(weights):
        return resolve_weights(name, get_weight(weights))
    if _is_url(weights):
        file_name = os.path.basename(urlparse(weights).path)
    else:
        if not os.path.exists(weights):
            raise FileNotFoundError(f"weights {weights!r}: no such file, and not a registered weights name of "
                                    f"{name} ({_available(entry)})")
        file_name = os.path.basename(weights)
    member = _registered_by_file_name(entry, file_name)
    if member is not None:
        return dataclasses.replace(member.value, url=weights)
    return _default_weights(entry, weights)


def _hub_checkpoint_dir() -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _download(url: str, file_name: Optional[str], check_hash: bool, progress: bool):
    """torch.hub.load_state_dict_from_url into torch.hub's cache; the object, or OSError / ValueError. A file
    that this call downloaded and that does not load is removed from the cache."""
    import torch

    cached = os.path.join(_hub_checkpoint_dir(), file_name or os.path.basename(urlparse(url).path))
    existed = os.path.exists(cached)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=progress,
                                                  check_hash=check_hash, file_name=file_name, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear error
        downloaded = not existed and os.path.exists(cached)
        if not existed and not downloaded:  # the download itself failed: nothing reached the cache
            reason = f"{type(exc).__name__}: {exc}"
            if "invalid hash value" in str(exc):
                from .weights import CheckpointError

                raise CheckpointError(f"weights {url!r}: the download's sha256 does not match the hash prefix of its "
                                 f"file name; refused, nothing was cached ({exc})") from None
            raise OSError(f"weights {url!r}: download failed ({reason})") from None
        if downloaded:
            try:
                os.unlink(cached)
            except OSError:
                pass
        from .weights import CheckpointError

        raise CheckpointError(f"weights {url!r}: {cached!r} is not a weights-only PyTorch checkpoint "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                         + ("; removed it from the cache" if downloaded else "")) from None


def load_weights_state_dict(weights, progress: bool = True) -> "OrderedDict":
    """The state dict of ``weights`` (a member or a ``Weights``), converted to the model's key names: downloaded
    through torch.hub's cache for a URL, read from the cache for registered files without a URL, read directly
    for a local path."""
    from .weights import as_state_dict, load_checkpoint

    w = weights.value if isinstance(weights, WeightsEnum) else weights
    name = _weights_name(weights)
    if w.url is None:
        cached = os.path.join(_hub_checkpoint_dir(), w.cache_name or "")
        if not w.cache_name or not os.path.isfile(cached):
            raise ValueError(f"weights {name}: not downloadable; {w.meta.get('how', '')} and place it in "
                             f"torch.hub's cache as {cached!r} (or give its path)")
        state = load_checkpoint(cached)
    elif _is_url(w.url):
        state = as_state_dict(_download(w.url, w.file_name, w.check_hash, progress), w.url)
    else:
        state = load_checkpoint(w.url)
    if w.converter is not None:
        state = w.converter(state)
    return state


def _load_backbone(model: nn.Module, state: Mapping, name: str) -> None:
    """Every tensor of ``state`` into ``model`` (ValueError when one has no place or another shape)."""
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    if unexpected or shapes or not state:
        from .weights import key_list

        raise ValueError(f"weights {name} do not fit {type(model).__name__}'s backbone: "
                         f"{len(unexpected)} unexpected keys ({key_list(unexpected)}), "
                         f"{len(shapes)} shape mismatches ({key_list(shapes)})")
    model.load_state_dict(state, strict=False)


def resolve_backbone_weights(name: str, weights_backbone) -> Union[WeightsEnum, Weights]:
    """``weights_backbone`` of ``get_model(name, weights_backbone=...)`` as backbone-only weights: a
    ``backbone_only`` member of the model's enum (or its name), torchvision's member for the same file (e.g.
    ``ResNet50_Weights.IMAGENET1K_V1``), or a path / URL of such a file (torchvision's classifier state dict,
    converted as the model's registered backbone weights are). ValueError otherwise."""
    entry = model_entry(name)
    backbone_members = [m for m in entry.weights if m.backbone_only]
    if not backbone_members:
        raise ValueError(f"{name} has no registered backbone weights; weights_backbone must be None")
    if isinstance(weights_backbone, enum.Enum) and not isinstance(weights_backbone, WeightsEnum):
        w = _by_url(entry, weights_backbone)
    elif isinstance(weights_backbone, (str, os.PathLike)) and not (
            isinstance(weights_backbone, str) and (weights_backbone in entry.weights.__members__
                                                   or weights_backbone.split(".", 1)[0] == entry.weights.__name__)):
        location = os.fspath(weights_backbone)
        if not _is_url(location) and not os.path.exists(location):
            raise FileNotFoundError(f"weights_backbone {location!r}: no such file, and not a registered backbone "
                                    f"weights name of {name} ({', '.join(m.name for m in backbone_members)})")
        return dataclasses.replace(backbone_members[0].value, url=location, check_hash=False, file_name=None)
    else:
        w = entry.weights.verify(weights_backbone)
    if not w.backbone_only:
        raise ValueError(f"weights_backbone {w!r} are the whole model's weights; give them as weights= (backbone "
                         f"weights of {name}: {', '.join(m.name for m in backbone_members)})")
    return w


def get_model(name: str, *, weights=None, progress: bool = True, weights_backbone=None, **kwargs) -> nn.Module:
    """Builds model ``name`` with ``kwargs``; with ``weights`` (see the module docstring), loads them.

    As torchvision's builders: ``num_classes=None`` and ``aux_loss=None`` mean "the default, or what the weights
    fix"; a registered name fixes its ``model_kwargs`` (``num_classes``, ``aux_loss``); with a path or URL and no
    ``num_classes``, the class count is read from the checkpoint. ``backbone_only`` weights fill the backbone
    and leave the rest initialised. ``weights_backbone`` (``resolve_backbone_weights``) loads ImageNet weights
    into the backbone of a model built without ``weights`` (ignored when ``weights`` is given, as in
    torchvision). ValueError for unknown names, unreadable files and weights that do not fit."""
    entry = model_entry(name)
    kwargs = {k: v for k, v in kwargs.items() if not (v is None and k in ("num_classes", "aux_loss"))}
    if weights is None:
        if weights_backbone is None:
            return entry.builder(**kwargs)
        weights = resolve_backbone_weights(name, weights_backbone)
    w = resolve_weights(name, weights)
    return build_model(name, load_weights_state_dict(w, progress=progress), weights=w, **kwargs)


def build_model(name: str, state_dict: Mapping, *, weights=None, **kwargs) -> nn.Module:
    """Model ``name`` built around a state dict already loaded and converted (``load_weights_state_dict``), as
    ``get_model`` does: ``weights`` (a member or ``Weights``, None for a plain state dict) says which builder
    arguments it fixes and whether it is a backbone only."""
    entry = model_entry(name)
    wname = _weights_name(weights) if weights is not None else "the state dict"
    if weights is not None and weights.backbone_only:
        model = entry.builder(**kwargs)
        _load_backbone(model, state_dict, wname)
        return model
    for key, value in (weights.model_kwargs if weights is not None else {}).items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"get_model: {name} with weights {wname}: {key}={kwargs[key]!r} does not fit these "
                             f"weights ({key}={value!r})")
        kwargs[key] = value
    if entry.foreign is not None:
        state_dict = entry.foreign(state_dict, kwargs)
    if kwargs.get("num_classes") is None:
        key = entry.classifier_key(**kwargs)
        if key not in state_dict:
            raise ValueError(f"get_model: cannot tell the number of classes of {wname}: it has no {key!r} (the "
                             f"classifier of {name}); give num_classes")
        kwargs["num_classes"] = int(state_dict[key].shape[0])
    model = entry.builder(**kwargs)
    from .weights import load_weights

    load_weights(model, _drop_unused(model, state_dict), strict=True,
                 _owner=f"get_model({name!r}, weights={wname})")
    return model


def _drop_unused(model: nn.Module, state: Mapping) -> Mapping:
    """torchvision's DeepLabV3 weights carry the auxiliary head; a model built without it takes the rest."""
    if getattr(model, "aux_classifier", False) is None:
        return OrderedDict((k, v) for k, v in state.items() if not k.startswith("aux_classifier."))
    return state


def preprocess(images, mode: str):
    """``SegmentationPreset(mode)(images)``: uint8 RGB images as the model input; ``mode`` is "caffe",
    "torchvision", or a registered model name for that model's default normalisation."""
    from .transforms import MODES, SegmentationPreset

    return SegmentationPreset(mode if mode in MODES else model_entry(mode).default_mode)(images)
