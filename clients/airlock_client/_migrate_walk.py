"""Which registry entries ``airlock migrate`` works on: the selected source models, and for
each its target model ``<NAME>-airlock`` with the versions that claim to be twins of each
source version (claims only: ``_twin`` decides). Reads only; every listing is paged through
``_registry``.

A tag alone never takes a model out of ``--all``: a model counts as Airlock's target only when
it is named ``<SOURCE><suffix>`` after the source its tags name and that source is a registered
model too, so its versions are checked (as twins) when the source is migrated. Any other
model, whatever its tags say, is migrated like every model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from airlock_client import _lineage as tags
from airlock_client._errors import AirlockError
from airlock_client._registry import (
    ModelVersion,
    RegisteredModel,
    Registry,
    model_versions,
    name_filter,
    registered_models,
    tag,
    walk_pages,
)
from airlock_client._twin import source_subject

#: MLflow 3 keeps prompts in the model registry too; they are text, not models.
PROMPT_TAG = "mlflow.prompt.is_prompt"


class SelectionError(AirlockError):
    """A named model does not exist or cannot be migrated (a usage error)."""

    reason = "BAD_SELECTION"


@dataclass
class Target:
    name: str
    exists: bool
    #: source version -> the target versions that claim to be its twin, oldest first (claims:
    #: each is verified before it is believed)
    twins: dict[str, list[ModelVersion]] = field(default_factory=dict)
    conflict: str = ""
    #: The reason the source's versions are refused with when ``conflict`` says why.
    reason: str = "TARGET_CONFLICT"
    aliases: dict[str, str] = field(default_factory=dict)


def select(registry: Registry, names: Sequence[str] | None, page_size: int,
           suffix: str) -> list[str]:
    """The models to migrate: ``names`` (each checked), or every model but Airlock's own
    targets (see the module docstring) and MLflow's prompts."""
    if names is None:
        models = list(registered_models(registry, page_size))
        present = {m.name for m in models}
        return [m.name for m in models
                if not is_target(m, suffix, lambda source: source in present)
                and tag(m, PROMPT_TAG) != "true"]
    chosen: list[str] = []
    for name in dict.fromkeys(names):
        found = registered_model(registry, name)
        if found is None:
            raise SelectionError(f"no registered model is named {name!r}")
        if is_target(found, suffix,
                     lambda source: registered_model(registry, source) is not None):
            raise SelectionError(f"{name!r} holds Airlock's migrated versions; migrate its "
                                 f"source ({tag(found, tags.SOURCE_MODEL)}) instead")
        chosen.append(name)
    return chosen


def is_target(model: RegisteredModel, suffix: str, exists: Callable[[str], bool]) -> bool:
    """Whether ``model`` is Airlock's target of a registered source: its tags say so, its name
    is the source's name plus ``suffix``, and that source exists."""
    source = tag(model, tags.SOURCE_MODEL)
    return (tag(model, tags.ROLE) == tags.ROLE_MIGRATED and bool(source)
            and model.name == tags.target_name(source, suffix) and exists(source))


def registered_model(registry: Registry, name: str) -> RegisteredModel | None:
    """The model named ``name``, or None (the filter may match others: ``name_filter``)."""
    return next((m for m in walk_pages(lambda token: registry.search_registered_models(
        filter_string=name_filter(name), max_results=100, page_token=token),
        f"the models named {name!r}") if m.name == name), None)


def find_target(registry: Registry, source: str, suffix: str, page_size: int) -> Target:
    """The target model and its twins (source version -> target version), paged."""
    name = tags.target_name(source, suffix)
    try:
        source_subject(source, "0")
    except ValueError as exc:  # a name of the registry's, anyone's to choose: this model's
        return Target(name, exists=False, conflict=f"{exc}: its versions cannot be signed as "
                      "models:/NAME/VERSION; rename the model", reason="SUBJECT_TOO_LONG")
    found = registered_model(registry, name)
    if found is None:
        return Target(name, exists=False)
    if (tag(found, tags.ROLE) != tags.ROLE_MIGRATED
            or tag(found, tags.SOURCE_MODEL) != source):
        return Target(name, exists=True, conflict=(
            f"{name!r} exists and is not Airlock's target for {source!r}; rename it or "
            "choose another --target-suffix"))
    twins: dict[str, list[ModelVersion]] = {}
    for mv in model_versions(registry, name, page_size):
        if tag(mv, tags.SOURCE_MODEL) == source and tag(mv, tags.SOURCE_VERSION):
            twins.setdefault(tag(mv, tags.SOURCE_VERSION), []).append(mv)
    return Target(name, exists=True, twins=twins,
                  aliases={str(k): str(v) for k, v in (found.aliases or {}).items()})
