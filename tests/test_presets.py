import importlib.util
from pathlib import Path

import pytest

from mbc.config import MBCConfig
from mbc.errors import MBCError
from mbc.presets import PRESETS, preset
from mbc.settings import from_dict
from mbc.training.trainer import TrainConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_model_and_training_config(name):
    chosen = preset(name)
    MBCConfig.from_dict(chosen["model"])  # raises on an unknown field or a contradiction between settings
    from_dict(TrainConfig, dict(chosen["train"], output_dir="unused"), "training config")


def test_the_text_preset_copies_vocabulary_codes_into_128_bytes():
    config = MBCConfig.from_dict(preset("cpu-text")["model"])
    assert (config.codebook, config.code_reading, config.pointer_copy) == ("vocabulary", "input", True)
    assert config.code_entry_bytes + config.retrieval_subspaces == 128  # codes + a key of one byte a piece


def test_an_unknown_preset_is_named_with_the_known_ones():
    with pytest.raises(MBCError, match="unknown preset 'cpu-txt'; choose one of .*cpu-text"):
        preset("cpu-txt")


def test_every_frontier_point_is_a_valid_model_of_its_preset():
    spec = importlib.util.spec_from_file_location(
        "frontier", Path(__file__).resolve().parents[1] / "bench" / "frontier.py"
    )
    frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frontier)
    for name in [*frontier.POINTS, *frontier.COPIED]:
        config = MBCConfig.from_dict(preset(frontier.point_preset(name))["model"] | frontier.point_settings(name))
        if name in frontier.COPIED:
            slots, entry_bytes, key_bytes = frontier.COPIED[name]
            stored = (config.codebook, config.num_slots, config.code_entry_bytes, config.retrieval_subspaces)
            assert stored == ("vocabulary", slots, entry_bytes, key_bytes)
