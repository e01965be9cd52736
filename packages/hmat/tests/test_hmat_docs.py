import doctest

import pytest

from structurednets_hmat import approximation, layer, partition


@pytest.mark.parametrize("module", [approximation, layer, partition], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
