"""Shard formats: one module per format, its writer and reader together, and this registry.

Every format holds the same logical records (pipeline/records.py) and is listed file by file in
the manifest. A writer creates a set's files under a build's output directory, one shard at a
time; a reader reads one shard of a split back as a record block (a ShardBlock, or a layer's
LayerBlock; or, asked for a narrower record such as SnapshotFields, only that record's arrays;
or some columns of one array: an epoch's coded query sets), verified against the manifest.
Adding a format is a module with these two classes and a line here.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from pipeline.formats.wds import WdsReader, WdsWriter
from pipeline.formats.zarr import ZarrReader, ZarrWriter
from pipeline.manifest import ShardEntry
from pipeline.records import RecordSchema, StoredRecords, _Record


class ShardWriter(Protocol):
    """Writes one format's files of a shard set under ``root`` (paths it returns are relative)."""

    def __init__(self, root: Path, schema: RecordSchema, chunk: int) -> None: ...

    def create(self, snapshots_per_split: dict[str, int], attributes: dict | None = None) -> None:
        """Once per build, before any shard: whatever must exist first (zarr's arrays), with the
        groups' descriptive ``attributes`` where the format has any (zarr)."""

    def write(self, split: str, index: int, name: str, block: _Record) -> list[str]:
        """Write shard ``index`` of ``split`` (named ``name``); the files written."""

    def leftovers(self, split: str, index: int, name: str) -> list[str]:
        """Glob patterns of the temporary files a killed write of this shard can leave."""

    def metadata(self) -> list[str]:
        """Files besides the shards' own that the manifest must list (zarr.json)."""


class ShardReader(Protocol):
    """Reads shards of one split, each verified against the manifest before it is used."""

    sets_apart: bool  # True where read_columns reads an epoch's query sets without the rest

    def __init__(self, location: str, split: str, stored: StoredRecords, remote=None) -> None: ...

    def read(self, shard: ShardEntry, record: type[_Record] | None = None) -> _Record:
        """Shard ``shard`` as a ``record`` (default: the stored record type), reading only the
        arrays that record holds."""

    def read_columns(self, shard: ShardEntry, name: str, columns: slice) -> np.ndarray:
        """``columns`` (of the axis after the snapshot axis) of array ``name`` of the shard's
        snapshots: one epoch's coded query sets, read apart from the rest where the format
        stores them apart (zarr's chunks)."""


class ShardFormat(NamedTuple):
    writer: type[ShardWriter]
    reader: type[ShardReader]


FORMATS: dict[str, ShardFormat] = {
    "zarr": ShardFormat(ZarrWriter, ZarrReader),
    "wds": ShardFormat(WdsWriter, WdsReader),
}
