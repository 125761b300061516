import sys

import pytest

from mbc.presets import preset
from mbc.training.allocator import keep_large_allocations_on_mmap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_glibc_accepts_the_mmap_threshold():
    assert keep_large_allocations_on_mmap() is True


def test_reference_presets_trade_speed_for_memory_and_the_cpu_preset_does_not():
    assert preset("distilgpt2")["train"]["return_freed_memory"] is True
    assert not preset("cpu")["train"].get("return_freed_memory", False)
