"""Input validation: device-side checks with one host read, and the errors they raise."""

import re
from typing import Any, Dict, List

import pytest
import torch
from torchrec import KeyedJaggedTensor

from memcom_torchrec.modules import validation
from memcom_torchrec.modules.validation import check_features, validate_features
from reference import HostReads

BOUNDS = {"hist": 50, "user": 7}
TABLES = {"hist": "item", "user": "user"}


def kjt(values: List[int], lengths: List[int]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["hist", "user"], values=torch.tensor(values), lengths=torch.tensor(lengths)
    )


@pytest.fixture
def flag_reads(monkeypatch) -> List[int]:
    """Counts ``read_flags`` (the one sanctioned host read) and every ``Tensor.tolist``."""
    calls: List[int] = []
    original_read, original_tolist = validation.read_flags, torch.Tensor.tolist

    def counted_read(t: torch.Tensor) -> List[int]:
        calls.append(1)
        return original_read(t)

    def counted_tolist(self: torch.Tensor) -> Any:
        calls.append(0)
        return original_tolist(self)

    monkeypatch.setattr(validation, "read_flags", counted_read)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    return calls


def test_a_good_batch_is_checked_with_one_host_read(flag_reads: List[int]) -> None:
    batch = kjt([1, 2, 49, 3, 6, 0], [2, 2, 1, 1])  # from_lengths_sync reads its lengths here
    flag_reads.clear()
    with HostReads() as mode:
        check = check_features(batch, BOUNDS, TABLES, is_weighted=False)
        assert check.error is None and check.bad_values is not None
        assert flag_reads == [], "building the check must not read values back"
        assert check.resolve() is None
    assert mode.reads == [], f"host reads outside read_flags: {mode.reads}"
    assert flag_reads == [1, 0], "exactly one read_flags (one tolist) per check"


def test_a_bad_batch_is_counted_on_the_device_then_described() -> None:
    check = check_features(kjt([1, 2, 50, 3, 6, 0], [2, 2, 1, 1]), BOUNDS, TABLES, is_weighted=False)
    assert check.error is None
    assert int(check.bad_values) == 1
    assert check.resolve() == "feature 'hist': id 50 is out of range for table 'item' (num_embeddings=50)"


@pytest.mark.parametrize(
    "values,lengths,pattern",
    [
        ([1, 2, 3, 4, 5, 6], [2, 2, 1, 1], None),
        ([1, 2, 3, -4, 5, 6], [2, 2, 1, 1], r"feature 'hist': negative id -4 for table 'item'"),
        ([1, 2, 3, 4, 5, 7], [2, 2, 1, 1], r"feature 'user': id 7 is out of range for table 'user' \(num_embeddings=7\)"),
        # one negative bag in a key whose total is still positive: only the device count sees it
        ([1, 2, 3, 4, 5, 6], [5, -1, 1, 1], r"feature 'hist': negative bag length -1"),
        ([1, 2, 3, 4, 5, 6], [2, 2, 3, -1], r"feature 'user': negative bag length -1"),
    ],
)
def test_value_errors_name_the_feature_and_value(values: List[int], lengths: List[int], pattern: Any) -> None:
    batch = KeyedJaggedTensor(keys=["hist", "user"], values=torch.tensor(values), lengths=torch.tensor(lengths))
    error = validate_features(batch, BOUNDS, TABLES, is_weighted=False)
    if pattern is None:
        assert error is None
    else:
        assert error is not None and re.fullmatch(pattern, error), error


def test_structural_errors_are_found_on_the_host_before_any_value_check() -> None:
    cases: Dict[str, KeyedJaggedTensor] = {
        # the per-key total itself is negative
        r"feature 'hist': negative bag lengths \(total -1\)": KeyedJaggedTensor(
            keys=["hist", "user"], values=torch.tensor([1, 2]), lengths=torch.tensor([-3, 2, 1, 1])
        ),
        # lengths and values disagree
        r"the bag lengths add up to 6 ids but the input has 4": KeyedJaggedTensor(
            keys=["hist", "user"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([2, 2, 1, 1])
        ),
        r"ids must be int32 or int64": KeyedJaggedTensor(
            keys=["hist", "user"], values=torch.tensor([1.0, 2.0]), lengths=torch.tensor([1, 0, 1, 0])
        ),
    }
    for pattern, batch in cases.items():
        check = check_features(batch, BOUNDS, TABLES, is_weighted=False)
        assert check.bad_values is None, pattern
        assert check.error is not None and re.search(pattern, check.error), (pattern, check.error)
