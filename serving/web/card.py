"""The served version's model card for the page: Markdown from the registry, rendered to safe HTML.

``radsynth register`` sets the card as the model version's description and logs its sample
grid under the registration run's ``model_card/`` artefacts; :class:`RegistryCards` reads both
for exactly the version Triton serves (cached per version for ``web.model_info_ttl_s``).
:func:`to_html` renders CommonMark + tables with raw HTML disabled (the card is data, and the
page's Content-Security-Policy allows no inline script anyway).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time

from radsynth.config import Params

GRID_ARTEFACT = "model_card/model_card_grid.png"


@dataclasses.dataclass(frozen=True)
class Card:
    """One version's card (``markdown`` empty when the version has none; ``note`` says why)."""

    name: str
    version: str
    markdown: str
    grid_png: bytes | None
    note: str | None


class RegistryCards:
    """Model cards from the MLflow registry of ``paths.mlflow_uri``."""

    def __init__(self, params: Params):
        self.params = params
        self._cache: dict[tuple[str, str], tuple[float, Card]] = {}
        self._lock = threading.Lock()

    def get(self, name: str, version: str) -> Card:
        key = (name, str(version))
        with self._lock:
            hit = self._cache.get(key)
            if hit and time.monotonic() - hit[0] < self.params.web.model_info_ttl_s:
                return hit[1]
        card = self._fetch(name, str(version))
        with self._lock:
            self._cache[key] = (time.monotonic(), card)
        return card

    def _fetch(self, name: str, version: str) -> Card:
        import tempfile

        try:
            from radsynth.registry import reader

            client = reader(self.params)
            mv = client.get_model_version(name, version)
        except Exception as exc:  # MLflow raises many types (no such version, unreachable server)
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return Card(name, version, "", None, f"the registry could not be read ({reason})")
        if not mv.description:
            return Card(name, version, "", None, f"{name} v{version} was registered without a model card")
        grid = None
        run_id = (mv.tags or {}).get("run_id") or mv.run_id
        if run_id:
            try:
                with tempfile.TemporaryDirectory(prefix="radsynth-card-") as tmp:
                    with open(client.download_artifacts(run_id, GRID_ARTEFACT, tmp), "rb") as fh:
                        grid = fh.read()
            except Exception:  # the grid is optional: the card text stands alone
                grid = None
        return Card(name, version, mv.description, grid, None)


def to_html(markdown: str, grid_url: str | None) -> str:
    """Card Markdown -> HTML (no raw HTML passes through); the grid's relative link -> ``grid_url``."""
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    if grid_url:
        html = re.sub(r'src="model_card_grid\.png"', f'src="{grid_url}" class="card-grid"', html)
    else:
        html = re.sub(r'<img src="model_card_grid\.png"[^>]*>', "", html)
    return html
