"""The package's shape: no import cycle, no hidden function-local imports of our own modules, one
OpenCLIP seam that names what changed upstream, one registry type, typed configs usable without argparse."""

from __future__ import annotations

import argparse
import ast
import warnings
from pathlib import Path

import pytest

from safe_train import openclip as oc
from safe_train.args import build_parser, create_callbacks, create_defense
from safe_train.defenses.cleanclip import CleanClip, CleanClipConfig
from safe_train.defenses.safeclip import SafeClip, SafeClipConfig
from safe_train.detection.callback import DetectionCallback, DetectionConfig
from safe_train.errors import ConfigError, SafeTrainError
from safe_train.openclip import upstream
from safe_train.registry import ATTACKS, CALLBACKS, DEFENSES, DETECTORS, Registry

PACKAGE = Path(__file__).resolve().parents[1] / "safe_train"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _target(module: str, node: ast.ImportFrom | ast.Import, known: dict[str, Path]) -> list[str]:
    """The safe_train modules an import statement loads (``from a import b`` → ``a.b`` when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "safe_train"]
    base = node.module or ""
    if node.level:
        package = module if known[module].name == "__init__.py" else module.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            package = package.rsplit(".", 1)[0]
        base = f"{package}.{base}" if base else package
    if base.split(".")[0] != "safe_train":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If | ast.Try) and not _is_type_checking(node):
            stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        tree = ast.parse(path.read_text())
        edges = set()
        for node in _module_level_imports(tree):
            edges.update(t for t in _target(module, node, known) if t in known and t != module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_safe_train_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "safe_train.engine" in graph["safe_train.main"]  # the graph is really built
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_function_local_imports_of_our_own_modules():
    """Deferring a heavy optional dependency is the one exception, and it says so (``# deferred: why``)."""
    known = _modules()
    offenders = []
    for module, path in known.items():
        source = path.read_text()
        lines = source.splitlines()
        for func in ast.walk(ast.parse(source)):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import | ast.ImportFrom) and _target(module, node, known):
                    if "# deferred:" not in lines[node.lineno - 1]:
                        offenders.append(f"{module}:{node.lineno}")
    assert offenders == []


def test_only_the_seam_imports_open_clip_train():
    seam = PACKAGE / "openclip"
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "open_clip_train" in p.read_text() and seam not in p.parents
                 and any(isinstance(n, ast.Import | ast.ImportFrom) and "open_clip_train" in ast.unparse(n)
                         for n in ast.walk(ast.parse(p.read_text())))]
    assert offenders == []


def test_upstream_symbols_resolve_and_a_renamed_one_is_named(monkeypatch):
    oc.check_upstream()  # open_clip_train 3.3 as installed: everything we rely on is there
    assert "open_clip_train.main.train_one_epoch" in upstream.REQUIRED_SYMBOLS
    import open_clip_train.main as oc_main
    import open_clip_train.train as oc_train

    monkeypatch.delattr(oc_main, "get_data")
    monkeypatch.setattr(oc_train, "unwrap_model", lambda module, extra: module)
    with pytest.raises(oc.UpstreamChanged) as info:
        oc.check_upstream()
    message = str(info.value)
    assert "open_clip_train.main.get_data is missing" in message
    assert "open_clip_train.train.unwrap_model takes ('module', 'extra')" in message
    assert isinstance(info.value, SafeTrainError)


def test_one_registry_type_serves_every_kind():
    assert {"none", "safeclip", "cleanclip", "roclip"} <= set(DEFENSES.names())
    assert {"record_similarity", "zeroshot_eval", "detect"} <= set(CALLBACKS.names())
    assert {"kdist", "slof", "lid", "dao", "iforest", "clip"} <= set(DETECTORS.names())
    assert {"badnets", "blended", "sig", "wanet"} <= set(ATTACKS.names())
    for registry in (DEFENSES, CALLBACKS, DETECTORS, ATTACKS):
        assert type(registry) is Registry
        with pytest.raises(ConfigError, match=f"unknown {registry.kind} 'nope'; choose from "):
            registry.get("nope")


def test_registry_warns_on_a_duplicate_name_and_the_later_one_wins():
    registry: Registry = Registry("widget", "safe_train.errors", "safe_train.test_no_such_group")

    @registry.register
    class First:
        name = "w"

    with pytest.warns(UserWarning, match="widget 'w' registered twice"):
        @registry.register
        class Second:
            name = "w"

    assert registry.get("w") is Second and registry.names() == ["w"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registry.register(Second)  # the same object again is no duplicate


def test_typed_configs_build_without_argparse_and_share_the_flags_defaults():
    parsed, _ = build_parser().parse_known_args(["--defense", "safeclip", "--safeclip-memory-bank", "8"])
    from_flags = SafeClipConfig.from_args(parsed)
    assert from_flags == SafeClipConfig(memory_bank=8)  # one place for defaults: flags and Python agree
    assert SafeClip(SafeClipConfig(memory_bank=8)).bank_size == 8
    assert isinstance(create_defense(parsed), SafeClip)
    assert CleanClip(CleanClipConfig(ss_weight=0)).eda is None
    with pytest.raises(ConfigError, match="must be >= 0"):
        CleanClipConfig(ss_weight=-1)
    with pytest.raises(ConfigError, match="--safeclip-threshold must be in"):
        SafeClipConfig(threshold=1.5)
    detection = DetectionCallback(DetectionConfig(names="kdist,slof", k=4))
    assert detection.detectors == ["kdist", "slof"] and detection.k == 4


def test_callbacks_switch_themselves_on_from_their_flags(tmp_path):
    parse = build_parser().parse_known_args
    assert create_callbacks(parse([])[0]) == []
    names = [c.name for c in create_callbacks(parse(["--record-similarity", "--detect", "kdist"])[0])]
    assert sorted(names) == ["detect", "record_similarity"]
    with pytest.raises(ConfigError, match="--detect-k need --detect NAMES"):
        create_callbacks(parse(["--detect-k", "4"])[0])
    with pytest.raises(ConfigError, match="--detect-action drop needs --detect-drop-fraction"):
        DetectionConfig.from_args(argparse.Namespace(detect="kdist", detect_action="drop"))


def test_typed_config_help_shows_the_one_default():
    help_text = build_parser().format_help()
    assert "--safeclip-max-ratio" in help_text and "(default: 0.85)" in help_text
    assert "--cleanclip-ss-weight" in help_text and "--eval-every" in help_text and "--detect-reference" in help_text
