import pytest

from emu.utils.schedules import warmup_constant, warmup_cosine


def test_warmup_cosine_and_constant():
    assert warmup_cosine(0, warmup=10, total=110) == pytest.approx(0.1)
    assert warmup_cosine(9, warmup=10, total=110) == pytest.approx(1.0)
    assert warmup_cosine(60, warmup=10, total=110) == pytest.approx(0.5)
    assert warmup_cosine(500, warmup=10, total=110) == pytest.approx(0.0)
    assert warmup_constant(4, warmup=10) == pytest.approx(0.5) and warmup_constant(1000, warmup=10) == 1.0
