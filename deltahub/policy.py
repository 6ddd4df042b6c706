"""Which tensors get which method: defaults plus per-name-pattern rules.

Defaults: tensors of one dimension or none (norms, biases, scalars) are stored ``dense`` since
they are tiny and the most sensitive to error (D-QRELO, Section 5), or ``lossless`` when the
policy's method is ``lossless``; everything else gets the policy's method at its ratio. Rules are ``fnmatch`` patterns on the checkpoint's tensor names,
tried in order, the first match winning.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from .methods import METHODS, get_method


@dataclass(frozen=True)
class Rule:
    """``pattern`` -> ``method`` with ``params`` (``ratio`` among them overrides the policy's)."""

    pattern: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "Rule":
        """Parse the CLI form ``PATTERN=METHOD[:key=value,...]``.

        >>> Rule.parse("*.mlp.*=svd:rank=64,factor_dtype=F32")
        Rule(pattern='*.mlp.*', method='svd', params={'rank': 64, 'factor_dtype': 'F32'})
        >>> Rule.parse("*embed_tokens*=dqrelo:ratio=0.25").params
        {'ratio': 0.25}
        """
        head, _, args = text.partition(":")
        pattern, sep, method = head.rpartition("=")
        if not sep or not pattern or not method:
            raise ValueError(f"rule {text!r} must look like PATTERN=METHOD[:key=value,...], e.g. '*.mlp.*=svd:rank=64'")
        params = {}
        for item in filter(None, args.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"rule {text!r}: parameter {item!r} must be key=value")
            params[key.strip()] = parse_value(value.strip())
        get_method(method, **{k: v for k, v in params.items() if k != "ratio"})  # fail early on typos
        return cls(pattern, method, params)

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "method": self.method, "params": self.params}


def parse_value(text: str) -> Any:
    """A parameter value as typed on a command line: a Python literal, ``true``/``false``/``none``
    in any case, a fraction ``1/16``, or else the text itself.

    >>> parse_value("64"), parse_value("true"), parse_value("1/4"), parse_value("F32")
    (64, True, 0.25, 'F32')
    """
    words = {"true": True, "false": False, "none": None, "null": None}
    if text.strip().lower() in words:
        return words[text.strip().lower()]
    if "/" in text:
        num, _, den = text.partition("/")
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            return text
    if len(text) > 200:  # no parameter value is longer; literal_eval of a long one can exhaust memory or recursion
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


@dataclass
class Policy:
    """The method and ratio for each tensor name and shape.

    >>> p = Policy("dqrelo", 1/8, rules=[Rule.parse("lm_head.weight=svd:ratio=0.25")])
    >>> p.resolve("model.norm.weight", (576,))
    ('dense', {}, None)
    >>> p.resolve("lm_head.weight", (49152, 576))
    ('svd', {}, 0.25)
    """

    method: str = "auto"
    ratio: float | None = 1 / 8
    params: dict[str, Any] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    dense_max_ndim: int = 1

    def resolve(self, name: str, shape: tuple[int, ...]) -> tuple[str, dict[str, Any], float | None]:
        """``(method, params, ratio)`` for one tensor."""
        for rule in self.rules:
            if fnmatchcase(name, rule.pattern):
                params = dict(rule.params)
                ratio = params.pop("ratio", self._ratio_for(rule.method))
                return rule.method, params, ratio
        if len(shape) <= self.dense_max_ndim:
            # "lossless" promises the fine-tune bit for bit: a dense delta rounded to the weights'
            # dtype would not keep it, so small tensors stay exact too.
            return ("lossless", {}, None) if self.method == "lossless" else ("dense", {}, None)
        return self.method, dict(self.params), self._ratio_for(self.method)

    def _ratio_for(self, method: str) -> float | None:
        # dense and lossless have no target ratio: the policy's does not apply to them.
        return self.ratio if METHODS[method].takes_ratio else None

    def to_dict(self) -> dict:
        return {"method": self.method, "ratio": self.ratio, "params": self.params, "rules": [r.to_dict() for r in self.rules], "dense_max_ndim": self.dense_max_ndim}
