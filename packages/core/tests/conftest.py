import pytest
from diagonal_structure import DiagonalLayer, diagonal_nb_weight_parameters

import structurednets


@pytest.fixture
def diagonal_structure():
    """Register the test-only 'diagonal' structure for one test, then remove it."""
    structure = structurednets.register(
        "diagonal", DiagonalLayer, diagonal_nb_weight_parameters, aliases=("diag",)
    )
    yield structure
    structurednets.unregister("diagonal")
