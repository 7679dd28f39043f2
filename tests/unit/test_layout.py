"""The shape of the package that other code relies on: imports flow one way, and relay.app does not load
relay.protocol (the start-up warning about head limits tells from that whether uvicorn loaded it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

RELAY = Path(__file__).resolve().parents[2] / "relay"
# Lower layers never import higher ones: config < app < core < upstream side < helpers, read right to left.
LAYERS = {
    "__main__": 6,
    "nemo_gym": 6,
    "cli": 5,
    "local": 5,
    "app": 4,
    "routes": 4,
    "rollouts": 4,
    "lifespan": 4,
    "hosts": 3,
    "auth": 3,
    "proxy": 3,
    "intake": 2,
    "attempts": 2,
    "relaying": 2,
}


def imports_of(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("relay."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("relay."))
    return found


def test_imports_flow_one_way() -> None:
    wrong = []
    # relay/cluster/ is a helper of the core (relay.attempts calls its Gate): it imports no layer above it.
    for module in [*RELAY.glob("*.py"), *(RELAY / "cluster").glob("*.py")]:
        level = LAYERS.get(module.stem, 1) if module.parent == RELAY else 1
        for imported in imports_of(module):
            if LAYERS.get(imported, 1) > level:
                wrong.append(f"{module.stem} imports {imported}")
    assert wrong == []


def test_the_app_does_not_load_the_protocol() -> None:
    code = "import sys, relay.app; print('relay.protocol' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"


def test_redis_is_imported_only_when_a_cluster_is_configured() -> None:
    code = "import sys, relay.app, relay.attempts, relay.cluster; print('redis' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"
    importers = [module.name for module in (RELAY / "cluster").glob("*.py") if "import redis" in module.read_text()]
    assert importers == ["store.py"]
