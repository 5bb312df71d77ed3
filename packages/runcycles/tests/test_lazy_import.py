"""``import runcycles`` is lazy: the HTTP stack loads only when a name that needs it is used."""

from __future__ import annotations

import subprocess
import sys

import pytest

import runcycles


def _modules_after(code: str) -> set[str]:
    """Run ``code`` in a fresh interpreter; return the top-level modules it ended up importing."""
    listing = "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))"
    script = f"{code}\nimport sys\n{listing}"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


def test_every_public_name_has_a_lazy_source_and_resolves() -> None:
    assert set(runcycles._LAZY) == set(runcycles.__all__)
    for name in runcycles.__all__:
        module = __import__(runcycles._LAZY[name], fromlist=[name])
        assert getattr(runcycles, name) is getattr(module, name), name


def test_import_runcycles_alone_loads_neither_httpx_nor_pydantic() -> None:
    loaded = _modules_after("import runcycles")
    assert "runcycles" in loaded
    assert not {"httpx", "pydantic"} & loaded


def test_models_import_does_not_load_the_http_client() -> None:
    loaded = _modules_after("from runcycles.models import Subject, ErrorResponse")
    assert "pydantic" in loaded
    assert "httpx" not in loaded


def test_from_import_of_the_client_loads_it() -> None:
    loaded = _modules_after("from runcycles import CyclesClient")
    assert "httpx" in loaded


def test_unknown_attribute_raises_attribute_error_naming_it() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        # mypy sees no module __getattr__: the ignore is needed, and unused-ignore would
        # fail type-checking if a misspelt name ever type-checked again.
        runcycles.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018


def test_dir_lists_the_public_names() -> None:
    assert set(runcycles.__all__) <= set(dir(runcycles))


def test_pricing_imports_without_the_price_table() -> None:
    loaded = _modules_after("import runcycles.pricing\nfrom runcycles import Pricer, Usage")
    assert "runcycles" in loaded
    assert not {"genai_prices", "httpx"} & loaded


def test_a_custom_table_never_loads_the_price_table() -> None:
    code = (
        "from runcycles import ModelPrice, Pricer, Usage\n"
        "pricer = Pricer(table={'m': ModelPrice('1', '2')})\n"
        "assert pricer.price(Usage(input_tokens=10, model='m')) == 1000"
    )
    assert "genai_prices" not in _modules_after(code)


def test_the_price_table_loads_when_first_needed() -> None:
    code = "from runcycles import Pricer, Usage\nPricer().price(Usage(model='gpt-4o'))"
    assert "genai_prices" in _modules_after(code)
