import doctest

import pytest
import torch

import structurednets
from structurednets_hmat import HMatLayer, cost, fit, layer, layout, partition


@pytest.mark.parametrize("module", [cost, fit, layer, layout, partition], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    # The globals the kit gives a layer's Example: torch, structurednets and the class.
    names = {"torch": torch, "structurednets": structurednets, "HMatLayer": HMatLayer}
    result = doctest.testmod(module, extraglobs=names, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
