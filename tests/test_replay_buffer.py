"""The replay buffer: the vectorised reservoir equals Algorithm R run sample by sample with the same draws (collisions
within a batch included), its inclusion probabilities are capacity/seen (chi-square), the class-balanced buffer
keeps an equal reservoir per class, draws are uniform and chunked per DDP rank, and state_dict resumes exactly."""

from __future__ import annotations

import pytest
import torch

from src.continual.validate import ConfigError
from src.methods.replay_buffer import ReplayBuffer

# chi-square 0.999 quantiles (scipy.stats.chi2.ppf(0.999, df)): a correct buffer fails one of these tests 1 in 1000
# seeds; the seeds are fixed, so the tests are deterministic
CHI2_999 = {39: 72.0546629519878, 19: 43.82019596451753, 9: 27.877164871256568}


def stream(ids: torch.Tensor, labels=None, task_ids=None):
    """Samples whose image is their id (so contents can be checked), in the buffer's argument order."""
    images = ids.view(-1, 1, 1, 1).to(torch.uint8)
    labels = torch.zeros_like(ids) if labels is None else labels
    task_ids = torch.zeros_like(ids) if task_ids is None else task_ids
    return images, labels, task_ids


def reference_reservoir(batches, capacity, seed):
    """Algorithm R, one sample at a time, consuming the generator as the buffer does (one draw per sample, drawn
    per batch)."""
    generator = torch.Generator().manual_seed(seed)
    slots, seen = [None] * capacity, 0
    for batch in batches:
        draws = torch.randint(0, 2**62, (len(batch),), generator=generator)
        for item, draw in zip(batch.tolist(), draws.tolist(), strict=True):
            if seen < capacity:
                slots[seen] = item
            else:
                j = draw % (seen + 1)
                if j < capacity:
                    slots[j] = item
            seen += 1
    return [s for s in slots if s is not None]


@pytest.mark.parametrize(("capacity", "batch"), [(5, 20), (7, 3), (50, 16)])
def test_vectorised_reservoir_is_algorithm_r_with_the_same_draws(capacity, batch):
    ids = torch.arange(200)
    batches = list(ids.split(batch))
    buffer = ReplayBuffer(capacity, seed=3)
    for b in batches:
        buffer.add(*stream(b % 256))
    expected = reference_reservoir([b % 256 for b in batches], capacity, seed=3)
    assert buffer.contents()["images"].view(-1).tolist() == expected
    assert buffer.seen == 200 and len(buffer) == capacity


def test_reservoir_keeps_every_sample_with_probability_capacity_over_seen():
    n_items, capacity, trials = 40, 8, 1500
    counts = torch.zeros(n_items)
    for trial in range(trials):
        buffer = ReplayBuffer(capacity, seed=trial)
        for b in torch.arange(n_items).split(7):  # batches of 7: slots are drawn twice within a batch
            buffer.add(*stream(b))
        counts[buffer.contents()["images"].view(-1).long()] += 1
    expected = trials * capacity / n_items
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[n_items - 1], (chi2, counts)
    assert counts.sum() == trials * capacity


def test_first_write_wins_would_fail_the_statistical_test():
    """The test above can fail: keeping the FIRST write of a slot drawn twice in a batch biases towards early items."""
    from src.methods import replay_buffer

    def first_write_wins(slots, order):
        keep = slots >= 0
        slots, order = slots[keep].flip(0), order[keep].flip(0)  # reversed: the last write is now the first one
        by_slot = torch.argsort(slots * (len(keep) + 1) + (len(keep) - order))
        slots, order = slots[by_slot], order[by_slot]
        last = torch.ones_like(slots, dtype=torch.bool)
        last[:-1] = slots[1:] != slots[:-1]
        return slots[last], order[last]

    n_items, capacity, trials = 40, 4, 1500
    counts = torch.zeros(n_items)
    original = replay_buffer.last_write_wins
    replay_buffer.last_write_wins = first_write_wins
    try:
        for trial in range(trials):
            buffer = ReplayBuffer(capacity, seed=trial)
            for b in torch.arange(n_items).split(20):
                buffer.add(*stream(b))
            counts[buffer.contents()["images"].view(-1).long()] += 1
    finally:
        replay_buffer.last_write_wins = original
    expected = trials * capacity / n_items
    assert float(((counts - expected) ** 2 / expected).sum()) > CHI2_999[n_items - 1]


