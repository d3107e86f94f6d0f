"""A reader study on disk: its manifest, its readers' hashed tokens, their answers.

``radsynth study create`` (``serving/study.py``) writes one folder per study, atomically,
under ``study.dir`` (default ``<paths.artifacts>/studies``), never under the web app's static
files::

    <study>/manifest.json     model name + version, seeds, items (which is real, which synthetic,
                              the condition, the test-split index or the latent seed), reader orders
    <study>/readers.json      one sha256 per reader token (the tokens themselves are shown once)
    <study>/images/NNNN.png   the items' pixels: uncompressed 8-bit PNG, no metadata, so every
                              image of a study has the same byte size whatever it shows
    <study>/answers.sqlite    the answers (one transaction per answer)
    <study>/closed.json       present once the study is closed (`radsynth study close`)
    <study>/report/           `radsynth study report`: report.md, report.json

Readers are numbered 1..N; a reader's number is all that is stored about them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from radsynth.config import Params
from radsynth.errors import RadsynthError

FORMAT_VERSION = 1
CALLS = ("real", "synthetic")
CONFIDENCE_LEVELS = 5
CANNOT_TELL = "CANNOT_TELL"                    # the condition answer "cannot tell"
TOKEN_BYTES = 24                               # 192 random bits, URL-safe base64 (32 characters)
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")
MAX_ELAPSED_MS = 3_600_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    reader      INTEGER NOT NULL CHECK (reader >= 1),
    position    INTEGER NOT NULL CHECK (position >= 0),
    item        INTEGER NOT NULL CHECK (item >= 0),
    call        TEXT    NOT NULL CHECK (call IN ('real', 'synthetic')),
    confidence  INTEGER NOT NULL CHECK (confidence BETWEEN 1 AND 5),
    condition   TEXT    NOT NULL,
    elapsed_ms  INTEGER,
    answered_at TEXT    NOT NULL,
    PRIMARY KEY (reader, position),
    UNIQUE (reader, item)
);
"""


class StudyError(RadsynthError):
    """A study is missing, inconsistent, closed, or cannot be made as asked."""


def studies_root(params: Params) -> Path:
    """Folder that holds every study (``study.dir``, default ``<paths.artifacts>/studies``)."""
    return Path(params.study.dir or Path(params.paths.artifacts) / "studies")


def new_token() -> str:
    """A fresh reader token (URL-safe, 192 random bits)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """The stored form of a token: hex sha256 (a token has too much entropy to need a slow hash)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class Item:
    """One image of a study, as the answer key knows it."""

    item: int                                  # index into manifest["items"] (never shown to readers)
    kind: str                                  # real | synthetic
    condition: str                             # label of the real image / condition asked of the generator
    sha256: str                                # of images/NNNN.png
    dataset_index: int | None = None           # real: row of the prepared dataset (test split)
    seed: int | None = None                    # synthetic: z_from_seed(seed, n)[row]
    row: int | None = None


@dataclasses.dataclass(frozen=True)
class Answer:
    """One stored answer."""

    reader: int
    position: int
    item: int
    call: str
    confidence: int
    condition: str
    elapsed_ms: int | None
    answered_at: str


@dataclasses.dataclass(frozen=True)
class Study:
    """A loaded study folder."""

    root: Path
    manifest: dict
    token_hashes: tuple[str, ...]              # reader r's hash at index r - 1

    @property
    def id(self) -> str:
        return str(self.manifest["study"])

    @property
    def title(self) -> str:
        return str(self.manifest.get("title") or "")

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest["model"]["classes"])

    @property
    def model_name(self) -> str:
        return str(self.manifest["model"]["name"])

    @property
    def model_version(self) -> int:
        return int(self.manifest["model"]["version"])

    @property
    def img_resolution(self) -> int:
        return int(self.manifest["model"]["img_resolution"])

    @property
    def num_readers(self) -> int:
        return len(self.manifest["orders"])

    @property
    def num_images(self) -> int:
        return len(self.manifest["items"])

    @property
    def items(self) -> tuple[Item, ...]:
        return tuple(Item(**item) for item in self.manifest["items"])

    def order(self, reader: int) -> list[int]:
        """Item indices in the order reader ``reader`` (1-based) sees them."""
        return list(self.manifest["orders"][reader - 1])

    def image_path(self, item: int) -> Path:
        return self.root / "images" / f"{item:04d}.png"

    @property
    def closed(self) -> bool:
        return (self.root / "closed.json").is_file()

    def answers(self) -> "AnswerStore":
        return AnswerStore(self.root / "answers.sqlite")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"{path}: missing; is {path.parent} a study made by `radsynth study create`?") from None
    except ValueError as exc:
        raise StudyError(f"{path}: not valid JSON ({exc})") from None


