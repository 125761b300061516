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
