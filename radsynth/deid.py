"""De-identification: the site salt, one-way pseudonyms (:class:`Pseudonyms`), and the records that
cross from ingest's decoding processes to its assembly (pseudonyms and pixels only, never a raw
identifier).

Every identifier (patient ID, accession number, file path) becomes
``HMAC-SHA256(salt, kind NUL value)[:20]``. The salt is what keeps that one-way: with a short
or guessable salt every MRN can be tried in minutes. So the salt is checked wherever it comes
from (``$<data.salt_env>`` or ``data.salt_file``): at least :data:`MIN_SALT_CHARS` characters,
not a placeholder (``change-me`` and the like), not a handful of repeated characters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

import numpy as np

from radsynth.config import DataConfig
from radsynth.errors import RadsynthError

PSEUDONYM_HEX = 20
MIN_SALT_CHARS = 16
MIN_SALT_DISTINCT = 8                          # distinct characters: "aaaaaaaaaaaaaaaa" is no salt
# Normalised (lower case, letters and digits only) words that mark a placeholder, not a secret.
PLACEHOLDER_WORDS = ("changeme", "replaceme", "placeholder", "yoursalt", "example", "secretsalt", "insertsalt",
                     "password", "default")


class SaltError(RadsynthError, ValueError):
    """The pseudonym salt is missing, too short, or a placeholder."""


def check_salt(text: str, where: str) -> bytes:
    """The salt as bytes, if it is fit to key pseudonyms.

    Args:
        text: the salt as found.
        where: where it came from, for the message (``$RADSYNTH_SALT``, a file name).

    Raises:
        SaltError: shorter than :data:`MIN_SALT_CHARS`, a placeholder, or too few distinct
            characters. The message never quotes the salt.
    """
    salt = text.strip()
    fix = "generate one with `openssl rand -hex 32` and keep it (a new salt gives every patient a new pseudonym)"
    if len(salt) < MIN_SALT_CHARS:
        raise SaltError(f"{where}: the salt has {len(salt)} characters; at least {MIN_SALT_CHARS} are needed; {fix}")
    normalised = re.sub(r"[^a-z0-9]", "", salt.lower())
    if any(word in normalised for word in PLACEHOLDER_WORDS):
        raise SaltError(f"{where}: the salt is a placeholder, not a secret; {fix}")
    if len(set(salt)) < MIN_SALT_DISTINCT:
        raise SaltError(f"{where}: the salt uses fewer than {MIN_SALT_DISTINCT} distinct characters; {fix}")
    return salt.encode()


def load_salt(cfg: DataConfig, root: str | os.PathLike = ".") -> bytes:
    """The pseudonym salt: ``$<cfg.salt_env>`` when set, else ``cfg.salt_file`` (created once, 0600).

    Both are checked by :func:`check_salt`. A variable that is set but empty is an error (a
    Secret mounted without its key), not a reason to fall back to a new file: that would give
    every patient a new pseudonym without a word. The salt never appears in any output; keep the
    file out of git (it is ignored) and out of images (``.dockerignore``).

    Raises:
        SaltError: the salt is unfit (see :func:`check_salt`) or the variable is set but empty.
    """
    if cfg.salt_env and cfg.salt_env in os.environ:
        value = os.environ[cfg.salt_env]
        if not value.strip():
            raise SaltError(f"${cfg.salt_env} is set but empty; set it to the site salt or unset it to use {cfg.salt_file}")
        return check_salt(value, f"${cfg.salt_env}")
    path = Path(root) / cfg.salt_file
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    return check_salt(path.read_text(), str(cfg.salt_file))


def pseudonym(salt: bytes, kind: str, value: str) -> str:
    """One-way salted pseudonym of an identifier: ``HMAC-SHA256(salt, kind NUL value)[:20]``."""
    return hmac.new(salt, f"{kind}\x00{value.strip()}".encode(), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


@dataclasses.dataclass(frozen=True)
class Pseudonyms:
    """The site's pseudonyms for each kind of identifier, keyed by the salt it holds (and never shows).

    Ingest passes this object, not the salt: its decoding processes and the labels reader ask
    it for a study, patient or file pseudonym (:func:`pseudonym` with the kind fixed).
    """

    salt: bytes = dataclasses.field(repr=False)

    @classmethod
    def load(cls, cfg: DataConfig, root: str | os.PathLike = ".") -> "Pseudonyms":
        """The site's pseudonyms, with the salt of :func:`load_salt`.

        Raises:
            SaltError: the salt is unfit or the variable is set but empty.
        """
        return cls(load_salt(cfg, root))

    def study(self, accession: str) -> str:
        """A study (its AccessionNumber)."""
        return pseudonym(self.salt, "study", accession)

    def patient(self, patient_id: str) -> str:
        """A patient (its PatientID, or the key a folder export's file name gives)."""
        return pseudonym(self.salt, "patient", patient_id)

    def file(self, relative_path: str) -> str:
        """A file (its path relative to the export's root)."""
        return pseudonym(self.salt, "file", relative_path)


# --------------------------------------------------------------------------------------
# Records: what a decoding process hands back (pseudonyms, pixels, reason codes; nothing raw)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One quarantine entry: which record (a pseudonym), of what kind, why, and a detail
    written by radsynth (never header text)."""

    record: str                                # pseudonym (study, file) or "line-N" of the labels file
    kind: str                                  # study | file | label_row
    reason: str                                # a key of components.ingest.REASONS
    detail: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A record that decoded into a training image."""

    record: str                                # study pseudonym (DICOM) or file pseudonym (folders)
    kind: str                                  # study | file
    patient: str                               # patient pseudonym
    image: np.ndarray                          # uint8 [C, R, R] (radsynth.imaging.prepare)
    digest: str                                # sha256 of the decoded full-resolution pixels (duplicates)
    study_hint: str | None                     # the study this file answers for (label rows without study)
    folder_label: str = ""                     # source=folders: the class folder


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A record quarantined by its decoding process."""

    entry: Entry
    study_hint: str | None


Record = Decoded | Rejected
