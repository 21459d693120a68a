import uuid

import pytest

from tests.helpers import build_titan_model


@pytest.fixture
def titan_model():
    return build_titan_model


@pytest.fixture
def unique_channel():
    return f"t{uuid.uuid4().hex[:12]}"
