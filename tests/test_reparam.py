"""The reader of effective weights: merging, indexing, counting and validating pairs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune
from hypothesis import given, settings
from hypothesis import strategies as st

from prunedoctor import reparam
from prunedoctor.errors import ReparametrizationError
from prunedoctor.reparam import (
    effective_state_dict,
    effective_tensor,
    index_reparametrization,
    is_binary_mask,
    measure_parameters,
    merge_pair,
    validate_reparametrization,
)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _pruned_linear(seed: int, rows: int, cols: int, dtype: torch.dtype, density: float) -> torch.nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(cols, rows).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, cols, generator=generator).to(dtype))
    mask = (torch.rand(rows, cols, generator=generator) < density).to(dtype)
    prune.custom_from_mask(layer, "weight", mask)
    return layer


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    dtype=st.sampled_from(FLOAT_DTYPES),
    density=st.floats(0.0, 1.0),
)
def test_merge_equals_prune_remove(seed: int, rows: int, cols: int, dtype: torch.dtype, density: float) -> None:
    layer = _pruned_linear(seed, rows, cols, dtype, density)
    state = layer.state_dict()
    merged = merge_pair(state["weight_orig"], state["weight_mask"], "weight")
    prune.remove(layer, "weight")
    expected = layer.weight.detach()
    assert merged.dtype == expected.dtype
    # Bytes, not values: NaN and signed zeros must match too.
    assert torch.equal(merged.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    dtype=st.sampled_from(FLOAT_DTYPES),
    density=st.floats(0.0, 1.0),
)
def test_counts_match_count_nonzero(seed: int, rows: int, cols: int, dtype: torch.dtype, density: float) -> None:
    layer = _pruned_linear(seed, rows, cols, dtype, density)
    state = layer.state_dict()
    stats = measure_parameters(state)["weight"]
    effective = state["weight_orig"] * state["weight_mask"]
    assert stats.zeros == effective.numel() - int(torch.count_nonzero(effective))
    assert stats.mask_zeros == state["weight_mask"].numel() - int(torch.count_nonzero(state["weight_mask"]))
    assert stats.numel == rows * cols


SPECIAL_VALUES = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1.0, 0.5, 1e-45, 1 - 2**-24, 2.0, -1.0]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    size=st.integers(1, 40),
    dtype=st.sampled_from(FLOAT_DTYPES),
    mask_dtype=st.sampled_from([torch.float32, torch.float16, torch.bool, torch.uint8, torch.int64]),
    specials=st.lists(st.tuples(st.integers(0, 39), st.sampled_from(SPECIAL_VALUES), st.booleans()), max_size=6),
)
def test_counts_exact_with_special_values(
    seed: int,
    size: int,
    dtype: torch.dtype,
    mask_dtype: torch.dtype,
    specials: list[tuple[int, float, bool]],
) -> None:
    """Zeros, non-finite and non-binary counts equal plain count_nonzero arithmetic, across chunk borders."""
    generator = torch.Generator().manual_seed(seed)
    orig = torch.randn(size, generator=generator).to(dtype)
    orig[torch.rand(size, generator=generator) < 0.3] = 0
    mask = (torch.rand(size, generator=generator) < 0.5).to(mask_dtype)
    for position, value, in_mask in specials:
        if position >= size:
            continue
        if not in_mask:
            orig[position] = value
        elif mask_dtype.is_floating_point:
            mask[position] = value
        elif mask_dtype != torch.bool and value == value and abs(value) != float("inf"):
            mask[position] = int(value)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reparam, "_CHUNK_ELEMENTS", 7)
        stats = measure_parameters({"w_orig": orig, "w_mask": mask})["w"]
    effective = orig * mask.to(dtype)
    is_binary_entry = (mask == 0) | (mask == 1)
    assert stats.zeros == size - int(torch.count_nonzero(effective))
    assert stats.mask_zeros == size - int(torch.count_nonzero(mask))
    assert stats.mask_nonbinary == (0 if mask.dtype == torch.bool else size - int(is_binary_entry.sum()))
    assert stats.nonfinite == size - int(torch.isfinite(orig).sum())


def test_chunked_counts_equal_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _pruned_linear(3, 40, 30, torch.float32, 0.4)
    state = layer.state_dict()
    whole = measure_parameters(state)
    monkeypatch.setattr(reparam, "_CHUNK_ELEMENTS", 7)
    chunked = measure_parameters(state)
    assert chunked == whole


def test_empty_tensors_measured() -> None:
    state = {"empty": torch.empty(0, 3), "w_orig": torch.empty(0), "w_mask": torch.empty(0), "scalar": torch.tensor(0.0)}
    stats = measure_parameters(state)
    assert stats["empty"].zeros == 0
    assert stats["w"].mask_zeros == 0
    assert stats["scalar"].zeros == 1


def test_nonfinite_counted_exactly() -> None:
    values = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0])
    assert measure_parameters({"w": values})["w"].nonfinite == 3


def test_nan_product_counted_nonzero() -> None:
    state = {"w_orig": torch.tensor([float("nan"), 1.0, 0.0]), "w_mask": torch.tensor([0.0, 1.0, 1.0])}
    assert measure_parameters(state)["w"].zeros == 1


def test_merge_keeps_weight_dtype() -> None:
    merged = merge_pair(torch.ones(2, 2, dtype=torch.float16), torch.tensor([[1, 0], [0, 1]], dtype=torch.uint8))
    assert merged.dtype == torch.float16


def test_merge_shape_mismatch_raises() -> None:
    with pytest.raises(ReparametrizationError, match=r"cannot merge fc\.weight: .* shape \(2, 3\)"):
        merge_pair(torch.ones(2, 3), torch.ones(3, 2), "fc.weight")


def test_effective_tensor_reads_pair() -> None:
    state = {"fc.weight_orig": torch.tensor([1.0, 2.0]), "fc.weight_mask": torch.tensor([0.0, 1.0])}
    assert torch.equal(effective_tensor(state, "fc.weight"), torch.tensor([0.0, 2.0]))


def test_effective_tensor_missing_names_keys() -> None:
    state = {"fc.weight_orig": torch.ones(1)}
    with pytest.raises(ReparametrizationError, match="not found .* fc.weight_orig"):
        effective_tensor(state, "fc.weight")


def test_effective_state_dict_keeps_order() -> None:
    state = {
        "a": torch.ones(1),
        "fc.weight_orig": torch.ones(2),
        "fc.weight_mask": torch.tensor([1.0, 0.0]),
        "fc.bias": torch.zeros(2),
    }
    assert list(effective_state_dict(state)) == ["a", "fc.weight", "fc.bias"]


def test_index_finds_every_kind() -> None:
    keys = ["p.weight_orig", "p.weight_mask", "q.weight_mask", "r.weight_orig", "s.weight", "s.weight_mask"]
    index = index_reparametrization(keys)
    assert index.pairs == {"p.weight": ("p.weight_orig", "p.weight_mask")}
    assert index.orphan_masks == ["q.weight_mask"]
    assert index.orphan_origs == ["r.weight_orig"]
    assert index.sidecar_masks == {"s.weight": "s.weight_mask"}


def test_index_handles_bias_pairs() -> None:
    index = index_reparametrization(["fc.bias_orig", "fc.bias_mask"])
    assert index.reparametrized == ["fc.bias"]


def _codes(state: dict[str, torch.Tensor]) -> set[str]:
    return {finding.code for finding in validate_reparametrization(state)}


def test_validate_leftover_pair() -> None:
    assert _codes({"w_orig": torch.ones(2), "w_mask": torch.ones(2)}) == {"PD001"}


def test_validate_orphan_mask() -> None:
    assert _codes({"w_mask": torch.ones(2)}) == {"PD002"}


def test_validate_orphan_orig() -> None:
    assert _codes({"w_orig": torch.ones(2)}) == {"PD003"}


def test_validate_shape_mismatch() -> None:
    assert "PD004" in _codes({"w_orig": torch.ones(2, 3), "w_mask": torch.ones(3, 2)})


def test_validate_nonbinary_mask() -> None:
    findings = validate_reparametrization({"w_orig": torch.ones(4), "w_mask": torch.tensor([1.0, 0.5, 0.0, 2.0])})
    nonbinary = [finding for finding in findings if finding.code == "PD005"]
    assert len(nonbinary) == 1
    assert "2 of 4 entries" in nonbinary[0].message


def test_validate_nan_mask_is_nonbinary() -> None:
    assert "PD005" in _codes({"w_orig": torch.ones(2), "w_mask": torch.tensor([1.0, float("nan")])})


def test_validate_complex_mask() -> None:
    assert "PD011" in _codes({"w_orig": torch.ones(2), "w_mask": torch.ones(2, dtype=torch.complex64)})


def test_validate_revived_sidecar() -> None:
    state = {"w": torch.tensor([1.0, 2.0, 0.0]), "w_mask": torch.tensor([1.0, 0.0, 0.0])}
    findings = validate_reparametrization(state)
    assert [finding.code for finding in findings] == ["PD009"]
    assert "nonzero at 1 entries" in findings[0].message


def test_validate_respected_sidecar_clean() -> None:
    assert _codes({"w": torch.tensor([1.0, 0.0]), "w_mask": torch.tensor([1.0, 0.0])}) == set()


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (torch.tensor([0, 1], dtype=torch.uint8), True),
        (torch.tensor([True, False]), True),
        (torch.tensor([0.0, 1.0, -0.0]), True),
        (torch.tensor([0.0, 0.999]), False),
        (torch.tensor([2, 1], dtype=torch.int64), False),
    ],
)
def test_binary_mask_by_dtype(mask: torch.Tensor, expected: bool) -> None:
    assert is_binary_mask(mask) is expected
