"""The MLflow model registry as Airlock sees it: a narrow seam, walked one page at a time.

``Registry`` names the few ``MlflowClient`` methods Airlock calls, so the real client fits it
as it is and unit tests pass a fake. Nothing here downloads or opens a model: the walkers only
list registered models and versions.

Search calls are paged on purpose. One ``search_registered_models`` call returns at most
``max_results`` models (MLflow issue #15164: not "everything" when left out), and page tokens
are the only way on; a registry that hands back a token it already gave is refused instead of
looped over (issue #9363 reports token oddities).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from airlock_client._errors import AirlockError

#: Page size when neither ``--page-size`` nor ``AIRLOCK_MIGRATE_PAGE_SIZE`` says otherwise.
DEFAULT_PAGE_SIZE = 100
#: MLflow's own cap for search_registered_models; larger pages are refused by the server.
MAX_PAGE_SIZE = 1000
#: A walk longer than this is a registry bug, not a registry.
MAX_PAGES = 100_000
#: ``fetch(models_uri, dest_dir) -> model_dir``: download a version's files, bytes only
#: (``migrate``'s source versions, ``safe_load``'s source of a converted version).
Fetch = Callable[[str, Path], Path]

T = TypeVar("T", covariant=True)
E = TypeVar("E")


class RegistryError(AirlockError):
    """The registry refused a call or answered something a registry should not."""

    reason = "REGISTRY_ERROR"


class RegisteredModel(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def tags(self) -> Mapping[str, str]: ...
    @property
    def aliases(self) -> Mapping[str, str]: ...  # alias -> version


class ModelVersion(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str | int: ...
    @property
    def tags(self) -> Mapping[str, str]: ...
    @property
    def status(self) -> str: ...
    @property
    def run_id(self) -> str | None: ...


class Page(Protocol[T]):
    """MLflow's ``PagedList``: an iterable of results and the token of the next page."""

    @property
    def token(self) -> str | None: ...
    def __iter__(self) -> Iterator[T]: ...


class Registry(Protocol):
    """The subset of ``mlflow.MlflowClient`` that migration and the safe load use.

    Arguments after the first are keyword-only here, so ``MlflowClient`` (which has more
    optional parameters between them) matches structurally; mypy checks that it does.
    """

    def search_registered_models(self, *, filter_string: str | None = None,
                                 max_results: int = ...,
                                 page_token: str | None = None) -> Page[RegisteredModel]: ...
    def search_model_versions(self, *, filter_string: str | None = None,
                              max_results: int = ...,
                              page_token: str | None = None) -> Page[ModelVersion]: ...
    def create_registered_model(self, name: str, *, tags: dict[str, Any] | None = None,
                                description: str | None = None) -> RegisteredModel: ...
    def get_model_version(self, name: str, version: str) -> ModelVersion: ...
    def get_model_version_by_alias(self, name: str, alias: str) -> ModelVersion: ...
    def get_model_version_download_uri(self, name: str, version: str) -> str: ...
    def create_model_version(self, name: str, source: str, *, run_id: str | None = None,
                             tags: dict[str, Any] | None = None,
                             description: str | None = None) -> ModelVersion: ...
    def set_model_version_tag(self, name: str, version: str | None = None,
                              key: str | None = None, value: Any = None) -> None: ...
    def delete_model_version_tag(self, name: str, version: str | None = None,
                                 key: str | None = None) -> None: ...
    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None: ...
    @property
    def tracking_uri(self) -> str: ...
    def get_experiment_by_name(self, name: str) -> Any: ...
    def create_experiment(self, name: str) -> str: ...
    def create_run(self, experiment_id: str, *, tags: dict[str, Any] | None = None,
                   run_name: str | None = None) -> Any: ...
    def search_runs(self, experiment_ids: list[str], *, filter_string: str = ...,
                    max_results: int = ..., page_token: str | None = None) -> Page[Any]: ...
    def log_artifact(self, run_id: str, local_path: str,
                     artifact_path: str | None = None) -> None: ...
    def set_terminated(self, run_id: str, status: str | None = None) -> None: ...


def page_size_from_env(default: int = DEFAULT_PAGE_SIZE) -> int:
    raw = os.environ.get("AIRLOCK_MIGRATE_PAGE_SIZE", "")
    return check_page_size(int(raw)) if raw.strip() else default


def check_page_size(size: int) -> int:
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise ValueError(f"page size must be between 1 and {MAX_PAGE_SIZE}, not {size}")
    return size


def walk_pages(fetch: Callable[[str | None], Page[E]], what: str) -> Iterator[E]:
    """Every item of a paged search: call ``fetch(token)`` until a page carries no token."""
    token: str | None = None
    seen: set[str] = set()
    for _ in range(MAX_PAGES):
        page = fetch(token)
        yield from page
        token = page.token or None
        if token is None:
            return
        if token in seen:
            raise RegistryError(f"the registry gave the same page token twice while listing "
                                f"{what}; refusing to loop")
        seen.add(token)
    raise RegistryError(f"listing {what} took more than {MAX_PAGES} pages")


def name_filter(name: str) -> str:
    """An MLflow search filter that matches ``name``, and perhaps other names too (callers
    compare each name found): ``name = 'NAME'``. The filter language has no escape for
    quotes, so a name holding both kinds (anyone may register one) is matched by what comes
    before its first single quote: ``name LIKE 'PREFIX%'``. A refusal there stopped every
    ``migrate --all``."""
    for quote in ("'", '"'):
        if quote not in name:
            return f"name = {quote}{name}{quote}"
    return f"name LIKE '{name[:name.index(chr(39))]}%'"


def registered_models(registry: Registry, page_size: int) -> Iterator[RegisteredModel]:
    """Every registered model, page by page, in the registry's order."""
    return walk_pages(lambda token: registry.search_registered_models(
        max_results=page_size, page_token=token), "registered models")


def model_versions(registry: Registry, name: str, page_size: int) -> list[ModelVersion]:
    """Every version of ``name``, each once, oldest first."""
    query = name_filter(name)
    found: dict[int, ModelVersion] = {}
    for mv in walk_pages(lambda token: registry.search_model_versions(
            filter_string=query, max_results=page_size, page_token=token),
            f"the versions of {name!r}"):
        if mv.name == name:  # a filter is the server's promise; check it anyway
            found.setdefault(int(mv.version), mv)
    return [found[v] for v in sorted(found)]


def tag(entity: RegisteredModel | ModelVersion, key: str) -> str:
    tags = entity.tags or {}
    return str(tags.get(key, ""))


def open_registry(tracking_uri: str, registry_uri: str | None = None) -> Registry:
    """An ``MlflowClient`` on an explicit tracking (and registry) URI.

    Both URIs are set explicitly: left to itself MLflow falls back to a local store in the
    working directory, and a download helper that resolves ``models:/`` ignores the registry
    it was given (mlflow 3.17), so Airlock never relies on process-global defaults.
    """
    from mlflow.tracking import MlflowClient  # the registry's REST client; loads no model

    client: Registry = MlflowClient(tracking_uri=tracking_uri,
                                    registry_uri=registry_uri or tracking_uri)
    return client


def names_of(models: Iterable[RegisteredModel]) -> list[str]:
    return [m.name for m in models]
