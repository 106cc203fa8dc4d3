from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def float64_by_default() -> Iterator[None]:
    """References are float64; restored after each test so that other modules keep float32.
    Use with `pytestmark = pytest.mark.usefixtures("float64_by_default")`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
