import importlib.metadata
import subprocess
import sys
import types

import pytest
from diagonal_structure import DiagonalLayer, diagonal_nb_weight_parameters

import structurednets
from structurednets import registry


def test_structure_defined_in_a_test_is_usable_through_create(diagonal_structure):
    assert "diagonal" in structurednets.available()
    layer = structurednets.create("diag", 8, 6, 0.5, use_bias=False)
    assert isinstance(layer, DiagonalLayer)
    assert structurednets.nb_parameters("diagonal", 8, 6, 0.5) == 6 + 6
    assert structurednets.get_structure("diag") is diagonal_structure
    assert str(diagonal_structure) == "diagonal (alias: diag)"
    assert diagonal_structure.summary.startswith("W[i, i] = d[i]")


def test_unknown_name_lists_installed_and_the_install_command(diagonal_structure):
    with pytest.raises(structurednets.UnknownStructureError) as info:
        structurednets.create("hmatt", 8, 8, 0.5)
    message = str(info.value)
    assert "unknown structure 'hmatt'" in message
    assert "diagonal (alias: diag)" in message
    assert "pip install structurednets-hmatt" in message
    assert isinstance(info.value, ValueError)


def test_names_and_classes_are_checked(diagonal_structure):
    with pytest.raises(ValueError, match="already registered"):
        structurednets.register("diagonal", DiagonalLayer, diagonal_nb_weight_parameters)
    with pytest.raises(ValueError, match="already registered"):
        structurednets.register(
            "other", DiagonalLayer, diagonal_nb_weight_parameters, aliases=("diag",)
        )
    with pytest.raises(ValueError, match="lower-case identifiers"):
        structurednets.register("Bad Name", DiagonalLayer, diagonal_nb_weight_parameters)
    with pytest.raises(TypeError, match="subclass of structurednets.StructuredLayer"):
        structurednets.register("linear", object, diagonal_nb_weight_parameters)
    with pytest.raises(TypeError, match="must be a string"):
        structurednets.get_structure(3)
    replaced = structurednets.register(
        "diagonal", DiagonalLayer, diagonal_nb_weight_parameters, replace=True
    )
    assert structurednets.get_structure("diagonal") is replaced
    with pytest.raises(structurednets.UnknownStructureError):
        structurednets.get_structure("diag")  # the replacement has no alias


def test_nb_parameters_checks_its_arguments(diagonal_structure):
    with pytest.raises(ValueError, match="input_dim must be a positive integer, got 0"):
        structurednets.nb_parameters("diagonal", 0, 4, 0.5)
    with pytest.raises(ValueError, match="nb_params_share"):
        structurednets.nb_parameters("diagonal", 4, 4, 2.0)
    with pytest.raises(structurednets.BudgetTooSmallError, match="use nb_params_share >= 0.0625"):
        structurednets.nb_parameters("diagonal", 16, 16, 0.01)


@pytest.mark.slow  # a new Python process
def test_importing_core_loads_no_plugin():
    code = (
        "import sys, structurednets; "
        "print(any(name.startswith('structurednets_') for name in sys.modules))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert output.stdout.strip() == "False"


@pytest.fixture
def fresh_registry(monkeypatch):
    """An empty registry whose entry points are the fakes a test installs."""
    monkeypatch.setattr(registry, "_structures", {})
    monkeypatch.setattr(registry, "_aliases", {})
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "_plugin_manager", None)
    installed = []
    calls = []

    def entry_points(group):
        calls.append(group)
        return [ep for ep in installed if ep.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return installed, calls


def fake_entry_point(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return importlib.metadata.EntryPoint(name, module.__name__, "structurednets")


def test_entry_points_load_lazily_once_and_register(fresh_registry, monkeypatch):
    installed, calls = fresh_registry
    plugin = types.ModuleType("fake_diagonal_plugin")

    @structurednets.hookimpl
    def structurednets_register_structures(register):
        register("diagonal", DiagonalLayer, diagonal_nb_weight_parameters)

    plugin.structurednets_register_structures = structurednets_register_structures
    installed.append(fake_entry_point(monkeypatch, "diagonal", plugin))
    assert calls == []
    assert structurednets.available() == ["diagonal"]
    assert structurednets.available() == ["diagonal"]
    structurednets.create("diagonal", 4, 4, 0.5)
    assert calls == ["structurednets"]


def test_broken_plugin_is_skipped_with_a_warning(fresh_registry, monkeypatch):
    installed, _ = fresh_registry
    good = types.ModuleType("fake_good_plugin")

    @structurednets.hookimpl
    def structurednets_register_structures(register):
        register("diagonal", DiagonalLayer, diagonal_nb_weight_parameters)

    good.structurednets_register_structures = structurednets_register_structures
    installed.append(
        importlib.metadata.EntryPoint("missing", "no_such_module_xyz", "structurednets")
    )
    installed.append(fake_entry_point(monkeypatch, "diagonal", good))
    with pytest.warns(UserWarning, match="plugin 'missing' .* failed to load"):
        assert structurednets.available() == ["diagonal"]
