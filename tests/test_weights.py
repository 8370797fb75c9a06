"""`ovseg.weights`: the one checkpoint reader and offline probe every plugin uses."""

from __future__ import annotations

import fractions
import os

import pytest
import torch

from ovseg import weights
from ovseg.errors import WeightsError


def test_state_dicts_are_unwrapped_and_prefixes_stripped(tmp_path):
    w = {"a.weight": torch.ones(2), "b": torch.zeros(1)}
    torch.save({"teacher": {f"module.{k}": v for k, v in w.items()}, "epoch": 3}, tmp_path / "dino.pth")
    torch.save({"state_dict": w}, tmp_path / "lightning.pth")
    torch.save({"model": w, "optimizer": {}}, tmp_path / "release.pth")
    for name in ("dino.pth", "lightning.pth", "release.pth"):
        ckpt = weights.read_checkpoint(tmp_path / name)
        assert ckpt.tensors.keys() == w.keys() and not ckpt.torchscript
        assert torch.equal(ckpt.tensors["a.weight"], w["a.weight"])


def test_safetensors_and_torchscript(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.arange(3.0)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(weights.read_checkpoint(tmp_path / "w.safetensors").tensors["x"], torch.arange(3.0))
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), str(tmp_path / "ts.pt"))
    ckpt = weights.read_checkpoint(tmp_path / "ts.pt")
    assert ckpt.torchscript and set(ckpt.tensors) == {"weight", "bias"}
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        weights.read_checkpoint(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("content", [os.urandom(3000), b"PK\x03\x04" + os.urandom(100)])
def test_a_damaged_file_is_called_damaged_never_a_pickle_to_trust(tmp_path, content):
    path = tmp_path / "random.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        weights.read_checkpoint(path)
    msg = str(info.value)
    assert "not a readable PyTorch checkpoint" in msg and str(path) in msg
    assert "trust" not in msg and "weights_only=False" not in msg


def test_truncated_checkpoint_is_damaged(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="damaged, truncated"):
        weights.read_checkpoint(tmp_path / "cut.pth")


def test_pickled_objects_need_trust_and_are_named(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"model": {"w": torch.ones(1)}, "extra": fractions.Fraction(1, 3)}, path)
    with pytest.raises(WeightsError, match=r"pickles Python objects besides tensors \(fractions.Fraction\)") as info:
        weights.read_checkpoint(path, untrusted_hint="HINT.")
    assert str(info.value).endswith("HINT.")
    assert torch.equal(weights.read_checkpoint(path, trust=True).tensors["w"], torch.ones(1))


def test_missing_and_non_state_dicts(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        weights.read_checkpoint(tmp_path / "nope.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="holds no state dict"):
        weights.read_checkpoint(tmp_path / "list.pth")
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "mixed.pth")
    with pytest.raises(WeightsError, match=r"entries \['step'\] are not tensors"):
        weights.read_checkpoint(tmp_path / "mixed.pth")


def test_offline_reason(monkeypatch):
    for name in weights.OFFLINE_VARIABLES + weights.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(weights, "_reachable", lambda host, port=443: host == "up.example")
    assert weights.offline_reason(["down.example", "up.example"]) is None
    assert "cannot reach down.example" in weights.offline_reason(["down.example"])
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # the proxy may reach it: let the download try
    assert weights.offline_reason(["down.example"]) is None
    monkeypatch.setenv("OVSEG_OFFLINE", "1")
    assert "OVSEG_OFFLINE" in weights.offline_reason(["up.example"])
