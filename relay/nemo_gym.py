"""`python -m relay.nemo_gym`: the relay as a NeMo Gym model server, started the way ng_run starts one.

ng_run runs each server's entrypoint with the whole merged config, unresolved, in NEMO_GYM_CONFIG_DICT and
the server's top-level name in NEMO_GYM_CONFIG_PATH (relay.config reads them). The relay listens on the
host and port ng_run assigned in the block, with `num_workers` processes; each worker reads the same two
variables, which it inherits. ng_run counts a server as up once `GET /` answers.
"""

from __future__ import annotations

import os

from relay.cli import run, settings_or_exit
from relay.config import FROM_GYM_ENV


def main() -> None:
    os.environ[FROM_GYM_ENV] = "1"  # so every worker reads Gym's config too
    settings = settings_or_exit()
    run(settings, settings.host, settings.port, settings.num_workers or 1, "info")


if __name__ == "__main__":
    main()