def test_class_balanced_keeps_an_equal_reservoir_per_class():
    # 2 tasks × 2 classes; class (task 0, label 0) floods the stream, (task 1, label 1) is rare
    labels = torch.tensor([0] * 300 + [1] * 40 + [0] * 60 + [1] * 7)
    task_ids = torch.tensor([0] * 340 + [1] * 67)
    ids = torch.arange(len(labels)) % 256
    buffer = ReplayBuffer(20, sampling="class_balanced", seed=1)
    buffer.set_classes(4, 2)
    for s in torch.arange(len(labels)).split(32):
        buffer.add(*stream(ids[s], labels[s], task_ids[s]))
    held = buffer.contents()
    keys = held["task_ids"] * 2 + held["labels"]
    assert torch.bincount(keys, minlength=4).tolist() == [5, 5, 5, 5]
    # the rare class had 7 samples: 5 of them are held; each held image belongs to its own class
    for key, (lo, hi) in enumerate([(0, 300), (300, 340), (340, 400), (400, 407)]):
        images = held["images"].view(-1)[keys == key].long()
        original = torch.arange(len(labels))[lo:hi] % 256
        assert set(images.tolist()) <= set(original.tolist())
    assert len(buffer) == 20


def test_class_balanced_reservoir_per_class_is_uniform():
    n_items, trials = 20, 1000
    counts = torch.zeros(n_items)
    for trial in range(trials):
        buffer = ReplayBuffer(8, sampling="class_balanced", seed=trial)
        buffer.set_classes(2, 2)  # 4 slots per class
        labels = torch.arange(2 * n_items) % 2  # classes interleaved
        ids = torch.arange(2 * n_items) // 2  # item id within its class
        for s in torch.arange(2 * n_items).split(9):
            buffer.add(*stream(ids[s], labels[s]))
        held = buffer.contents()
        counts[held["images"].view(-1)[held["labels"] == 0].long()] += 1
    expected = trials * 4 / n_items
    assert float(((counts - expected) ** 2 / expected).sum()) < CHI2_999[n_items - 1]


def test_class_balanced_needs_a_slot_per_class():
    with pytest.raises(ConfigError, match="buffer_size=3 is invalid"):
        ReplayBuffer(3, sampling="class_balanced").set_classes(4, 2)


def test_draws_are_uniform_and_each_rank_takes_its_chunk():
    buffer = ReplayBuffer(10, seed=0)
    buffer.add(*stream(torch.arange(10)))
    counts = torch.zeros(10)
    for _ in range(200):
        counts += torch.bincount(buffer.sample(50, torch.device("cpu"))["images"].view(-1).long(), minlength=10)
    expected = counts.sum() / 10
    assert float(((counts - expected) ** 2 / expected).sum()) < CHI2_999[9]
    # two ranks with the same state draw the same global batch; rank r takes its contiguous chunk
    state = buffer.state_dict()
    single = buffer.sample(8, torch.device("cpu"))["images"]
    chunks = []
    for rank in range(2):
        other = ReplayBuffer(10)
        other.load_state_dict(state)
        chunks.append(other.sample(8, torch.device("cpu"), rank=rank, world_size=2)["images"])
    assert torch.equal(torch.cat(chunks), single)


def test_state_dict_resumes_exactly():
    batches = list(torch.arange(120).split(16))
    full = ReplayBuffer(30, seed=5)
    for b in batches:
        full.add(*stream(b), logits=b.float().view(-1, 1))
    half = ReplayBuffer(30, seed=5)
    for b in batches[:3]:  # partly filled
        half.add(*stream(b), logits=b.float().view(-1, 1))
    resumed = ReplayBuffer(30, seed=999)  # the seed does not matter: the generator state is restored
    resumed.load_state_dict(half.state_dict())
    for b in batches[3:]:
        resumed.add(*stream(b), logits=b.float().view(-1, 1))
    for key, value in full.contents().items():
        assert torch.equal(resumed.contents()[key], value), key
    assert torch.equal(resumed.sample(7, torch.device("cpu"))["logits"], full.sample(7, torch.device("cpu"))["logits"])
    with pytest.raises(ConfigError, match="buffer_size=31"):
        ReplayBuffer(31).load_state_dict(full.state_dict())
