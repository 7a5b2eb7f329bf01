"""Credentials in URLs: hidden wherever a URL is shown or stored.

A storage URL (``--storage``) or MLflow tracking URI (``--tracking-uri``) may carry a
password, in its userinfo (``postgresql://user:PASSWORD@host/db``) or in its query
(``?password=PASSWORD``). The harness prints, logs and stores URLs only as :func:`masked`
gives them: on the console, in error messages, MLflow params and tags, study attributes,
summaries and reports the password reads ``***``. The URL with its password lives only in
the command line or the environment of the process that uses it; the worker processes that
``--workers`` starts receive it in their environment (:data:`STORAGE_URL_ENV`,
``MLFLOW_TRACKING_URI``), never on their command line, where ``ps`` would show it.

A URL needs no password at all where the database client finds it elsewhere: PostgreSQL's
client library reads ``PGPASSWORD`` and the password file ``PGPASSFILE`` (``~/.pgpass``).
"""

from __future__ import annotations

import re

HIDDEN = "***"
"""What a password reads as, once masked."""
STORAGE_URL_ENV = "BENCH_STORAGE_URL"
"""Environment variable from which ``python -m bench worker`` reads its storage URL when
``--storage`` is not given (how the worker processes of ``--workers`` receive it)."""
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
"""MLflow's environment variable for the tracking URI."""

_USERINFO_PASSWORD = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*:)"
    r"(?P<secret>[^@\s]*(?:@[^@/?#\s]*(?=@))*)(?=@)"
)
"""``scheme://user:PASSWORD@``. The password runs to the last ``@`` before the host, so an
unencoded ``@``, ``/`` or ``?`` in it is hidden too."""
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;][^=&;#\s]*(?:password|passwd|pwd|secret|token|api_?key)[^=&;#\s]*=)(?P<secret>[^&;#\s]*)",
    re.IGNORECASE,
)
"""A query parameter that holds a secret: ``?password=...``, ``&sslpassword=...``, ``&token=...``."""
_SECRETS = (_USERINFO_PASSWORD, _QUERY_SECRET)


def masked(text: str) -> str:
    """``text`` (a URL, or a message with URLs in it) with every password in a URL's userinfo
    and every secret query parameter replaced by ``***``; user names, hosts and paths stay."""
    for pattern in _SECRETS:
        text = pattern.sub(lambda match: match["head"] + HIDDEN, text)
    return text


def hides_credentials(url: str) -> bool:
    """Whether ``url`` is a masked URL: a password of it reads ``***``."""
    secrets = [match["secret"] for pattern in _SECRETS for match in pattern.finditer(url)]
    return HIDDEN in secrets


def unmasked(shown: str, candidate: str | None) -> str | None:
    """The URL whose :func:`masked` form is ``shown``: ``shown`` itself when it hides nothing,
    else ``candidate`` (e.g. read from the environment) when it is that URL, else ``None``."""
    if not hides_credentials(shown):
        return shown
    if candidate is not None and masked(candidate) == shown:
        return candidate
    return None
