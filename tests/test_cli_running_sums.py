"""The CLI's training sums since the last metrics row: what a batch adds, and each process's share on resume."""
import pytest
import torch

from oialr.cli.running_sums import RunningSums

CPU = torch.device("cpu")


def test_a_batch_adds_its_summed_loss_correct_and_seen_predictions():
    sums = RunningSums(CPU)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])           # predicts 0, 1, 0
    sums.add(torch.tensor(0.5), logits, torch.tensor([0, 0, 0]))
    text_logits = torch.zeros(2, 3, 4)
    text_logits[..., 2] = 1.0                                             # predicts byte 2 everywhere
    sums.add(torch.tensor(0.25), text_logits, torch.tensor([[2, 2, 1], [2, 0, 0]]))
    assert sums.plain() == pytest.approx({"loss": 0.5 * 3 + 0.25 * 6, "correct": 2 + 3, "seen": 9})
    assert sums.totals() == pytest.approx((3.0, 5, 9))                   # one process: its own sums
    assert sums.gathered() == {"loss": [3.0], "correct": [5], "seen": [9]}
    assert [type(v[0]) for v in sums.gathered().values()] == [float, int, int]


SAVED = {"loss": [1.5, 2.5], "correct": [3, 4], "seen": [10, 12]}        # two processes' sums


@pytest.mark.parametrize("rank, world_size, expected", [
    (0, 2, (1.5, 3, 10)), (1, 2, (2.5, 4, 12)),          # the same processes: each its own share
    (0, 3, (4.0, 7, 22)), (2, 3, (0.0, 0, 0)),           # another number: the totals on process 0
    (0, 1, (4.0, 7, 22)),
])
def test_restored_sums_give_each_process_its_share(rank, world_size, expected):
    sums = RunningSums.restored(SAVED, CPU, rank, world_size)
    assert (sums.plain()["loss"], sums.plain()["correct"], sums.plain()["seen"]) == pytest.approx(expected)


def test_restored_sums_read_an_older_scalar_checkpoint_on_process_0_only():
    old = {"loss": 1.5, "correct": 3, "seen": 10}
    assert RunningSums.restored(old, CPU, 0, 2).plain() == old
    assert RunningSums.restored(old, CPU, 1, 2).plain() == {"loss": 0.0, "correct": 0, "seen": 0}
    assert RunningSums.restored({}, CPU, 0, 1).plain() == {"loss": 0.0, "correct": 0, "seen": 0}
