"""The top-level names are exactly the README's "Public API" list: the user's verbs and types."""

import re
from pathlib import Path

import factorize_plugin

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_names() -> set[str]:
    text = README.read_text()
    section = text.split("## Public API", 1)[1].split("\n#", 1)[0]
    bullets = [line for line in section.splitlines() if line.startswith("- ")]
    return {name for line in bullets for name in re.findall(r"`([A-Za-z_]\w*)`", line.split(" (", 1)[0])}


def test_all_is_exactly_the_readme_list():
    names = _readme_names()
    assert len(names) > 10
    assert set(factorize_plugin.__all__) == names and len(factorize_plugin.__all__) == len(names)


def test_dir_lists_the_public_names_lazy_ones_included():
    assert {n for n in dir(factorize_plugin) if not n.startswith("_")} == _readme_names()
    assert {"LowRankFactorization", "FactorizeCLI"} <= set(dir(factorize_plugin))


def test_every_public_name_resolves_and_machinery_stays_in_its_floor():
    for name in factorize_plugin.__all__:
        assert getattr(factorize_plugin, name) is not None
    for internal in ("refactorize", "ActivationCollector", "select_layers", "prepare"):
        assert internal not in factorize_plugin.__all__
    from factorize_plugin.surgery.pipeline import prepare  # noqa: F401
    from factorize_plugin.surgery.select.targets import select_layers  # noqa: F401
    from factorize_plugin.surgery.statistics.collector import ActivationCollector  # noqa: F401
    from factorize_plugin.surgery.swap.refactorize import refactorize  # noqa: F401


def test_lazy_names_are_typed_for_checkers():
    source = Path(factorize_plugin.__file__).read_text()
    block = source.split("if TYPE_CHECKING:", 1)[1].split("\n\n", 1)[0]
    assert "LowRankFactorization" in block and "FactorizeCLI" in block
