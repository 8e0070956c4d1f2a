"""Bad input refused at once with one clear message (library side): regexes, empty layers, failed writes."""
import errno
import os

import pytest
import torch
from torch import nn

from oialr import OIALR, OIALRConfig, files
from full_disk import fill_disk


def test_a_bad_target_regex_is_a_config_error_naming_the_field():
    with pytest.raises(ValueError) as err:
        OIALRConfig(target_modules="blocks.(", exclude_modules="[x")
    assert err.value.problems == [
        "target_modules is not a valid regular expression (missing ), unterminated subpattern at position 7): "
        "'blocks.('",
        "exclude_modules is not a valid regular expression (unterminated character set at position 0): '[x'"]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_zero_size_layer_stays_dense_instead_of_crashing_the_controller():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 0), nn.Linear(0, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    ctl = OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), OIALRConfig(warmup_steps=0, cutoff=0.0))
    reasons = {info.name: info.reason for info in ctl.layer_infos}
    assert reasons["1"] == reasons["2"] == "empty weight (a dimension of size 0)"
    assert ctl.targets == ["0", "3"]


def test_a_failed_write_names_the_file_and_keeps_the_previous_version(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    files.save_torch(path, {"w": torch.ones(3)})
    fill_disk(monkeypatch)
    with pytest.raises(files.WriteError) as err:
        files.save_torch(path, {"w": torch.zeros(1000)})      # torch.save wraps the OSError in a RuntimeError
    assert str(err.value) == f"cannot write {path}: No space left on device; its previous version is unchanged"
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
