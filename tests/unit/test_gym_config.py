"""NeMo Gym's config layout read unchanged (relay.gym_layout, relay.config): nested server blocks, several
files merged in order, the block chosen with --server or by its shape, Gym's own keys accepted, top-level
keys as variables; its placeholders (relay.interpolation): ${name}, ${a.b}, ${oc.env:VAR[,default]},
`???`; and Gym's seed keys (max_http_attempts, drop_input_reasoning_items, capture)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import CONFIG_ENV, ENV_FILE_ENV, FROM_GYM_ENV, GYM_CONFIG_DICT_ENV, GYM_CONFIG_PATH_ENV, ConfigError, load_settings
from relay.settings import GYM_RETRY_STATUSES, RetryPolicy
from tests.gym_configs import MCQA, model_server

SECRET = "sk-gym-SECRET-never-printed"

OPENAI_MODEL = model_server("openai_model")
ENV = {"policy_base_url": "http://127.0.0.1:9/v1", "policy_api_key": SECRET, "policy_model_name": "gym-model"}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No variable of this process's environment leaks in; cwd is empty (no env.yaml)."""
    for name in list(os.environ):
        if name.lower().startswith(("policy_", "relay_", "nemo_gym_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield


def write(path: Path, content: Mapping[str, Any] | str) -> Path:
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(dict(content)))
    return path


def block(**keys: Any) -> dict[str, Any]:
    config = yaml.safe_load(yaml.safe_dump(OPENAI_MODEL))
    config["policy_model"]["responses_api_models"]["openai_model"].update(keys)
    return config


def load(tmp_path: Path, *documents: Mapping[str, Any] | str, env: Mapping[str, Any] | None = ENV, server: str | None = None):
    paths = [write(tmp_path / f"config{index}.yaml", document) for index, document in enumerate(documents)]
    if env is not None:
        os.environ[ENV_FILE_ENV] = str(write(tmp_path / "env.yaml", env))
    return load_settings(paths, server=server)


def error_of(tmp_path: Path, *documents: Mapping[str, Any] | str, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, *documents, **kwargs)
    message = str(raised.value)
    assert "\n" not in message and SECRET not in message
    return message


# --- the layout ------------------------------------------------------------------------------------------


def test_gyms_own_openai_model_config_loads_unchanged(tmp_path: Path) -> None:
    settings = load(tmp_path, MCQA, OPENAI_MODEL)
    assert settings.openai_base_url == "http://127.0.0.1:9/v1" and settings.openai_model == "gym-model"
    assert settings.openai_api_key == SECRET and settings.name == "policy_model"
    assert settings.drop_input_reasoning_items is False  # ${oc.env:...,false} is the text "False", as in Gym


def test_keys_ng_run_adds_are_accepted_and_host_port_bind(tmp_path: Path) -> None:
    settings = load(tmp_path, block(host="127.0.0.1", port=17492, num_workers=2, name="ignored", domain="other", datasets=[]))
    assert (settings.host, settings.port, settings.num_workers, settings.name) == ("127.0.0.1", 17492, 2, "policy_model")


def test_an_unknown_key_in_the_block_is_still_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, block(max_concurent_requests=3))
    assert "max_concurent_requests" in message and "policy_model.responses_api_models.openai_model" in message


def test_files_merge_in_order_and_top_level_keys_are_variables(tmp_path: Path) -> None:
    later = {"policy_model": {"responses_api_models": {"openai_model": {"openai_model": "${my_model}"}}}, "my_model": "from-the-config"}
    settings = load(tmp_path, OPENAI_MODEL, later)
    assert settings.openai_model == "from-the-config" and settings.openai_base_url == ENV["policy_base_url"]


def test_env_yaml_wins_over_the_configs_top_level_keys(tmp_path: Path) -> None:
    settings = load(tmp_path, {**OPENAI_MODEL, "policy_model_name": "from-config"})
    assert settings.openai_model == "gym-model"


def test_the_relay_model_impl_and_relay_keys_in_the_block(tmp_path: Path) -> None:
    config = {"policy_model": {"responses_api_models": {"relay_model": {**OPENAI_MODEL["policy_model"]["responses_api_models"]["openai_model"], "access_log": "json"}}}}
    assert load(tmp_path, config).access_log == "json"


def test_several_candidate_blocks_need_server(tmp_path: Path) -> None:
    judge = {"judge_model": {"responses_api_models": {"vllm_model": {"entrypoint": "app.py", "openai_base_url": "http://127.0.0.1:8/v1", "openai_api_key": "k", "openai_model": "judge"}}}}
    message = error_of(tmp_path, OPENAI_MODEL, judge)
    assert "policy_model" in message and "judge_model" in message and "--server" in message
    assert load(tmp_path, OPENAI_MODEL, judge, server="judge_model").openai_model == "judge"


