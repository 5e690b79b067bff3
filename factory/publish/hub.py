"""The Hub side of a publication: endpoint, offline check, token lookup, the one-commit upload, and failures as
one line scrubbed of the token (the token is never printed, logged, stored or written)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

from factory.core.errors import FactoryError, UserInputError
from factory.core.redact import redact
from factory.core.text import one_line
from factory.publish.staged import Staged

_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub reads as a true environment flag
REDACTED = "[redacted]"


def endpoint() -> str:
    """The Hub endpoint: HF_ENDPOINT as it is now (huggingface_hub reads it once, at import), else its default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_online() -> None:
    """Refuse to publish in offline mode, before anything is written."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in _TRUE:
            raise UserInputError(f"{name} is set: publishing needs the network; unset it, or use --dry-run")
    if constants.is_offline_mode():
        raise UserInputError("huggingface_hub is in offline mode: publishing needs the network; use --dry-run instead")


def hub_token() -> str:
    """The token from huggingface_hub's own lookup (HF_TOKEN, then the login cache); never shown anywhere."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserInputError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` with a token that can write to the repo "
            "(or write the files with --dry-run)"
        )
    return token


def upload(staged: Staged, repo_id: str, revision: str, private: bool, token: str, hub: str) -> tuple[str, str]:
    """Create the repo (and branch) if needed and commit every staged file at once; returns (commit id, url)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    import factory

    api = HfApi(endpoint=hub, token=token, library_name="factory", library_version=factory.__version__)
    # Without --private the owner's default visibility applies; an existing repo keeps its own.
    api.create_repo(repo_id, repo_type="dataset", private=True if private else None, exist_ok=True)
    if revision != "main":
        api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(staged.folder / p)) for p in staged.files]
    rows = ", ".join(f"{split} {n}" for split, n in staged.rows.items())
    info = api.create_commit(
        repo_id,
        operations,
        repo_type="dataset",
        revision=revision,
        commit_message=f"Publish {staged.recipe} with factory (rows: {rows})",
        commit_description=(
            f"Export stage key {staged.export_key}, recipe hash {staged.recipe_hash}, "
            f"dataset hash {staged.export_hash}."
        ),
    )
    return str(info.oid), str(info.commit_url)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and its causes (huggingface_hub wraps an LFS upload's failure in a RuntimeError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport failures of whichever HTTP client this huggingface_hub uses (only a loaded one can raise)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        error = getattr(sys.modules.get(module), name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


def hub_failure(exc: BaseException, repo_id: str, hub: str) -> FactoryError | None:
    """A one-line FactoryError for a refusal or a network failure; None for anything else (a bug)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    owner = repo_id.split("/")[0]
    for cause in _chain(exc):
        if isinstance(cause, OfflineModeIsEnabled):
            return UserInputError("huggingface_hub is in offline mode (HF_HUB_OFFLINE): use --dry-run instead")
        response = getattr(cause, "response", None)
        if isinstance(cause, HfHubHTTPError) and response is not None:
            status = response.status_code
            said = " ".join(str(getattr(cause, "server_message", None) or "").split())[:300]
            said = f": {said}" if said else ""
            if status in (401, 403):
                return FactoryError(
                    f"{repo_id}: the Hub at {hub} refused (HTTP {status}{said}); check that your token can write "
                    f"to '{owner}'"
                )
            return FactoryError(f"{repo_id}: the Hub at {hub} answered HTTP {status}{said}")
        if isinstance(cause, _network_errors()):
            return FactoryError(
                f"{repo_id}: cannot reach the Hub at {hub} ({type(cause).__name__}: {cause}); check the network "
                "and HF_ENDPOINT"
            )
        if isinstance(cause, ValueError) and "Invalid metadata in README.md" in str(cause):
            said = one_line(cause)
            return FactoryError(f"{repo_id}: the Hub refused the dataset card's metadata ({said})")
    return None


def scrub(text: str, token: str | None) -> str:
    """`text` without the token (it may come from the login cache, which `redact` does not know) or other secrets."""
    if token:
        text = text.replace(token, REDACTED)
    return redact(text) or ""
