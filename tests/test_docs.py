"""The documentation site: API entries, docstrings, runnable code blocks, and a strict MkDocs build.

Every ```python block of the docs pages (and of README.md) runs here: the blocks of one page run in order in
one namespace, as a reader would run them, in a temporary working directory. Shell and YAML blocks are not run
(the CLI and the recipes have their own tests).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_sd

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_an_api_entry():
    entries = re.findall(r"^::: ([\w.]+)$", (DOCS / "api.md").read_text(), re.M)
    expected = {f"{getattr(lightning_sd, name).__module__}.{name}" for name in lightning_sd.__all__}
    assert len(lightning_sd.__all__) >= 38
    assert expected <= set(entries), sorted(expected - set(entries))
    assert len(entries) == len(set(entries))  # each once
    for entry in entries:  # and each entry names a real object (mkdocstrings would fail on it otherwise)
        module, _, name = entry.rpartition(".")
        assert hasattr(importlib.import_module(module), name), entry


def test_every_public_name_has_a_docstring():
    assert _hooks().missing_docstrings() == []


def test_missing_docstring_is_reported(monkeypatch):
    from lightning_sd.core import survival

    monkeypatch.setattr(survival.linear_min_budget, "__doc__", None)
    assert _hooks().missing_docstrings() == ["linear_min_budget"]


def test_sphinx_roles_are_stripped_from_rendered_docstrings():
    html = "see :func:<code>survival_rates</code> and :class:<code>StochasticDepth</code>, ratio 1:2"
    assert _hooks().on_page_content(html) == "see <code>survival_rates</code> and <code>StochasticDepth</code>, ratio 1:2"


def _blocks(page: Path) -> list[str]:
    return PYTHON_BLOCK.findall(page.read_text())


def test_pages_have_python_blocks():
    # the extraction must see the blocks (a changed fence style would silently run nothing)
    counts = {page.name: len(_blocks(page)) for page in PAGES}
    assert counts["getting-started.md"] >= 2 and counts["README.md"] >= 1 and sum(counts.values()) >= 18, counts


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(_blocks(page)):
        code = compile(block, f"{page.name}[python block {i + 1}]", "exec")
        exec(code, namespace)



def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in lightning_sd.__all__:
        assert f'id="{getattr(lightning_sd, name).__module__}.{name}"' in api, name