def test_a_block_without_openai_keys_is_no_candidate(tmp_path: Path) -> None:
    vllm = {"other": {"responses_api_models": {"vllm_model": {"entrypoint": "app.py", "base_url": "http://x/v1"}}}}
    assert load(tmp_path, OPENAI_MODEL, vllm).name == "policy_model"
    assert "no model server" in error_of(tmp_path, vllm)


def test_server_must_name_a_model_server_block(tmp_path: Path) -> None:
    message = error_of(tmp_path, MCQA, OPENAI_MODEL, server="mcqa")
    assert "--server mcqa" in message and "policy_model" in message


def test_relay_config_holds_several_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = write(tmp_path / "a.yaml", MCQA), write(tmp_path / "b.yaml", OPENAI_MODEL)
    monkeypatch.setenv(CONFIG_ENV, os.pathsep.join([str(first), str(second)]))
    monkeypatch.setenv(ENV_FILE_ENV, str(write(tmp_path / "env.yaml", ENV)))
    assert load_settings().name == "policy_model"


def test_the_flat_layout_still_works_and_merges(tmp_path: Path) -> None:
    flat = {"openai_base_url": "${policy_base_url}", "openai_api_key": "${policy_api_key}", "openai_model": "m1"}
    settings = load(tmp_path, flat, {"openai_model": "m2"})
    assert settings.openai_model == "m2" and settings.name is None and settings.retry == RetryPolicy()


# --- placeholders ------------------------------------------------------------------------------------------


def test_oc_env_with_and_without_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GYM_MODEL", "from-env")
    assert load(tmp_path, block(openai_model="${oc.env:GYM_MODEL}")).openai_model == "from-env"
    assert load(tmp_path, block(openai_model="${oc.env:GYM_UNSET,fake-model}")).openai_model == "fake-model"
    assert load(tmp_path, block(openai_model="${oc.env:GYM_UNSET,'a,b'}")).openai_model == "a,b"
    assert load(tmp_path, block(openai_model="pre-${oc.env:GYM_MODEL}-post")).openai_model == "pre-from-env-post"
    assert load(tmp_path, block(openai_model="m${oc.env:GYM_UNSET,}")).openai_model == "m"
    assert load(tmp_path, block(max_concurrent_requests="${oc.env:GYM_UNSET,8}")).max_concurrent_requests == 8
    assert load(tmp_path, block(max_concurrent_requests="${oc.env:GYM_UNSET,null}")).max_concurrent_requests is None
    message = error_of(tmp_path, block(openai_model="${oc.env:GYM_UNSET}"))
    assert "GYM_UNSET" in message and "policy_model.responses_api_models.openai_model.openai_model" in message


def test_an_oc_env_placeholder_is_never_kept_as_the_value(tmp_path: Path) -> None:
    # The silent failure this replaces: /v1/models reported the model `${oc.env:POLICY_MODEL_NAME,fake-model}`.
    assert load(tmp_path, block(openai_model="${oc.env:POLICY_MODEL_NAME,fake-model}")).openai_model == "fake-model"
    message = error_of(tmp_path, block(openai_model="${oc.decode:'1'}"))
    assert "oc.decode" in message and "not a placeholder the relay resolves" in message


def test_missing_value_names_the_key_and_where_to_set_it(tmp_path: Path) -> None:
    # The other silent failure: `openai_api_key: ???` was accepted as the key "???".
    message = error_of(tmp_path, block(openai_api_key="???"))
    assert "policy_model.responses_api_models.openai_model.openai_api_key is ???" in message
    assert "++policy_model.responses_api_models.openai_model.openai_api_key=" in message
    message = error_of(tmp_path, OPENAI_MODEL, env={**ENV, "policy_api_key": "???"})
    assert "policy_api_key is ???" in message
    flat = {"openai_base_url": "http://127.0.0.1:9/v1", "openai_api_key": "???", "openai_model": "m"}
    assert "openai_api_key is ??? (required, not set): set it in" in error_of(tmp_path, flat)


