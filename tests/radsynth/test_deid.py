"""radsynth.deid.Pseudonyms: the kinds ingest asks for, keyed by a salt it never shows."""

from __future__ import annotations

from radsynth.deid import Pseudonyms, pseudonym

SALT = b"deid-test-salt-3c9e71f0a2"


def test_each_kind_is_the_salted_pseudonym_of_that_kind():
    ids = Pseudonyms(SALT)
    assert ids.study("A12716217") == pseudonym(SALT, "study", "A12716217")
    assert ids.patient("GZ0000124") == pseudonym(SALT, "patient", "GZ0000124")
    assert ids.file("GZ0000124/A12716217.dcm") == pseudonym(SALT, "file", "GZ0000124/A12716217.dcm")
    assert len({ids.study("X1"), ids.patient("X1"), ids.file("X1")}) == 3       # the kind is part of the key
    assert Pseudonyms(b"another-salt-8d2b6a4e19").study("A12716217") != ids.study("A12716217")


def test_the_salt_is_not_in_the_repr():
    assert SALT.decode() not in repr(Pseudonyms(SALT)) and "salt" not in repr(Pseudonyms(SALT))
