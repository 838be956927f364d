"""MkDocs hooks of the documentation site (``hooks:`` in mkdocs.yml).

- Every public name of ``lightning_sd.__all__``, and every public method or property a public class of the
  package defines itself (an override of a documented base-class hook inherits its docstring), must have a
  docstring: a missing one is a warning, which ``mkdocs build --strict`` turns into a failed build
  (``tests/test_docs.py`` runs it).
- Docstrings use Sphinx cross-reference roles (``:func:`survival_rates```), as Lightning's do; mkdocstrings
  renders them literally, so the role prefix is removed from the rendered HTML.
"""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any

log = logging.getLogger("mkdocs.hooks.lightning_sd")  # under "mkdocs": counted by --strict

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):(?=<code>)")


def missing_docstrings() -> list[str]:
    """Qualified names of public objects of ``lightning_sd.__all__`` (and their own public members) without a docstring."""
    import lightning_sd

    missing = []
    for name in lightning_sd.__all__:
        obj = getattr(lightning_sd, name)
        if not (obj.__doc__ or "").strip():
            missing.append(name)
        if not inspect.isclass(obj):
            continue
        for member, value in vars(obj).items():
            if member.startswith("_"):
                continue
            if not (callable(value) or isinstance(value, (property, classmethod, staticmethod))):
                continue
            # inspect.getdoc follows inheritance: an override of a documented Lightning/torch hook counts as documented
            if not inspect.getdoc(getattr(obj, member)):
                missing.append(f"{name}.{member}")
    return missing


def on_pre_build(config: Any, **kwargs: Any) -> None:
    for name in missing_docstrings():
        log.warning("public name without a docstring: lightning_sd.%s (document it: the API reference is built from it)", name)


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub("", html)
