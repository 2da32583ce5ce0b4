"""A fake MLflow registry at the ``airlock_client._registry.Registry`` seam.

It pages like the real server (opaque tokens, at most ``max_results`` per page, optionally
fewer when ``server_cap`` is set) and records every write, so tests can prove that a re-run
or a dry run writes nothing.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any


@dataclass
class FakeModel:
    name: str
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    aliases: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeVersion:
    name: str
    version: str
    tags: dict[str, str] = field(default_factory=dict)
    status: str = "READY"
    run_id: str | None = None
    source: str = ""
    description: str = ""


@dataclass
class FakePage:
    items: list[Any]
    token: str | None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.items)


_NAME_FILTER = re.compile(r"""^name = (['"])(?P<name>.*)\1$|^name LIKE '(?P<prefix>[^']*)%'$""")


class FakeRegistry:
    def __init__(self, server_cap: int | None = None) -> None:
        self.models: dict[str, FakeModel] = {}
        self.versions: dict[str, list[FakeVersion]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.experiments: dict[str, str] = {}
        self.writes: list[tuple[Any, ...]] = []
        self.searches: list[tuple[str, int]] = []
        self.server_cap = server_cap
        self.fail_on: dict[str, Exception] = {}
        #: What the registry's client was opened on, and where new runs keep their files.
        self.tracking_uri = "http://fake-registry:5000"
        self.artifact_root = "fake-artifacts:/"
        self._ids = itertools.count(1)

    # -- set-up helpers -----------------------------------------------------------------------

    def add_model(self, name: str, versions: int = 1, **tags: str) -> None:
        self.models[name] = FakeModel(name, dict(tags))
        self.versions[name] = [FakeVersion(name, str(v), source=f"src/{name}/{v}")
                               for v in range(1, versions + 1)]

    def version(self, name: str, version: str | int) -> FakeVersion:
        return next(v for v in self.versions[name] if v.version == str(version))

    # -- paging ------------------------------------------------------------------------------

    def _page(self, what: str, items: list[Any], max_results: int,
              page_token: str | None) -> FakePage:
        self.searches.append((what, max_results))
        start = json.loads(base64.b64decode(page_token))["offset"] if page_token else 0
        size = min(max_results, self.server_cap or max_results)
        chunk = items[start:start + size]
        more = start + size < len(items)
        token = base64.b64encode(json.dumps({"offset": start + size}).encode()).decode()
        return FakePage(chunk, token if more else "")

    def _name(self, filter_string: str | None) -> Callable[[str], bool]:
        """What the filter matches: ``name = 'X'`` or ``name LIKE 'PREFIX%'`` (or all)."""
        if not filter_string:
            return lambda name: True
        match = _NAME_FILTER.match(filter_string)
        assert match, f"the fake understands name filters only, not {filter_string!r}"
        if match["prefix"] is not None:
            return lambda name: name.startswith(match["prefix"])
        return lambda name: name == match["name"]

    def search_registered_models(self, filter_string: str | None = None, max_results: int = 100,
                                 order_by: Any = None, page_token: str | None = None) -> FakePage:
        matches = self._name(filter_string)
        items = [m for m in self.models.values() if matches(m.name)]
        return self._page("models", items, max_results, page_token)

    def search_model_versions(self, filter_string: str | None = None, max_results: int = 10000,
                              order_by: Any = None, page_token: str | None = None) -> FakePage:
        matches = self._name(filter_string)
        items = [v for vs in self.versions.values() for v in vs if matches(v.name)]
        name = _NAME_FILTER.match(filter_string or "")
        return self._page(f"versions:{name['name'] if name else None}", items, max_results,
                          page_token)

    def search_runs(self, experiment_ids: list[str], filter_string: str = "",
                    run_view_type: int = 1, max_results: int = 1000,
                    order_by: Any = None, page_token: str | None = None) -> FakePage:
        assert filter_string == "attributes.status = 'RUNNING'", filter_string
        items = [SimpleNamespace(
            info=SimpleNamespace(run_id=run_id, status=run["status"],
                                 artifact_uri=f"fake-artifacts:/{run_id}",
                                 experiment_id=run.get("experiment_id")),
            data=SimpleNamespace(tags=dict(run["tags"])))
            for run_id, run in self.runs.items()
            if run["status"] == "RUNNING" and run.get("experiment_id") in experiment_ids]
        return self._page("runs", items, max_results, page_token)

    # -- reads -------------------------------------------------------------------------------

    def get_registered_model(self, name: str) -> FakeModel:
        return self.models[name]

    def get_model_version(self, name: str, version: str) -> FakeVersion:
        return self.version(name, version)

    def get_model_version_by_alias(self, name: str, alias: str) -> FakeVersion:
        return self.version(name, self.models[name].aliases[alias])

    def get_model_version_download_uri(self, name: str, version: str) -> str:
        return self.version(name, version).source

    def get_experiment_by_name(self, name: str) -> Any:
        if name not in self.experiments:
            return None
        return SimpleNamespace(experiment_id=self.experiments[name])

    # -- writes ------------------------------------------------------------------------------

    def _write(self, *call: Any) -> None:
        if call[0] in self.fail_on:
            raise self.fail_on.pop(call[0])
        self.writes.append(call)

    def create_registered_model(self, name: str, tags: dict[str, Any] | None = None,
                                description: str | None = None) -> FakeModel:
        self._write("create_registered_model", name)
        assert name not in self.models
        self.models[name] = FakeModel(name, dict(tags or {}), description or "")
        self.versions[name] = []
        return self.models[name]

    def create_model_version(self, name: str, source: str, run_id: str | None = None,
                             tags: dict[str, Any] | None = None,
                             description: str | None = None) -> FakeVersion:
        self._write("create_model_version", name, source)
        mv = FakeVersion(name, str(len(self.versions[name]) + 1), dict(tags or {}),
                         run_id=run_id, source=source, description=description or "")
        self.versions[name].append(mv)
        return mv

    def set_model_version_tag(self, name: str, version: str | None = None,
                              key: str | None = None, value: Any = None) -> None:
        self._write("set_model_version_tag", name, version, key)
        assert key is not None and len(str(value)) <= 5000
        self.version(name, str(version)).tags[key] = str(value)

    def delete_model_version_tag(self, name: str, version: str | None = None,
                                 key: str | None = None) -> None:
        tags = self.version(name, str(version)).tags
        if key not in tags:
            raise KeyError(key)  # MLflow raises too for an absent tag
        self._write("delete_model_version_tag", name, version, key)
        del tags[key]

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self._write("set_registered_model_alias", name, alias, version)
        self.models[name].aliases[alias] = version

    def create_experiment(self, name: str, tags: dict[str, Any] | None = None) -> str:
        self._write("create_experiment", name)
        self.experiments[name] = str(next(self._ids))
        return self.experiments[name]

    def create_run(self, experiment_id: str, tags: dict[str, Any] | None = None,
                   run_name: str | None = None) -> Any:
        self._write("create_run", experiment_id)
        run_id = f"run{next(self._ids)}"
        self.runs[run_id] = {"tags": dict(tags or {}), "artifacts": {}, "status": "RUNNING",
                             "experiment_id": experiment_id, "name": run_name or ""}
        return SimpleNamespace(info=SimpleNamespace(
            run_id=run_id, artifact_uri=f"{self.artifact_root}{run_id}"))

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self._write("log_artifact", run_id, Path(local_path).name)
        key = f"{artifact_path}/{Path(local_path).name}" if artifact_path else Path(local_path).name
        self.runs[run_id]["artifacts"][key] = Path(local_path).read_bytes()

    def set_terminated(self, run_id: str, status: str | None = None) -> None:
        self._write("set_terminated", run_id, status)
        self.runs[run_id]["status"] = status
        print(f"🏃 View run {run_id} at: http://fake/#/runs/{run_id}")  # as MlflowClient does

    # -- a downloader over the fake artifact store --------------------------------------------

    def listing(self, folder_uri: str) -> dict[str, int]:
        """The files directly under ``folder_uri``, with their sizes (a folder: -1)."""
        prefix = "fake-artifacts:/"
        assert folder_uri.startswith(prefix), folder_uri
        run_id, _, rel = folder_uri[len(prefix):].rstrip("/").partition("/")
        found: dict[str, int] = {}
        for path, data in self.runs[run_id]["artifacts"].items():
            if path.startswith(rel + "/"):
                first, _, rest = path[len(rel) + 1:].partition("/")
                found[first] = -1 if rest else len(data)
        return found

    def download(self, artifact_uri: str, dest: Path, limit: int) -> Path:
        prefix = "fake-artifacts:/"
        assert artifact_uri.startswith(prefix), artifact_uri
        run_id, _, rel = artifact_uri[len(prefix):].partition("/")
        data = self.runs[run_id]["artifacts"][rel]
        out = dest / Path(rel).name
        out.write_bytes(data)
        return out
