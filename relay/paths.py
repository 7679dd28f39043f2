"""The path a request names below the app's mount point: what the routes and the open paths of
relay_api_keys are matched against."""

from starlette.types import Scope


def route_path(scope: Scope) -> str:
    """The path below the app's root_path, which uvicorn includes in `path`."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :]
    return path