def test_variables_resolve_in_turn_dotted_and_escaped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GYM_URL", "http://127.0.0.1:7/v1")
    config = {**block(openai_model="${models.policy}", openai_default_headers={"X-Note": "\\${kept}"}), "policy_base_url": "${oc.env:GYM_URL}", "models": {"policy": "dotted"}}
    settings = load(tmp_path, config, env={"policy_api_key": SECRET, "policy_model_name": "unused"})
    assert settings.openai_base_url == "http://127.0.0.1:7/v1" and settings.openai_model == "dotted"
    assert settings.openai_default_headers == {"X-Note": "${kept}"}
    looped = {**OPENAI_MODEL, "policy_model_name": "${loop}", "loop": "${policy_model_name}"}
    assert "refers to itself" in error_of(tmp_path, looped, env={"policy_base_url": "http://x/v1", "policy_api_key": SECRET})


def test_values_from_text_read_as_gym_reads_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLICY_DROP_REASONING_ITEMS", "true")
    monkeypatch.setenv("GYM_PORT", "18000")
    settings = load(tmp_path, block(port="${oc.env:GYM_PORT}"))
    assert settings.drop_input_reasoning_items is True and settings.port == 18000
    assert "drop_input_reasoning_items must be true or false" in error_of(tmp_path, block(drop_input_reasoning_items="maybe"))


# --- max_http_attempts, capture ------------------------------------------------------------------------------


def test_max_http_attempts_maps_onto_the_retry_policy(tmp_path: Path) -> None:
    assert load(tmp_path, OPENAI_MODEL).retry == RetryPolicy(max_attempts=3, statuses=GYM_RETRY_STATUSES)  # Gym's default
    assert load(tmp_path, block(max_http_attempts=1)).retry.enabled is False
    mixed = load(tmp_path, block(max_http_attempts=5, retry={"backoff": 0.1, "statuses": [503]})).retry
    assert (mixed.max_attempts, mixed.backoff, mixed.statuses) == (5, 0.1, frozenset({503}))
    assert load(tmp_path, block(retry={"max_attempts": 2})).retry.max_attempts == 2  # the retry block wins
    assert 404 not in GYM_RETRY_STATUSES and 500 not in GYM_RETRY_STATUSES
    assert "max_http_attempts must be a positive integer" in error_of(tmp_path, block(max_http_attempts=0))


def test_capture_comes_from_gyms_top_level_keys(tmp_path: Path) -> None:
    directory = tmp_path / "captures"
    settings = load(tmp_path, {**OPENAI_MODEL, "observability_enabled": True, "model_call_capture_dir": str(directory)})
    assert settings.capture_dir == str(directory) and directory.is_dir()
    assert load(tmp_path, {**OPENAI_MODEL, "model_call_capture_dir": str(directory)}).capture_dir is None
    assert "must be an absolute path" in error_of(tmp_path, {**OPENAI_MODEL, "observability_enabled": True, "model_call_capture_dir": "rel"})
    assert "is required when observability_enabled" in error_of(tmp_path, {**OPENAI_MODEL, "observability_enabled": "true"})


# --- under ng_run: NEMO_GYM_CONFIG_DICT -------------------------------------------------------------------------


def gym_environment(monkeypatch: pytest.MonkeyPatch, config: Mapping[str, Any], name: str = "policy_model") -> None:
    monkeypatch.setenv(FROM_GYM_ENV, "1")
    monkeypatch.setenv(GYM_CONFIG_DICT_ENV, yaml.safe_dump(dict(config)))
    monkeypatch.setenv(GYM_CONFIG_PATH_ENV, name)


def test_ng_runs_unresolved_dict_resolves_against_its_own_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    config = {**MCQA, **block(host="127.0.0.1", port=17000), **ENV, "head_server": {"host": "127.0.0.1", "port": 11000}}
    gym_environment(monkeypatch, config)
    settings = load_settings()
    assert (settings.openai_model, settings.port, settings.name) == ("gym-model", 17000, "policy_model")
    assert settings.routing.session_cookie == "RelayModel___policy_model"


def test_a_session_cookie_the_config_names_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    gym_environment(monkeypatch, {**block(host="127.0.0.1", port=17000, routing={"session_cookie": "mine"}), **ENV})
    assert load_settings().routing.session_cookie == "mine"


def test_env_yaml_in_the_server_directory_comes_after_the_dict(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "env.yaml", {"policy_model_name": "from-cwd", "policy_api_key": SECRET})
    gym_environment(monkeypatch, {**block(host="127.0.0.1", port=17000), "policy_base_url": "http://127.0.0.1:9/v1", "policy_model_name": "from-dict"})
    settings = load_settings()
    assert settings.openai_model == "from-dict" and settings.openai_api_key == SECRET


def test_without_ng_runs_variables_one_line_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FROM_GYM_ENV, "1")
    with pytest.raises(ConfigError, match="NEMO_GYM_CONFIG_DICT and NEMO_GYM_CONFIG_PATH"):
        load_settings()
