"""The single device-to-host copy: packing and unpacking keeps every tensor, dtype and tie exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from shardsave.formats.adapter_write import write_weights
from shardsave.tensors.host import pack_to_host as _pack_to_host
from shardsave.tensors.host import to_host


def sample(device):
    tied = torch.randn(5, 3, device=device)
    return {
        "a": torch.randn(4, 7, device=device),
        "b": torch.randn(3, device=device).to(torch.bfloat16),
        "c": torch.randn(2, 2, device=device).to(torch.float16),
        "tied1": tied,
        "tied2": tied,
        "odd": torch.arange(5, device=device, dtype=torch.int8),
    }


def test_pack_roundtrip_and_same_file(tmp_path):
    tensors = sample("cpu")
    packed = _pack_to_host(tensors)  # the device path, exercised here on CPU tensors
    for k, v in tensors.items():
        assert packed[k].dtype == v.dtype and packed[k].shape == v.shape and torch.equal(packed[k], v)
    assert packed["tied1"].data_ptr() == packed["tied2"].data_ptr()
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    write_weights(tmp_path / "x", tensors, safe=True)
    write_weights(tmp_path / "y", packed, safe=True)
    assert (tmp_path / "x" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "y" / "adapter_model.safetensors"
    ).read_bytes()
    assert set(load_file(tmp_path / "y" / "adapter_model.safetensors")) == set(tensors)


def test_cpu_tensors_are_not_copied():
    tensors = sample("cpu")
    assert all(to_host(tensors)[k] is v for k, v in tensors.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_reach_host_once(tmp_path):
    tensors = sample("cuda")
    host = to_host(tensors)
    for k, v in tensors.items():
        assert host[k].device.type == "cpu" and torch.equal(host[k], v.cpu())
