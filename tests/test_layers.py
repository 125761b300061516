"""The package's layers: imports point down, never up, and the bank needs no model.

From the bottom: errors and paths; the bank (SQLite or PostgreSQL, and numpy); settings, data and the network's
pieces; the models; the memory's application half (ingest, readers, the service); training and
evaluation; the commands and the server. A module may import its own layer or any below it."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import DOCUMENTS

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mbc"
LAYERS = [
    ("mbc.errors", "mbc.paths"),
    ("mbc.bank",),
    ("mbc.config", "mbc.settings", "mbc.checkpoint", "mbc.presets", "mbc.network", "mbc.data"),
    ("mbc.model", "mbc.token_memory", "mbc.prompts", "mbc.finetuning", "mbc.camels"),
    ("mbc.memory",),
    ("mbc.training", "mbc.evaluation"),
    ("mbc.pipeline", "mbc.server", "mbc.cli"),
]


def _layer(module: str) -> int:
    for index, names in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in names):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mbc."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("mbc.")}
    return found


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_import_points_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module(path)
        if module == "mbc":  # the package's lazy names
            continue
        upward += [f"{module} -> {target}" for target in _imports(path) if _layer(target) > _layer(module)]
    assert upward == []


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_bank_imports_no_model_and_no_torch(tmp_path):
    loaded = _run("import sys, mbc.bank; print(sorted(m for m in sys.modules if m.split('.')[0] in ('mbc', 'torch')))")
    assert loaded == str(
        ["mbc", "mbc.bank", "mbc.bank.formats", "mbc.bank.layout", "mbc.bank.packing", "mbc.bank.store", "mbc.errors"]
    )


def test_mbc_bank_lists_shows_and_deletes_without_torch(tmp_path):
    import numpy as np

    from mbc.bank import BankLayout, MemoryBank

    with MemoryBank.open(tmp_path / "bank.db", BankLayout("mbc", 4, 1, 16, 8, "f")) as bank:
        bank.add(DOCUMENTS, np.zeros((len(DOCUMENTS), 4, 1), np.uint8))
    code = (
        "import sys\nfrom mbc.cli import app\n"
        f"for arguments in ([], ['--list'], ['--show', '1'], ['--delete', '2'], ['--json']):\n"
        f"    try:\n        app([{str(tmp_path / 'bank.db')!r}, *arguments], prog_name='mbc')\n"
        "    except SystemExit as stop:\n        assert not stop.code, stop.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    code = code.replace("app([", "app(['bank', ")
    assert _run(code).splitlines()[-1] == "False False"


def test_ingest_and_the_readers_depend_on_the_memory_protocol_not_on_a_model_module():
    for name in ("ingest.py", "readers.py", "protocol.py"):
        assert not {m for m in _imports(PACKAGE / "memory" / name) if m in ("mbc.model", "mbc.token_memory")}, name


def test_mbc_is_an_aggregating_memory(tiny_model):
    from mbc.memory.protocol import AggregatingMemory, Memory

    model = tiny_model()
    assert isinstance(model, Memory) and isinstance(model, AggregatingMemory)
