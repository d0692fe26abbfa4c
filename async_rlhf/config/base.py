"""Base pieces shared by the config modules: the one-line error, the strict model, `key.sub=value` overrides."""
from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from async_rlhf.config.redaction import may_be_secret


class ConfigError(ValueError):
    """A configuration problem, explained in one line."""


class Strict(BaseModel):
    # inf passes `gt=0`-style bounds (learner.lr=inf was accepted) and nan some others: both refused
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_no_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads yes, no, on, off, true and false as booleans, which pydantic takes as the numbers 1 and 0:
        `learner.steps: yes` trained one step and `loss.beta: on` was 1.0, without a word."""
        if isinstance(value, bool) and info.field_name and _numeric(cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError("bool_for_number", "a yes/no value where a number is expected (YAML reads yes, "
                                      "no, on, off, true and false as booleans); write the number")
        return value


def _numeric(annotation: Any) -> bool:
    """An int or float setting, optional or not, or a choice of numbers (Literal[0, 1, 2, 3])."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if args:  # a Union
        return any(_numeric(a) for a in args)
    return annotation in (int, float)


def environment_checks(info: ValidationInfo) -> bool:
    """Whether to check this machine (files present, CUDA visible, packages installed) besides the config.

    False when validating a config written for another machine (`check-config --portable`, the CI check
    of configs/paper/): those checks then happen when the run starts on the machine it was written for.
    """
    return bool((info.context or {}).get("environment", True))


def shown_override(pair: str) -> str:
    """An override as an error line may repeat it: a value that may be a credential (a token, a URL, user:pass@)
    becomes ***."""
    key, sep, value = pair.partition("=")
    if not sep:
        return "***" if may_be_secret("", pair) else pair
    return f"{key}=***" if may_be_secret(key, value) else pair


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ['a.b=1', 'c=x'] into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"config error: override '{shown_override(pair)}' is not of the form key.sub=value "
                              "(e.g. queue.max_staleness=0)")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config error: override '{shown_override(pair)}' conflicts with an earlier "
                                  f"override of '{part}'")
        node[leaf] = yaml_scalar(raw)
    return tree


def yaml_scalar(raw: str) -> Any:
    """An override's value as YAML (1, true, null, [a, b]); text that is not YAML (e.g. a template
    such as {question}>) is taken as it is."""
    try:
        return yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return raw


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, where PyYAML silently keeps the last: a
    config with `steps:` twice in one section would run with one of them unnoticed."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges (later keys override by design); other odd keys: PyYAML decides
            key = self.construct_object(key_node)
            if key in first:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' given twice (first at line "
                                                                    f"{first[key]})", key_node.start_mark)
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
