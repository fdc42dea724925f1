"""The training heap's mmap threshold: only for a CPU run with a large LoRA, and always set back."""

from __future__ import annotations

import pytest

from training import heap


@pytest.fixture
def thresholds(monkeypatch) -> list[int]:
    said: list[int] = []
    monkeypatch.setattr(heap, "map_allocations_above", said.append)
    return said


@pytest.mark.parametrize(
    ("device", "trainable", "mapped"),
    [("cpu", 14_548_992, True), ("cpu", 194_560, False), ("cuda", 14_548_992, False), ("cuda:1", 10**8, False)],
)
def test_lora_sized_blocks_are_mapped_only_for_a_large_lora_on_the_cpu(thresholds, device, trainable, mapped):
    with heap.training_heap(device, trainable):
        assert thresholds == ([heap.TRAINING] if mapped else [])
    assert thresholds == ([heap.TRAINING, heap.LOADING] if mapped else [])


def test_the_threshold_is_set_back_when_training_fails(thresholds):
    with pytest.raises(KeyboardInterrupt), heap.training_heap("cpu", 10**7):
        raise KeyboardInterrupt
    assert thresholds == [heap.TRAINING, heap.LOADING]
