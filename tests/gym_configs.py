"""NeMo Gym's own config shapes, as its repository ships them, shared by the Gym tests."""

from typing import Any


def model_server(implementation: str) -> dict[str, Any]:
    """responses_api_models/openai_model/configs/openai_model.yaml, with `implementation` as the server's key."""
    return {
        "policy_model": {
            "responses_api_models": {
                implementation: {
                    "entrypoint": "app.py",
                    "openai_base_url": "${policy_base_url}",
                    "openai_api_key": "${policy_api_key}",
                    "openai_model": "${policy_model_name}",
                    "openai_default_headers": {},
                    "drop_input_reasoning_items": "${oc.env:POLICY_DROP_REASONING_ITEMS,false}",
                }
            }
        }
    }


# resources_servers/mcqa's config: a resources server and the agent that calls policy_model.
MCQA = {
    "mcqa": {"resources_servers": {"mcqa": {"entrypoint": "app.py", "domain": "knowledge"}}},
    "mcqa_simple_agent": {"responses_api_agents": {"simple_agent": {"entrypoint": "app.py", "model_server": {"type": "responses_api_models", "name": "policy_model"}}}},
}
