"""The dependency rules of the package tree, checked on the imports themselves.

Each rule is one test; each sub-package's ``__init__`` docstring says the same in
words. Imports under ``if TYPE_CHECKING:`` do not count (they run in mypy only).
"""

from __future__ import annotations

import ast
import pathlib
from functools import cache

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ollama_proxy"
SUBPACKAGES = ("http", "api", "access", "backends", "proxy", "store", "observe", "admin", "cli", "sim")

# The trio shells: every other module is sans-IO (no trio at run time). A new shell is
# added here on purpose, not by accident.
SHELLS = {
    "__main__", "app",
    "http.server", "http.connection", "http.responder", "http.watch", "http.client", "http.sockio",
    "access.identity",
    "backends.registry", "backends.router",
    "proxy.relay", "proxy.metering", "proxy.recount", "proxy.fanout",
    "observe.access_log",
    "store.threads",
    "cli.demo",
    "sim.server", "sim.generation", "sim.llamacpp",
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if module_name(p))


@cache
def runtime_imports(module: str) -> frozenset[str]:
    """What ``module`` imports at run time (see ``imports_in``)."""
    path = PACKAGE / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE / module.replace(".", "/") / "__init__.py"
    return imports_in(path.read_text(), module, is_package=path.name == "__init__.py")


