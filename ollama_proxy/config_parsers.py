"""What a setting's text may be: one parser per kind of value, from the ini's text to
the value in the ini's unit, or ``ValueError("expected ...")`` saying what is allowed (the
loader adds where the text came from). Pure (no trio); the schema rows name these.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Callable
from urllib.parse import urlsplit

from .http.messages import host_port
from .isotime import parse_time

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_PORTS = {"http": 80, "https": 443}  # a backend URL's schemes
_ENV_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _finite(text: str) -> float:
    """The number ``text`` spells, or NaN when it spells none or an infinite one."""
    try:
        value = float(text)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def whole(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]{1,18}", text) or int(text) < low:
            raise ValueError(f"expected a whole number >= {low}")
        return int(text)
    return parse


def seconds(low: float, *, inclusive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = _finite(text)
        if math.isnan(value) or value < low or (value == low and not inclusive):
            raise ValueError(f"expected a number of seconds {'>=' if inclusive else '>'} {low:g}")
        return value
    return parse


def integer(text: str) -> int:
    """A whole number that may be negative."""
    if not re.fullmatch(r"-?[0-9]{1,18}", text):
        raise ValueError("expected a whole number, e.g. -1, 0 or 10")
    return int(text)


def number(low: float, high: float = math.inf) -> Callable[[str], float]:
    """A finite number > ``low`` and <= ``high``."""
    def parse(text: str) -> float:
        value = _finite(text)
        if not low < value <= high:  # False for NaN
            bound = f" and <= {high:g}" if math.isfinite(high) else ""
            raise ValueError(f"expected a number > {low:g}{bound}")
        return value
    return parse


def gigabytes(text: str) -> float:
    """A size in GB (10**9 bytes), >= 0."""
    value = _finite(text)
    if not value >= 0:  # False for NaN
        raise ValueError("expected a number of GB >= 0 (0: no limit), e.g. 8 or 0.5")
    return value


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in options:
            raise ValueError(f"expected one of: {', '.join(options)}")
        return text.lower()
    return parse


def cidrs(text: str) -> tuple[IpNetwork, ...]:
    """Addresses or CIDR blocks separated by commas and/or spaces."""
    out = []
    for item in (i for i in re.split(r"[\s,]+", text) if i):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"expected IP addresses or CIDR blocks (e.g. 10.0.0.0/8, 192.168.1.7, "
                             f"::1) separated by commas or spaces; {item!r} is not one") from None
    return tuple(out)


def show_cidrs(networks: tuple[IpNetwork, ...]) -> str:
    return ", ".join(str(n) for n in networks)


def auto_whole(text: str) -> int | None:
    if not text:
        return None
    if not re.fullmatch(r"[0-9]{1,18}", text) or int(text) < 1:
        raise ValueError("expected a whole number >= 1, or nothing for automatic")
    return int(text)


def optional_whole(text: str) -> int | None:
    if not text:
        return None
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise ValueError("expected a whole number >= 0 (0: none allowed), or nothing for unlimited")
    return int(text)


def words(text: str) -> tuple[str, ...]:
    """Items separated by commas and/or spaces (the caller judges each); nothing: ()."""
    return tuple(w for w in re.split(r"[\s,]+", text) if w)


_GLOB = re.compile(r"[A-Za-z0-9._:/@*?\[\]!-]+")


def globs(text: str) -> tuple[str, ...] | None:
    """Model globs separated by commas and/or spaces; nothing: every model."""
    globs = tuple(g for g in re.split(r"[\s,]+", text) if g)
    if not globs:
        return None
    bad = next((g for g in globs if not _GLOB.fullmatch(g)), None)
    if bad is not None:
        raise ValueError(f"expected model globs (letters, digits, . _ : / @ - and * ? [ ] !) "
                         f"separated by commas or spaces, or nothing for every model; "
                         f"{bad!r} is not one")
    return globs


def optional_time(text: str) -> float | None:
    if not text:
        return None
    try:
        return parse_time(text, "expires_at")
    except ValueError:
        raise ValueError("expected an ISO 8601 date or time like 2026-12-31 or "
                         "2026-12-31T18:00:00Z, or nothing for never") from None


def flag(text: str) -> bool:
    value = text.lower()
    if value not in ("true", "false"):
        raise ValueError("expected true or false")
    return value == "true"


def file_path(text: str) -> str:
    if not text:
        raise ValueError("expected a file path")
    return text


def access_target(text: str) -> str:
    """``[log] access``: stdout, stderr or off (any case), else a file path."""
    if not text.strip():
        raise ValueError("expected stdout, stderr, off or a file path")
    return text.lower() if text.lower() in ("stdout", "stderr", "off") else text


def optional_path(text: str) -> str | None:
    return text or None


def optional_env_var(text: str) -> str | None:
    if text and not _ENV_VAR_NAME.fullmatch(text):
        raise ValueError("expected the name of an environment variable (letters, digits, _), or nothing")
    return text or None


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT``; brackets because an IPv6 address has colons."""
    m = re.fullmatch(r"\[([^\]\s]+)\]:([0-9]{1,5})|([^\s:\[\]]+):([0-9]{1,5})", text)
    host, port = (m.group(1) or m.group(3), int(m.group(2) or m.group(4))) if m else ("", -1)
    if m and m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    if not host or not 0 <= port <= 65535:
        raise ValueError("expected HOST:PORT with port 0..65535 (0: the OS picks), "
                         "e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080")
    return host, port


def backend_url(text: str) -> str:
    """The normalised backend URL: http or https, no userinfo/query/fragment, no trailing
    slash, no default port."""
    allowed = ("expected http://HOST[:PORT][/PATH] or https://HOST[:PORT][/PATH], "
               "without query, fragment or user:password")
    if re.search(r"\s", text) or "?" in text or "#" in text:
        raise ValueError(allowed)
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. an unclosed "[" of an IPv6 host
        raise ValueError(allowed) from None
    try:
        port = parts.port
    except ValueError:
        port = 0
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc or port == 0:
        raise ValueError(allowed)
    port = None if port == DEFAULT_PORTS[parts.scheme] else port
    return f"{parts.scheme}://{host_port(parts.hostname, port)}{parts.path.rstrip('/')}"
