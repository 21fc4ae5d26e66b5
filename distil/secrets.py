"""One rule for credentials in what a user writes: never in a config, a flag or the chart's values.

A run's config is saved with every checkpoint and the exported model, printed by `distil
config`, written into the Kubernetes ConfigMap and the RayJob; a URI is repeated in error
messages and logs. So a credential must never be part of either. Two shapes are refused:

- a **key** whose name says it holds one (`SECRET_KEY`: token, secret, password, api_key,
  DB_PASS, S3_KEY, ...), e.g. in `data.hub_kwargs` or a chart value;
- a **URI** that carries one: user information before the host (`s3://KEY:SECRET@bucket`,
  `https://user:token@host/...`), or a query parameter named like a credential or a signature
  (a presigned URL's `X-Amz-Credential`/`X-Amz-Signature`, `?token=`).

Messages name where the value is (a config key, a flag), never the value. The Helm chart
applies the same two patterns (helm/distil-run/templates/_validate.tpl; a test compares them).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from distil.errors import UserError

# Names of keys that hold credentials (config keys, environment variable names, flags).
SECRET_KEY = re.compile(
    r"(?i)(token|secret|passw|credential|private[_-]?key|api[_-]?key|access[_-]?key|"
    r"(^|[_-])(auth|key|pass|pwd|dsn)($|[_-]))"
)
# A URI with user information: scheme://[anything without / ? #]@...
URI_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@")
_QUERY = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^?#]*[?#](.*)$", re.S)
_SIGNATURE = re.compile(r"(?i)(signature|^sig$)")

FIX = (
    "give credentials through the environment instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE for "
    "S3, HF_TOKEN for the hub; on Kubernetes from a Secret): they would be saved with every checkpoint and shown "
    "in logs"
)


def uri_problem(value: str) -> str | None:
    """What credential a URI carries, in a phrase that does not repeat it; None for a clean one
    (and for anything that is not a URI: a local path may hold an '@')."""
    value = value.strip()
    if URI_USERINFO.match(value):
        return "holds credentials (user:password@ before the host)"
    query = _QUERY.match(value)
    if query:
        names = [k for k, _ in parse_qsl(query.group(1), keep_blank_values=True)]
        if any(SECRET_KEY.search(k) or _SIGNATURE.search(k) for k in names):
            return "holds credentials in its query (a token, a key or a presigned signature)"
    return None


def check_uri(value: str | None, where: str) -> None:
    """Refuse (UserError, naming `where`, never the value) a URI that carries a credential."""
    problem = value is not None and uri_problem(value)
    if problem:
        raise UserError(f"the URI {problem}", where=where, fix=FIX)


def credential_uris(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names of every string in nested mappings and lists that is a URI with a credential."""
    if isinstance(tree, str):
        return [prefix.rstrip(".") or "(value)"] if uri_problem(tree) else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    out = []
    for k, v in items:
        out += credential_uris(v, f"{prefix}{k}.")
    return out


def check_tree(tree: Any, source: str) -> None:
    """Refuse a config (a mapping, as read) with a credential URI anywhere, naming every key."""
    found = credential_uris(tree)
    if found:
        raise UserError(
            f"{', '.join(found)}: a URI holds credentials (user:password@ before the host, or a token or "
            "signature in its query)",
            where=source,
            fix=FIX,
        )
