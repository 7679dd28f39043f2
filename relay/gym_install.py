"""`relay nemo-gym install DIR`: the relay as NeMo Gym's model server `relay_model`.

Writes DIR/responses_api_models/relay_model/: `app.py` (what ng_run runs, `python app.py` in that
directory), `configs/relay_model.yaml` (openai_model's config with the impl renamed, so switching is one
line) and `requirements.txt` (Gym counts a directory as a server only with one; Gym's venv setup installs
it, and with `++skip_venv_if_present=true` the existing .venv must have the relay installed already).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import relay

SERVER_DIR = Path("responses_api_models") / "relay_model"
# Any of these says DIR is where ng_run looks for servers (a checkout, an install root, its working dir).
_GYM_MARKERS = ("responses_api_models", "resources_servers", "responses_api_agents", "nemo_gym", "env.yaml")

APP = '''"""NeMo Gym model server relay_model: the relay in openai_model's place (written by `relay nemo-gym install`).

ng_run starts it as `python app.py` in this directory, with the config in NEMO_GYM_CONFIG_DICT and this
server's name in NEMO_GYM_CONFIG_PATH. The relay must be installed in the Python that runs it.
"""

from relay.nemo_gym import main

if __name__ == "__main__":
    main()
'''

CONFIG = """# NeMo Gym model server relay_model: the relay in openai_model's place, with openai_model's keys (written
# by `relay nemo-gym install`). Any key of the relay may go in the block too (its README lists them).
policy_model:
  responses_api_models:
    relay_model:
      entrypoint: app.py
      openai_base_url: ${policy_base_url}
      openai_api_key: ${policy_api_key}
      openai_model: ${policy_model_name}
      openai_default_headers: {}
      drop_input_reasoning_items: ${oc.env:POLICY_DROP_REASONING_ITEMS,false}
"""


class InstallError(Exception):
    pass


def install(root: str | Path, requirement: str | None = None) -> list[Path]:
    """Write the server's files under `root`; return their paths."""
    root = Path(root)
    if not root.is_dir():
        raise InstallError(f"{root} is not a directory")
    if not any((root / marker).exists() for marker in _GYM_MARKERS):
        raise InstallError(
            f"{root} does not look like a NeMo Gym root (none of {', '.join(_GYM_MARKERS)}): give the directory "
            "ng_run runs in, a Gym checkout, or Gym's install root (the directory that holds nemo_gym/)"
        )
    server = root / SERVER_DIR
    (server / "configs").mkdir(parents=True, exist_ok=True)
    files = {
        server / "app.py": APP,
        server / "configs" / "relay_model.yaml": CONFIG,
        server / "requirements.txt": _requirements(requirement or default_requirement()),
    }
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    return list(files)


def default_requirement() -> str:
    """This relay as a pip requirement: its source tree when it runs from one, else its released version."""
    source = Path(relay.__file__).resolve().parents[1]
    if (source / "pyproject.toml").is_file() and (source / "relay" / "__init__.py").is_file():
        return f"relay @ {source.as_uri()}"
    return f"relay=={importlib.metadata.version('relay')}"


def _requirements(line: str) -> str:
    return (
        "# What Gym installs into this server's venv (written by `relay nemo-gym install`; choose another line\n"
        "# with --requirement). With ++skip_venv_if_present=true, install the relay into the existing .venv.\n"
        f"{line}\n"
    )
