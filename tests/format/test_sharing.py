"""Tied parameters: detection by identity, re-tying, merging groups. No storage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ckptio.errors import InvalidArgumentError
from ckptio.format import create_sharing_metadata, retie_parameters
from ckptio.format.sharing import merge_groups, module_tied_groups


class Tied(nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.mid = nn.Linear(3, 3)
        self.head = nn.Linear(3, 7, bias=False)
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("scale_copy", self.scale)
        if tie:
            self.head.weight = self.emb.weight


def test_detects_shared_parameters_and_buffers_by_identity() -> None:
    # Groups come in state-dict order (a module's own buffers before its children).
    assert create_sharing_metadata(Tied()) == [["scale", "scale_copy"], ["emb.weight", "head.weight"]]


def test_untied_module_has_no_groups_even_with_equal_values() -> None:
    module = Tied(tie=False)
    with torch.no_grad():
        module.head.weight.copy_(module.emb.weight)
    assert create_sharing_metadata(module) == [["scale", "scale_copy"]]


def test_state_dict_groups_entries_viewing_the_same_memory() -> None:
    sd = Tied().state_dict()
    assert create_sharing_metadata(sd) == [["scale", "scale_copy"], ["emb.weight", "head.weight"]]
    base = torch.arange(10.0)
    assert create_sharing_metadata({"a": base[:5], "b": base[5:], "c": base[:5]}) == [["a", "c"]]


def test_retie_makes_names_one_parameter_again() -> None:
    module = Tied(tie=False)
    assert module.head.weight is not module.emb.weight
    retie_parameters(module, [["emb.weight", "head.weight"], ["scale", "scale_copy"], ["nope", "head.weight"]])
    assert module.head.weight is module.emb.weight
    assert isinstance(module.head.weight, nn.Parameter)
    assert module.scale_copy is module.scale
    assert create_sharing_metadata(module) == [["scale", "scale_copy"], ["emb.weight", "head.weight"]]


def test_retie_refuses_tying_a_parameter_to_a_buffer() -> None:
    with pytest.raises(InvalidArgumentError, match="parameter, the other a buffer"):
        retie_parameters(Tied(tie=False), [["scale", "mid.bias"]])


def test_merge_groups_unions_overlaps() -> None:
    assert merge_groups([["a", "b"]], [["c", "b"], ["x", "y"]], [["y"]]) == [["a", "b", "c"], ["x", "y"]]


def test_transformers_tied_keys_mapping_is_read() -> None:
    module = Tied(tie=False)
    module._tied_weights_keys = {"head.weight": "emb.weight", "missing.weight": "emb.weight"}  # type: ignore[assignment]
    assert module_tied_groups(module) == [["emb.weight", "head.weight"]]


def test_sharing_of_something_else_is_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        create_sharing_metadata([1, 2])  # type: ignore[arg-type]