def load_study(root: str | os.PathLike) -> Study:
    """Load one study folder.

    Raises:
        StudyError: files missing, an unknown format, or readers and orders that disagree.
    """
    root = Path(root)
    manifest = _read_json(root / "manifest.json")
    if manifest.get("format") != FORMAT_VERSION:
        raise StudyError(f"{root}: study format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
    readers = _read_json(root / "readers.json")
    hashes = tuple(str(r["token_sha256"]) for r in sorted(readers.get("readers", []), key=lambda r: r["reader"]))
    if len(hashes) != len(manifest["orders"]):
        raise StudyError(f"{root}: {len(hashes)} reader tokens but {len(manifest['orders'])} reader orders")
    return Study(root=root, manifest=manifest, token_hashes=hashes)


def list_studies(root: str | os.PathLike) -> list[Study]:
    """Every study under ``root``, oldest first (folders that are not studies are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.name.startswith(".") and (entry / "manifest.json").is_file():
            try:
                out.append(load_study(entry))
            except StudyError:
                continue
    return sorted(out, key=lambda s: (s.manifest.get("created", ""), s.id))


def find_study(root: str | os.PathLike, study_id: str | None = None) -> Study:
    """The study named ``study_id`` (default: the newest one).

    Raises:
        StudyError: no such study, or none at all.
    """
    studies = list_studies(root)
    if not studies:
        raise StudyError(f"no studies under {root}; make one with `radsynth study create`")
    if study_id is None:
        return studies[-1]
    for study in studies:
        if study.id == study_id:
            return study
    raise StudyError(f"no study {study_id!r} under {root}; known: {', '.join(s.id for s in studies)}")


def write_readers(root: Path, hashes: list[str]) -> None:
    """Write ``readers.json`` (atomically): reader number and token hash, nothing else."""
    from radsynth.io import write_json

    write_json(root / "readers.json", {"readers": [{"reader": i + 1, "token_sha256": h} for i, h in enumerate(hashes)]})


# --------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------


class AnswerStore:
    """The answers of one study in SQLite: every answer is one transaction (all or nothing),
    safe across the web app's processes and threads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 10000")
        return conn

    def create(self) -> None:
        conn = self._connect()
        try:
            conn.executescript(SCHEMA)
        finally:
            conn.close()

    def answered(self, reader: int) -> int:
        """How many items reader ``reader`` has answered (answers go in order, so also the next position)."""
        conn = self._connect()
        try:
            return int(conn.execute("SELECT COUNT(*) FROM answers WHERE reader = ?", (reader,)).fetchone()[0])
        finally:
            conn.close()

    def record(self, reader: int, position: int, item: int, call: str, confidence: int, condition: str,
               elapsed_ms: int | None) -> bool:
        """Store one answer if ``position`` is the reader's next one.

        Returns:
            True when stored; False when that position was already answered (a double submit,
            or a second tab), in which case nothing changes.
        """
        if call not in CALLS or not 1 <= confidence <= CONFIDENCE_LEVELS:
            raise StudyError(f"invalid answer: call={call!r}, confidence={confidence!r}")
        if elapsed_ms is not None and not 0 <= elapsed_ms <= MAX_ELAPSED_MS:
            elapsed_ms = None
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                done = int(conn.execute("SELECT COUNT(*) FROM answers WHERE reader = ?", (reader,)).fetchone()[0])
                if done != position:
                    conn.execute("ROLLBACK")
                    return False
                conn.execute(
                    "INSERT INTO answers (reader, position, item, call, confidence, condition, elapsed_ms, answered_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (reader, position, item, call, confidence, condition, elapsed_ms, now()),
                )
                conn.execute("COMMIT")
                return True
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()

    def all(self) -> list[Answer]:
        """Every answer, by reader then position."""
        if not self.path.is_file():
            return []
        conn = self._connect()
        try:
            rows = conn.execute(
                "SELECT reader, position, item, call, confidence, condition, elapsed_ms, answered_at"
                " FROM answers ORDER BY reader, position").fetchall()
        finally:
            conn.close()
        return [Answer(*row) for row in rows]


# --------------------------------------------------------------------------------------
# Token lookup for the web page
# --------------------------------------------------------------------------------------


class TokenIndex:
    """Finds the study and reader of a presented token.

    Every stored hash is compared with :func:`hmac.compare_digest` and the loop never stops
    early, so the time taken does not depend on which hash (if any) matched. Study folders
    are re-read when their files change, so a study made while the web app runs is found.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._cache: dict[Path, tuple[tuple[int, int], Study]] = {}

    def _studies(self) -> Iterator[Study]:
        if not self.root.is_dir():
            return
        seen = set()
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                stamp = ((entry / "manifest.json").stat().st_mtime_ns, (entry / "readers.json").stat().st_mtime_ns)
            except OSError:
                continue
            seen.add(entry)
            cached = self._cache.get(entry)
            if cached is None or cached[0] != stamp:
                try:
                    cached = (stamp, load_study(entry))
                except StudyError:
                    continue
                self._cache[entry] = cached
            yield cached[1]
        for gone in set(self._cache) - seen:
            self._cache.pop(gone, None)

    def lookup(self, token: str) -> tuple[Study, int] | None:
        """``(study, reader number)`` for a valid token, else ``None``."""
        if not isinstance(token, str) or not TOKEN_PATTERN.fullmatch(token):
            return None
        presented = hash_token(token)
        found = None
        for study in list(self._studies()):
            for index, stored in enumerate(study.token_hashes):
                if hmac.compare_digest(presented, stored) and found is None:
                    found = (study, index + 1)
        return found
