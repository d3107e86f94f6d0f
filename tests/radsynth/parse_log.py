"""Count how often pydicom parses each element and file meta of a file (for the parse-once tests).

The real reader runs: ``pydicom.filereader.data_element_generator`` (every element pydicom parses,
at any depth, goes through it) and ``_read_file_meta_info`` are wrapped to log what they did and
then return exactly what the originals return. Nothing about reading is mocked.
"""

from __future__ import annotations

import collections
import dataclasses

PIXEL_DATA = 0x7FE00010


@dataclasses.dataclass
class ParseLog:
    events: list = dataclasses.field(default_factory=list)  # ("meta",) | ("element", tag, offset) | (name,)

    def clear(self) -> None:
        self.events.clear()

    def mark(self, name: str) -> None:
        self.events.append((name,))

    @property
    def meta_reads(self) -> int:
        return sum(1 for e in self.events if e[0] == "meta")

    @property
    def elements(self) -> collections.Counter:
        """(tag, offset in its file) -> times parsed."""
        return collections.Counter(e[1:] for e in self.events if e[0] == "element")

    @property
    def reparsed(self) -> list:
        return [key for key, n in self.elements.items() if n > 1]

    def pixel_reads(self) -> list[int]:
        """Positions in :attr:`events` where the Pixel Data element was parsed."""
        return [i for i, e in enumerate(self.events) if e[0] == "element" and e[1] == PIXEL_DATA]

    def first(self, name: str) -> int:
        return next(i for i, e in enumerate(self.events) if e == (name,))


def install(monkeypatch) -> ParseLog:
    """Wrap pydicom's element generator and file-meta reader for the rest of the test."""
    import pydicom.filereader as fr

    log = ParseLog()
    real_generator, real_meta = fr.data_element_generator, fr._read_file_meta_info

    def data_element_generator(fp, *args, **kwargs):
        for element in real_generator(fp, *args, **kwargs):
            offset = getattr(element, "value_tell", None)
            if offset is None:  # a sequence parsed on the spot: a DataElement
                offset = getattr(element, "file_tell", None)  # DataElement(file_value_tell=...)
            log.events.append(("element", int(element.tag), offset))
            yield element

    def read_file_meta_info(fp):
        log.events.append(("meta",))
        return real_meta(fp)

    monkeypatch.setattr(fr, "data_element_generator", data_element_generator)
    monkeypatch.setattr(fr, "_read_file_meta_info", read_file_meta_info)
    return log
