"""The simulated Ollama's model catalogue: names, details, and the bodies of
``/api/tags``, ``/api/ps``, ``/api/show`` and ``/v1/models`` (sans-IO)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .text import rfc3339nano

# Ollama's default keep_alive; a negative one is Go's longest duration (~292 years).
DEFAULT_KEEP_ALIVE_NS = 5 * 60 * 1_000_000_000
FOREVER_NS = (1 << 63) - 1
# The loaded footprint counts the KV cache and graph on top of the weights.
FOOTPRINT_RATIO = 1.25
LOADED_CONTEXT_LENGTH = 4096
_DEFAULT_REGISTRY = "registry.ollama.ai/"
_DEFAULT_NAMESPACE = "library/"


@dataclass(frozen=True, slots=True)
class SimModel:
    """One installed model, with what ``/api/tags`` and ``/api/show`` report."""

    name: str  # shortest form, "llama3.2:latest"
    family: str
    parameter_size: str
    quantization_level: str
    size: int  # bytes on disk
    digest: str  # 64 hex digits
    capabilities: tuple[str, ...] = ("completion", "tools")
    parameter_count: int = 0
    context_length: int = 131072
    embedding_length: int = 3072
    template: str = "{{ .Prompt }}"
    parameters: str = ""
    modified_ns: int = 1_785_577_812_417_036_000  # 2026-08-01T09:50:12.417036Z

    @property
    def thinks(self) -> bool:
        return "thinking" in self.capabilities

    @property
    def generates(self) -> bool:
        return "completion" in self.capabilities

    def details(self) -> dict[str, object]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


def _parameters(*pairs: tuple[str, str]) -> str:
    """``/api/show``'s ``parameters``: one ``name value`` per line, names padded to 30."""
    return "\n".join(f"{name:<30} {value}" for name, value in pairs)


_LLAMA_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_QWEN_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ if .Think }}<think>\n{{ end }}"
)

DEFAULT_MODELS = (
    SimModel(
        name="llama3.2:latest",
        family="llama",
        parameter_size="3.2B",
        quantization_level="Q4_K_M",
        size=2_019_393_189,
        digest="a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
        parameter_count=3_212_749_888,
        template=_LLAMA_TEMPLATE,
        parameters=_parameters(
            ("stop", '"<|start_header_id|>"'),
            ("stop", '"<|end_header_id|>"'),
            ("stop", '"<|eot_id|>"'),
        ),
    ),
    SimModel(
        name="qwen3:4b",
        family="qwen3",
        parameter_size="4.0B",
        quantization_level="Q4_K_M",
        size=2_497_293_918,
        digest="e55aed6fe643f9368b2f48f8aaa56ec787b75765da69f794c0a0c4bfe2ef5a57",
        capabilities=("completion", "tools", "thinking"),
        parameter_count=4_022_468_096,
        context_length=40960,
        embedding_length=2560,
        template=_QWEN_TEMPLATE,
        parameters=_parameters(
            ("repeat_penalty", "1"),
            ("stop", '"<|im_start|>"'),
            ("stop", '"<|im_end|>"'),
            ("temperature", "0.6"),
        ),
    ),
    SimModel(
        name="all-minilm:latest",
        family="bert",
        parameter_size="23M",
        quantization_level="F16",
        size=45_960_996,
        digest="1b226e2802dbb772b5fc32a58f103ca1804ef7501331012de126ab22f67475ef",
        capabilities=("embedding",),
        parameter_count=22_565_376,
        context_length=512,
        embedding_length=384,
    ),
)


def normalize_name(name: str) -> str:
    """Ollama's comparison form: lower case, default registry and namespace dropped,
    ``:latest`` added."""
    name = name.strip().lower()
    for prefix in (_DEFAULT_REGISTRY, _DEFAULT_NAMESPACE):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def full_name(name: str) -> str:
    """The fully qualified name Ollama prints in capability errors."""
    short = normalize_name(name)
    if "/" not in short:
        short = _DEFAULT_NAMESPACE + short
    if short.count("/") < 2:
        short = _DEFAULT_REGISTRY + short
    return short


def owner(name: str) -> str:
    """``owned_by`` on /v1/models: the namespace of the name."""
    short = normalize_name(name)
    return short.rsplit("/", 1)[0].rsplit("/", 1)[-1] if "/" in short else "library"


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}


def keep_alive_ns(value: object) -> int | None:
    """``keep_alive`` as ns: a number is seconds, a string is a Go duration.

    Negative means forever (``FOREVER_NS``); None when absent or unreadable
    (the default applies).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if not isinstance(value, str):
        return FOREVER_NS if value < 0 else int(value * 1e9)
    text = value.strip()
    body = text.lstrip("+-")
    parts = _DURATION_PART.findall(body)
    if body == "0":
        return 0
    if not parts or "".join(number + unit for number, unit in parts) != body:
        return None
    if text.startswith("-"):
        return FOREVER_NS
    return int(sum(float(number) * _UNIT_NS[unit] for number, unit in parts))


def tags_entry(model: SimModel) -> dict[str, object]:
    return {
        "name": model.name,
        "model": model.name,
        "modified_at": rfc3339nano(model.modified_ns),
        "size": model.size,
        "digest": model.digest,
        "details": model.details(),
        "capabilities": list(model.capabilities),
    }


def ps_entry(model: SimModel, expires_ns: int) -> dict[str, object]:
    footprint = int(model.size * FOOTPRINT_RATIO)
    return {
        "name": model.name,
        "model": model.name,
        "size": footprint,
        "digest": model.digest,
        "details": model.details(),
        "expires_at": rfc3339nano(expires_ns),
        "size_vram": footprint,
        "context_length": min(LOADED_CONTEXT_LENGTH, model.context_length),
    }


def show_body(model: SimModel) -> dict[str, object]:
    family = model.family
    modelfile = (
        '# Modelfile generated by "ollama show"\n'
        "# To build a new Modelfile based on this, replace FROM with:\n"
        f"# FROM {model.name}\n\nFROM /root/.ollama/models/blobs/sha256-{model.digest}\n"
        f'TEMPLATE """{model.template}"""\n'
    )
    body: dict[str, object] = {"modelfile": modelfile}
    if model.parameters:
        body["parameters"] = model.parameters
    body["template"] = model.template
    body["details"] = model.details()
    body["model_info"] = {
        "general.architecture": family,
        "general.parameter_count": model.parameter_count,
        f"{family}.context_length": model.context_length,
        f"{family}.embedding_length": model.embedding_length,
    }
    body["capabilities"] = list(model.capabilities)
    body["modified_at"] = rfc3339nano(model.modified_ns)
    return body


def openai_model(model_id: str, model: SimModel) -> dict[str, object]:
    return {
        "id": model_id,
        "object": "model",
        "created": model.modified_ns // 1_000_000_000,
        "owned_by": owner(model_id),
    }
