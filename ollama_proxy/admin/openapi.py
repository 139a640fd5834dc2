"""The OpenAPI 3.1 description of the admin API, ``/v1/me`` and ``/v1/usage``
(``GET /admin/api/openapi.json``): written by hand in ``openapi.json`` beside this
module, shipped as package data and read with ``importlib.resources`` (so it is
found inside the zipapp too). A test calls every operation it documents and checks
each answer against it; another, that every admin path of the dispatch table is in it.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from .. import __version__

RESOURCE = "openapi.json"


@cache
def document() -> dict[str, Any]:
    """The description, with ``info.version`` the gateway's own (read once; not to be
    changed by callers)."""
    doc: dict[str, Any] = json.loads(resources.files(__package__).joinpath(RESOURCE).read_bytes())
    doc["info"]["version"] = __version__
    return doc
