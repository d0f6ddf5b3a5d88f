"""Built-in models for `dpspeed train` and `dpspeed bench`, and timm models by name."""

from __future__ import annotations

import difflib

from torch import nn


def small_cnn(in_channels: int = 1, classes: int = 10) -> nn.Module:
    """Two convolutions with GroupNorm and tanh (tempered activations suit DP), then a linear head."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.Tanh(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, classes),
    )


def mlp(in_features: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 128), nn.Tanh(), nn.Linear(128, classes))


BUILTIN = ("small_cnn", "mlp")


def build(name: str, in_channels: int, image_size: int, classes: int) -> nn.Module:
    """A built-in model by name, `timm:NAME`, `hf:MODEL_TYPE` (random weights), or your own
    `py:FILE_OR_MODULE:FUNCTION`."""
    if name == "small_cnn":
        return small_cnn(in_channels, classes)
    if name == "mlp":
        return mlp(in_channels * image_size * image_size, classes)
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError as err:
            raise ValueError("timm models need timm: pip install timm") from err
        if not timm.is_model(name[5:]):
            near = difflib.get_close_matches(name[5:], timm.list_models(), n=3, cutoff=0.5)
            raise ValueError(f"timm has no model {name[5:]!r}" + (f"; did you mean {', '.join(near)}?" if near else ""))
        options = dict(pretrained=False, num_classes=classes, in_chans=in_channels)
        try:
            return timm.create_model(name[5:], img_size=image_size, **options)
        except TypeError:  # models without an image size argument (CNNs)
            return timm.create_model(name[5:], **options)
    if name.startswith("hf:"):
        return _transformers_classifier(name[3:], classes)
    if name.startswith("py:"):
        return _users_model(name[3:], in_channels, image_size, classes)
    raise ValueError(f"unknown model {name!r}; choose one of {BUILTIN}, timm:NAME, hf:MODEL_TYPE or py:FILE_OR_MODULE:FUNCTION")


def _users_model(target: str, in_channels: int, image_size: int, classes: int) -> nn.Module:
    """Your own model: `path/to/file.py:function` or `package.module:function`, called as
    function(in_channels=, image_size=, classes=) and returning an nn.Module that takes
    (batch, in_channels, image_size, image_size) images."""
    import importlib
    import importlib.util

    where, _, function = target.rpartition(":")
    if not where or not function:
        raise ValueError(f"py:{target}: write py:FILE.py:FUNCTION or py:MODULE:FUNCTION")
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location("dpspeed_users_model", where)
        if spec is None or spec.loader is None:
            raise ValueError(f"py:{target}: cannot load {where}")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except FileNotFoundError as err:
            raise ValueError(f"py:{target}: no file {where}") from err
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(f"py:{target}: cannot import {where} ({err})") from err
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ValueError(f"py:{target}: {where} has no function {function!r}")
    return factory(in_channels=in_channels, image_size=image_size, classes=classes)


def _transformers_classifier(model_type: str, classes: int) -> nn.Module:
    """A transformers sequence classifier with the default configuration of `model_type` (gpt2,
    bert, roberta, ...), random weights, built offline."""
    try:
        import transformers
    except ImportError as err:
        raise ValueError("hf: models need transformers: pip install transformers") from err
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        near = difflib.get_close_matches(model_type, list(CONFIG_MAPPING_NAMES), n=3, cutoff=0.5)
        raise ValueError(f"transformers has no model type {model_type!r}"
                         + (f"; did you mean {', '.join(near)}?" if near else " (use a type such as gpt2 or bert)"))
    config = transformers.AutoConfig.for_model(model_type, num_labels=classes)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0
    return transformers.AutoModelForSequenceClassification.from_config(config)


def is_text(name: str) -> bool:
    """Whether the model takes token ids (transformers) rather than images."""
    return name.startswith("hf:")
