"""The dependency direction of STYLE.md §2, checked on the imports themselves."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ollama_proxy"

# Pure core: no trio at runtime (imports under TYPE_CHECKING do not count).
PURE = ["errors", "config", "framing", "usage", "routes", "headers", "policy", "limits", "isotime",
        "limit_counters", "limiting", "bodies", "keys", "db", "accounts", "ledger", "jsonbody",
        "reports", "prompt_overhead", "tokenizer_api"]
# module -> project modules it must never import.
FORBIDDEN = {
    "server": {"relay", "app", "backends", "upstream", "policy", "usage", "simulator"},
    "upstream": {"relay", "app", "backends", "policy", "server", "usage", "config"},
    "framing": {"usage", "relay", "server", "upstream"},
    "usage": {"relay", "server", "upstream"},
}


def runtime_imports(module: str) -> set[str]:
    """Top-level names this module imports at run time (TYPE_CHECKING blocks skipped)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):  # relative ones name our modules
                names.add((node.module or "").split(".")[0])
            for child in ast.iter_child_nodes(node):
                visit([child])

    visit(tree.body)
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_core_does_not_import_trio(module):
    """The sans-IO core never needs trio (h11 types at most)."""
    assert "trio" not in runtime_imports(module)


@pytest.mark.parametrize(("module", "forbidden"), FORBIDDEN.items())
def test_lower_layers_do_not_import_higher_ones(module, forbidden):
    """Imports point downward only: the server knows no relay, the pool no policy."""
    assert not runtime_imports(module) & forbidden
