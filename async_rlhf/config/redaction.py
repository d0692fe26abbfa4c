"""Secrets out of everything a run writes or prints: the resolved config in config.yaml, `check-config`,
the W&B run config. A field is secret when its pydantic Field says `json_schema_extra={"secret": True}`
(api.token); any URL's user:password is a secret wherever it stands (reward.remote.url). Secrets are
written as `***`; `readable_saved_config` turns them back into "unset" so a saved config still loads
(a resumed run takes its secrets from its own config or the environment, like the first one).
"""
from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

SECRET = "***"
# Greedy up to the last "@" before the path: a password may hold "@" itself (HTTP clients split at the last one).
URL_USERINFO = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#]*)@")


def secret_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of every field marked secret, found through nested config sections."""
    keys = []
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("secret"):
            keys.append(prefix + name)
        for section in _models(field.annotation):
            keys.extend(secret_keys(section, f"{prefix}{name}."))
    return keys


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The config sections an annotation names (`Section`, `Section | None`)."""
    args = getattr(annotation, "__args__", None) or (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def may_be_secret(key: str, value: object) -> bool:
    """Whether an error line must not repeat `value` given for `key`: a token, a URL, anything with user:pass@."""
    return "token" in key or "url" in key or "@" in str(value)


def redact_url(url: str) -> str:
    """`http://user:pass@host/...` -> `http://***@host/...`; a URL without credentials is unchanged."""
    return URL_USERINFO.sub(lambda m: f"{m['scheme']}{SECRET}@", url)


def redacted(cfg: BaseModel) -> dict[str, Any]:
    """The config as JSON-able data with every secret written as `***`."""
    data = _scrub(cfg.model_dump(mode="json"))
    for key in secret_keys(type(cfg)):
        parent, leaf = _parent(data, key)
        if parent is not None and parent.get(leaf) is not None:
            parent[leaf] = SECRET
    return data


def readable_saved_config(data: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """A saved (redacted) config with its `***` secrets unset, so that it validates again."""
    for key in secret_keys(model):
        parent, leaf = _parent(data, key)
        if parent is not None and parent.get(leaf) == SECRET:
            parent[leaf] = None
    return data


def redacted_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a saved config whose value had a secret written as `***` (in whole or in a URL)."""
    if isinstance(data, dict):
        return [key for k, v in data.items() for key in redacted_keys(v, f"{prefix}{k}.")]
    if isinstance(data, list):
        return [key for i, v in enumerate(data) for key in redacted_keys(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if isinstance(data, str) and SECRET in data else []


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return redact_url(value) if isinstance(value, str) else value


def _parent(data: dict[str, Any], key: str) -> tuple[dict[str, Any] | None, str]:
    *path, leaf = key.split(".")
    node: Any = data
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), leaf