def imports_in(source: str, module: str, *, is_package: bool = False) -> frozenset[str]:
    """What ``source``, the text of ``module``, imports at run time: our modules as
    dotted names under the package (``"store.db"``, or ``"store"`` for the package
    itself), relative or absolute; others by their top-level name (``"trio"``)."""
    here = module.split(".")
    package = here if is_package else here[:-1]
    names: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    names.add(ours(alias.name) or alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                module_parts = (node.module or "").split(".") if node.module else []
                if node.level:  # relative: from the importing module's package
                    stem = package[: len(package) - (node.level - 1)] + module_parts
                elif module_parts[:1] == ["ollama_proxy"]:  # absolute, ours
                    stem = module_parts[1:]
                else:
                    names.add(module_parts[0])
                    stem = None
                for alias in node.names if stem is not None else ():
                    sub = ".".join([*stem, alias.name])
                    is_module = (PACKAGE / (sub.replace(".", "/") + ".py")).exists() or \
                        (PACKAGE / sub.replace(".", "/")).is_dir()
                    names.add(sub if is_module else ".".join(stem))
            visit(ast.iter_child_nodes(node))

    visit(ast.parse(source).body)
    names.discard(module)
    return frozenset(n for n in names if n)


def ours(name: str) -> str | None:
    return name.removeprefix("ollama_proxy.") if name.startswith("ollama_proxy.") else None


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def imports_of(package: str) -> dict[str, frozenset[str]]:
    return {m: runtime_imports(m) for m in MODULES if in_package(m, package)}


def offenders(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """The modules of ``package`` that import one of ``forbidden`` (packages or modules)."""
    found = {m: sorted(i for i in imps if any(in_package(i, f) for f in forbidden))
             for m, imps in imports_of(package).items()}
    return {m: i for m, i in found.items() if i}


def test_the_rules_see_every_module():
    """The checker resolves relative and absolute imports of ours (a broken resolver
    would pass every rule)."""
    assert "store.db" in runtime_imports("store.ledger")
    source = ("from ollama_proxy import proxy\nimport ollama_proxy.store.db\n"
              "from ollama_proxy.access.keys import new_key\nfrom .. import sim\n"
              "from .messages import Request\nimport trio\n")
    assert imports_in(source, "http.server") == {"proxy", "store.db", "access.keys", "sim",
                                                 "http.messages", "trio"}
    assert "trio" in runtime_imports("http.server")
    assert {"http", "api", "access", "store", "proxy", "observe", "sim"} <= {
        m.split(".")[0] for m in MODULES}


@pytest.mark.parametrize("module", [m for m in MODULES if m not in SHELLS])
def test_only_the_shells_import_trio(module):
    """Everything but the listed trio shells is sans-IO."""
    assert "trio" not in runtime_imports(module)


def test_http_knows_nothing_of_users_models_or_usage():
    """http/ is HTTP only: handlers are injected by app, never imported."""
    assert offenders("http", ("api", "access", "backends", "proxy", "store", "observe", "admin",
                              "cli", "sim", "app", "config")) == {}


def test_api_is_pure_and_imports_only_shared_values():
    """api/ builds on errors and isotime alone: access, backends and proxy build on it."""
    allowed = ("api", "errors", "isotime")
    found = {m: sorted(i for i in imps if i.split(".")[0] in MODULE_ROOTS and
                       not any(in_package(i, a) for a in allowed))
             for m, imps in imports_of("api").items()}
    assert {m: i for m, i in found.items() if i} == {}


MODULE_ROOTS = {m.split(".")[0] for m in MODULES}


def test_access_and_backends_never_import_each_other():
    """Who may call and where a request goes are independent; proxy joins them."""
    assert offenders("access", ("backends",)) == {}
    assert offenders("backends", ("access",)) == {}


def test_access_reaches_no_higher_layer():
    """access/ decides who may call; the proxy, the admin API and the commands use it."""
    assert offenders("access", ("proxy", "admin", "cli", "sim", "observe", "app", "dispatch")) == {}


def test_backends_know_no_users_and_no_store():
    """backends/ knows addresses and health; a fair queue will get a user name, not an account."""
    assert offenders("backends", ("proxy", "store", "admin", "cli", "sim", "observe", "app",
                                  "dispatch")) == {}


def test_the_proxy_never_imports_admin_cli_or_the_simulator():
    """The request path relays; it administers nothing and runs no simulator."""
    assert offenders("proxy", ("admin", "cli", "sim", "app", "dispatch")) == {}


@pytest.mark.parametrize(("module", "allowed"), [
    ("errors", ()),
    ("isotime", ("errors",)),
    ("config_parsers", ("errors", "isotime", "http.messages")),
    ("config_schema", ("errors", "isotime", "config_parsers")),
    ("config", ("errors", "isotime", "config_parsers", "config_schema", "access.limits",
                "api.models", "backends.settings", "http.messages")),
])
def test_the_shared_top_level_modules_import_only_values(module, allowed):
    """errors, isotime and the config sit under everything: they import only values."""
    ours_ = {i for i in runtime_imports(module) if i.split(".")[0] in MODULE_ROOTS}
    assert {i for i in ours_ if not any(in_package(i, a) for a in allowed)} == set()


def test_only_the_storage_thread_module_in_store_imports_trio():
    """store/ is synchronous SQLite; threads.py alone runs it off the event loop."""
    assert [m for m in imports_of("store") if "trio" in runtime_imports(m)] == ["store.threads"]


def test_store_imports_only_values_from_access():
    """The store validates with the limits and key values, never the request-time shells."""
    assert offenders("store", ("http", "backends", "proxy", "admin", "cli", "sim", "observe",
                               "access.identity", "access.limiter", "access.counters",
                               "access.counters_from_ledger")) == {}


def test_observe_is_fed_records_and_reaches_into_nothing():
    """observe/ reads the records it is given: never the proxy, the access or backend
    shells, the HTTP server or the store."""
    assert offenders("observe", ("proxy", "access", "backends", "http", "store", "admin", "cli",
                                 "sim", "app")) == {}


def test_only_app_imports_the_proxy():
    """proxy/ is the top of the request path: nothing below it reaches up."""
    importers = sorted(m for m in MODULES if not in_package(m, "proxy") and
                       any(in_package(i, "proxy") for i in runtime_imports(m)))
    assert importers == ["app"]


def test_the_dispatch_table_is_built_by_app_alone_and_imports_no_proxy():
    """dispatch.py holds every path; it gets the relay's handler as a value (so it sits
    below proxy/), and only app builds it."""
    importers = sorted(m for m in MODULES if "dispatch" in runtime_imports(m))
    assert importers == ["app"]
    assert offenders("dispatch", ("proxy", "store", "cli", "sim", "app")) == {}


def test_admin_never_imports_the_proxy_the_cli_or_the_simulator():
    """The admin API calls the store's use-cases; it relays nothing."""
    assert offenders("admin", ("proxy", "cli", "sim")) == {}


def test_the_simulator_imports_only_http():
    """sim/ runs on our HTTP server and nothing else of the gateway."""
    found = {m: sorted(i for i in imps if i.split(".")[0] in MODULE_ROOTS and
                       not in_package(i, "sim") and not in_package(i, "http"))
             for m, imps in imports_of("sim").items()}
    assert {m: i for m, i in found.items() if i} == {}


def test_only_the_demo_imports_the_simulator():
    """The gateway never imports sim/ (only the demo command, the tests and bench/)."""
    importers = sorted(m for m in MODULES if not in_package(m, "sim") and
                       any(in_package(i, "sim") for i in runtime_imports(m)))
    assert importers == ["cli.demo"]


def test_only_the_entry_points_import_app_and_cli():
    """app is the composition root: only the command line builds it."""
    for top in ("app", "cli"):
        importers = sorted(m for m in MODULES if not in_package(m, top) and
                           any(in_package(i, top) for i in runtime_imports(m)))
        assert set(importers) <= {"__main__", "cli.demo"}, (top, importers)


def test_every_subpackage_says_what_it_owns_and_may_import():
    """Each sub-package's docstring states its job and its import rule."""
    for name in SUBPACKAGES:
        init = PACKAGE / name / "__init__.py"
        if not init.exists():
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import:" in doc and "Never" in doc, name
