"""The --expert-types SPEC of `meldlite pack`: which source each expert comes from.

A SPEC is a list of rules `(layers, experts) -> LABEL`; LABEL names a source file
(a quantization of the same model, see pack.py).  For each expert the *last* rule
that matches wins, so put broad rules first and exceptions after them.

Inline form, comma-separated:
    Q4_K                 first item without '=': the default (every expert)
    3=Q8_0  or 3.*=Q8_0  every expert of layer 3
    0.5=Q6_K             expert 5 of layer 0
    *.5=Q6_K             expert 5 of every layer
    2-4.0-7=Q8_0         ranges are inclusive
e.g. "Q4_K,3.*=Q8_0,0.5=Q6_K".

JSON form (a path to a file; or inline text starting with '{'):
    {"default": "Q4_K", "layers": {"3": "Q8_0"}, "experts": {"0.5": "Q6_K"}}
applied in that order: default, then layers, then experts (so an expert rule
beats a layer rule); keys use the same selectors as the inline form.
"""

import json
import os
import re
from dataclasses import dataclass

from meldlite.errors import OptionError

_LABEL_RE = re.compile(r"^[A-Za-z0-9_]+$")
_SEL_RE = re.compile(r"^(\*|\d+|\d+-\d+)$")
_JSON_KEYS = ("default", "layers", "experts")


@dataclass(frozen=True)
class Selector:
    """An inclusive range of indices; `*` is lo=0, hi=None."""

    lo: int
    hi: object  # int or None (no upper bound)

    def __contains__(self, i):
        return self.lo <= i and (self.hi is None or i <= self.hi)

    def __str__(self):
        if self.hi is None:
            return "*"
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


ANY = Selector(0, None)


@dataclass(frozen=True)
class Rule:
    layers: Selector
    experts: Selector
    label: str

    def matches(self, layer, e):
        return layer in self.layers and e in self.experts

    def __str__(self):
        return f"{self.layers}.{self.experts}={self.label}"


@dataclass(frozen=True)
class ExpertSpec:
    """Rules in order; the last one that matches an expert gives its source label."""

    rules: tuple

    def label_for(self, layer, e):
        """Source label for expert e of `layer`, or None if no rule matches."""
        label = None
        for rule in self.rules:
            if rule.matches(layer, e):
                label = rule.label
        return label

    def labels(self):
        return {r.label for r in self.rules}

    def __str__(self):
        return ",".join(map(str, self.rules))


def parse_spec(text):
    """Parse a SPEC: inline text, inline JSON, or the path of a JSON file."""
    if not isinstance(text, str) or not text.strip():
        raise OptionError("empty expert-types SPEC")
    text = text.strip()
    if text.startswith("{"):
        return _parse_json(text, "inline JSON SPEC")
    if text.lower().endswith(".json") or os.path.isfile(text):
        return _parse_json(_read_spec_file(text), f"SPEC file {text}")
    return _parse_inline(text)


def _read_spec_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"cannot read SPEC file {path}: {e}") from None


def _parse_inline(text):
    rules = []
    for i, item in enumerate(part.strip() for part in text.split(",")):
        if not item:
            raise OptionError(f"empty item {i + 1} in SPEC {text!r}")
        if "=" not in item:
            if i != 0:
                raise OptionError(f"SPEC item {item!r}: only the first item may omit 'SELECTOR='")
            rules.append(Rule(ANY, ANY, _label(item)))
            continue
        where, _, label = item.partition("=")
        rules.append(_rule(where.strip(), label.strip()))
    return ExpertSpec(tuple(rules))


def _rule(where, label):
    """`L`, `L.*` or `L.E` (each part `*`, `N` or `A-B`) -> Rule."""
    layer_part, dot, expert_part = where.partition(".")
    experts = _selector(expert_part, where) if dot else ANY
    return Rule(_selector(layer_part, where), experts, _label(label))


def _selector(text, where):
    if not _SEL_RE.match(text):
        raise OptionError(
            f"bad SPEC selector {where!r}: use N, A-B or * for the layer and the expert"
        )
    if text == "*":
        return ANY
    lo, _, hi = text.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if hi < lo:
        raise OptionError(f"bad SPEC range {text!r} in {where!r}: end before start")
    return Selector(lo, hi)


def _label(text):
    if not _LABEL_RE.match(text):
        raise OptionError(f"bad source label {text!r} in SPEC: use letters, digits and '_'")
    return text.upper()


def _parse_json(text, what):
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise OptionError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict) or set(obj) - set(_JSON_KEYS):
        raise OptionError(f"{what} must be an object with keys {', '.join(_JSON_KEYS)}")
    rules = []
    if "default" in obj:
        rules.append(Rule(ANY, ANY, _label(_json_str(obj["default"], what))))
    for key in ("layers", "experts"):
        table = obj.get(key, {})
        if not isinstance(table, dict):
            raise OptionError(f"{what}: {key!r} must map selectors to labels")
        for where, label in table.items():
            if key == "layers" and "." in where:
                raise OptionError(f"{what}: layer selector {where!r} must not name an expert")
            if key == "experts" and "." not in where:
                raise OptionError(f"{what}: expert selector {where!r} must be LAYER.EXPERT")
            rules.append(_rule(where, _json_str(label, what)))
    return ExpertSpec(tuple(rules))


def _json_str(value, what):
    if not isinstance(value, str):
        raise OptionError(f"{what}: label {value!r} must be a string")
    return value
