"""What to index: a folder of images, a list of URLs/paths, a CSV, or a Parquet manifest, read into ``Item``s with
stable ids. A manifest (id + path/URL columns) is how a catalog too big to list file by file is handed over.

The id is what a rerun matches on to skip work already done: the file path relative to the folder (POSIX
separators), the line of the list as written, or the CSV's id column.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"})
SourceKind = Literal["auto", "folder", "list", "csv", "parquet"]


@dataclass(frozen=True)
class Item:
    id: str
    source: str  # stored beside the embedding: the absolute path or the URL
    image: str | Path  # what the client is given: a URL, or a Path it reads itself
    shard: int | None = None  # position in the source // shard size (set by ``siglip.index.build.plan``)


@dataclass(frozen=True)
class Failure:
    id: str
    source: str
    status: int | None  # the server's HTTP status; None when no answer came (or a local problem)
    error: str

    def as_dict(self) -> dict:
        return {"id": self.id, "source": self.source, "status": self.status, "error": self.error}


@dataclass
class Catalog:
    items: list[Item] = field(default_factory=list)
    problems: list[Failure] = field(default_factory=list)  # rows that name no usable image
    duplicates: int = 0  # items whose id appeared earlier in the source (the first one is kept)

    def add(self, item: Item, seen: set[str]) -> None:
        if item.id in seen:
            self.duplicates += 1
            return
        seen.add(item.id)
        self.items.append(item)


class SourceError(ValueError):
    """The source as a whole cannot be read (missing, wrong format, missing CSV column)."""


# Object stores pyarrow's filesystems read (the ray engine's tasks read images there; manifests may live there).
STORE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "hdfs://")


def is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def is_store_uri(value: str) -> bool:
    return value.startswith(STORE_SCHEMES)


def _image_ref(value: str, base: Path | None) -> tuple[str, str | Path]:
    """(source, image) for a URL, an object-store URI or a path relative to ``base`` (None: a manifest on an
    object store, where a relative path means nothing)."""
    if is_url(value) or is_store_uri(value):
        return value, value
    if base is None:
        raise SourceError("a manifest on an object store needs absolute image locations (URLs, s3://...)")
    path = (base / value).resolve()
    return str(path), path


def detect_kind(path: Path) -> Literal["folder", "list", "csv", "parquet"]:
    if path.is_dir():
        # A folder holding only Parquet files (and Spark's _SUCCESS markers) is a manifest written in parts.
        names = [p.name for p in path.iterdir() if not p.name.startswith(("_", "."))]
        return "parquet" if names and all(n.endswith(".parquet") for n in names) else "folder"
    if not path.is_file():
        raise SourceError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    return "csv" if suffix in (".csv", ".tsv") else "parquet" if suffix in (".parquet", ".pq") else "list"


def read_folder(root: Path) -> Catalog:
    """Image files under ``root`` (recursive, by suffix, symlinked folders not followed), in path order."""
    catalog, seen = Catalog(), set()
    root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                catalog.add(Item(path.relative_to(root).as_posix(), str(path), path), seen)
    return catalog


def read_list(path: Path) -> Catalog:
    """One image per line: an http(s) URL, or a path relative to the list's folder. Blank lines and lines
    starting with ``#`` are ignored; the id is the line as written."""
    catalog, seen = Catalog(), set()
    base = path.resolve().parent
    for line in path.read_text(encoding="utf-8").splitlines():
        value = line.strip()
        if value and not value.startswith("#"):
            source, image = _image_ref(value, base)
            catalog.add(Item(value, source, image), seen)
    return catalog


def read_csv(path: Path, id_column: str = "id", image_column: str = "image") -> Catalog:
    """A CSV (or TSV, by suffix) with a header row; the image column holds an http(s) URL or a path relative to
    the CSV's folder."""
    catalog, seen = Catalog(), set()
    base = path.resolve().parent
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = reader.fieldnames or []
        _check_columns(path, columns, id_column, image_column)
        for row in reader:
            _add_row(catalog, seen, row.get(id_column), row.get(image_column), base, path.name,
                     f"line {reader.line_num}", (id_column, image_column))
    return catalog


def _check_columns(path: Path, columns: list[str], id_column: str, image_column: str) -> None:
    missing = [c for c in (id_column, image_column) if c not in columns]
    if missing:
        raise SourceError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(columns)}); "
                          "name them with --id-column / --image-column")


def _add_row(catalog: Catalog, seen: set[str], item_id: object, value: object, base: Path, file: str,
             position: str, names: tuple[str, str]) -> None:
    """One manifest row (CSV or Parquet) at ``position`` ("line 5", "row 3"): an item, or a problem naming the row
    and its empty column."""
    item_id, value = ("" if v is None else str(v).strip() for v in (item_id, value))
    if not item_id or not value:
        catalog.problems.append(Failure(item_id or position, value, None,
                                        f"{file} {position}: empty {names[0] if not item_id else names[1]!r}"))
        return
    try:
        source, image = _image_ref(value, base)
    except SourceError as exc:
        catalog.problems.append(Failure(item_id, value, None, f"{file} {position}: {exc}"))
        return
    catalog.add(Item(item_id, source, image), seen)


def read_parquet(path: Path | str, id_column: str = "id", image_column: str = "image") -> Catalog:
    """A Parquet manifest, one file or a folder of them: an id column (strings, or numbers written as text) and an
    image column (an http(s) URL or a path relative to the manifest's folder); other columns are ignored. Only the
    two columns are read, a batch at a time."""
    import pyarrow.dataset as pads

    catalog, seen = Catalog(), set()
    if isinstance(path, str):  # on an object store (s3://...): read by pyarrow's filesystem for it
        base, name = None, path.rstrip("/").rsplit("/", 1)[-1]
    else:
        base, name = (path.resolve() if path.is_dir() else path.resolve().parent), path.name
    manifest = pads.dataset(path, format="parquet")  # one file, or a folder of them (Spark / DuckDB output)
    _check_columns(path, manifest.schema.names, id_column, image_column)
    row = 0
    for batch in manifest.to_batches(columns=[id_column, image_column]):
        for item_id, value in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            row += 1
            _add_row(catalog, seen, item_id, value, base, name, f"row {row}", (id_column, image_column))
    return catalog


def read_source(path: str | Path, kind: SourceKind = "auto", id_column: str = "id",
                image_column: str = "image") -> Catalog:
    if isinstance(path, str) and is_store_uri(path):
        if kind not in ("auto", "parquet"):
            raise SourceError(f"{path}: only a Parquet manifest can be read from an object store")
        try:
            return read_parquet(path, id_column, image_column)
        except (OSError, ValueError) as exc:
            raise SourceError(f"{path}: {exc}") from exc
    path = Path(path)
    kind = detect_kind(path) if kind == "auto" else kind
    try:
        if kind == "parquet":
            return read_parquet(path, id_column, image_column)
        if kind == "folder":
            if not path.is_dir():
                raise SourceError(f"{path}: not a folder")
            return read_folder(path)
        if kind == "csv":
            return read_csv(path, id_column, image_column)
        return read_list(path)
    except SourceError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:  # ValueError: pyarrow's ArrowInvalid
        raise SourceError(f"{path}: {exc}") from exc
