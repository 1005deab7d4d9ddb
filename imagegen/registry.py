"""The local dataset registry: every complete folder under ``<data root>/datasets`` is a dataset.

A dataset folder is named by its id (a content hash of source, stage parameters and code
versions) and holds ``card.json``; the card carries a human name.  Later flows refer to a
dataset by id, by a unique id prefix, or by name (the newest dataset with that name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen.artifacts import is_complete, read_card, write_json_atomic
from imagegen.paths import datasets_dir


class RegistryError(LookupError):
    pass


@dataclass(frozen=True)
class DatasetRef:
    id: str
    path: Path
    card: dict[str, Any]

    names: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.names[-1] if self.names else self.card.get("name", "")

    @property
    def shards(self) -> list[Path]:
        return sorted((self.path / "shards").glob("*.tar"))

    def summary(self) -> dict[str, Any]:
        c = self.card
        return {"id": self.id, "name": self.name, "names": list(self.names), "path": str(self.path),
                "samples": c.get("counts", {}).get("shard", {}).get("samples"),
                "shards": len(c.get("shards", [])), "created": c.get("created_unix"),
                "source": c.get("source", {}).get("kind")}


NAMES = "names.json"


def _names(root: Path) -> dict[str, str]:
    path = datasets_dir(root) / NAMES
    return json.loads(path.read_text()) if path.is_file() else {}


VERSIONS = "versions.json"


def _versions(root: Path) -> dict[str, list[str]]:
    path = datasets_dir(root) / VERSIONS
    vs = json.loads(path.read_text()) if path.is_file() else {}
    for n, i in _names(root).items():  # registries from before versions: the named id is version 1
        vs.setdefault(n, [i])
    return vs


def versions_of(root: Path, name: str) -> list[str]:
    """Every dataset id registered under ``name``, oldest first (``name@1`` is the first)."""
    return list(_versions(root).get(name, []))


def register_name(root: Path, name: str, dataset_id: str) -> None:
    """Point ``name`` at ``dataset_id`` (a name always means the dataset it was last given to), and
    record it as the next version ``name@N`` when it differs from the latest.

    Content-identical datasets share one folder whatever they are called, so names live apart
    from the folders."""
    vs = _versions(root)
    names = _names(root)
    names.pop(name, None)
    names[name] = dataset_id  # re-inserted last: dict order = assignment order
    history = vs.setdefault(name, [])
    if dataset_id not in history:  # the same content again is the version it already is (numbers never move)
        history.append(dataset_id)
    write_json_atomic(datasets_dir(root) / VERSIONS, vs)
    write_json_atomic(datasets_dir(root) / NAMES, names)


def list_datasets(root: Path) -> list[DatasetRef]:
    base = datasets_dir(root)
    if not base.is_dir():
        return []
    names: dict[str, list[str]] = {}
    for n, i in _names(root).items():
        names.setdefault(i, []).append(n)
    refs = [DatasetRef(p.name, p, read_card(p), tuple(names.get(p.name, ())))
            for p in base.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(refs, key=lambda r: r.card.get("created_unix", 0))


def get_dataset(root: Path, name_or_id: str) -> DatasetRef:
    refs = list_datasets(root)
    exact = [r for r in refs if r.id == name_or_id]
    if exact:
        return exact[0]
    if "@" in name_or_id:
        name, _, n = name_or_id.rpartition("@")
        vs = versions_of(root, name)
        if not n.isdigit() or not 1 <= int(n) <= len(vs):
            raise RegistryError(f"dataset {name!r} has versions @1..@{len(vs)}, not @{n}" if vs else
                                f"no dataset named {name!r} in the registry at {datasets_dir(root)}")
        name_or_id = vs[int(n) - 1]
        exact = [r for r in refs if r.id == name_or_id]
        if exact:
            return exact[0]
    by_name = _names(root).get(name_or_id)
    named = [r for r in refs if r.id == by_name]
    if named:
        return named[0]
    prefixed = [r for r in refs if len(name_or_id) >= 6 and r.id.startswith(name_or_id)]
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1:
        raise RegistryError(f"dataset id prefix {name_or_id!r} is ambiguous: {[r.id for r in prefixed]}")
    known = ", ".join(f"{r.name} ({r.id})" for r in refs[-10:]) or "none"
    raise RegistryError(f"no dataset {name_or_id!r} in the registry at {datasets_dir(root)}; known: {known}")
