"""Vision encoders: HF towers (layer and token selection), a
custom module with a checkpoint, mismatches, fingerprints."""

from __future__ import annotations

import pytest
import torch
from helpers.configs import tiny_vision_config
from helpers.custom_vision import TinyCNN, tiny_custom_vision_config

from mmdist.models.connectors import pool_tokens
from mmdist.models.fingerprint import config_fingerprint, path_fingerprint
from mmdist.models.vision import VisionConfig, VisionTower
from mmdist.settings import from_dict


def tower(**settings) -> VisionTower:
    return VisionTower(from_dict(VisionConfig, settings))


def test_hf_vit_token_and_layer_selection():
    pixels = torch.randn(2, 3, 16, 16)
    patch = tower(**tiny_vision_config(select_tokens="patch", select_layer=-1))
    cls = tower(**tiny_vision_config(select_tokens="cls", select_layer=-1))
    every = tower(**tiny_vision_config(select_tokens="all", select_layer=-1))
    penult = tower(**tiny_vision_config(select_tokens="all", select_layer=-2))
    assert (patch.num_tokens, cls.num_tokens, every.num_tokens) == (16, 1, 17)
    with torch.no_grad():
        hidden = every.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        torch.testing.assert_close(every(pixels), hidden[-1])
        torch.testing.assert_close(patch(pixels), hidden[-1][:, 1:])  # same seed -> same weights
        torch.testing.assert_close(cls(pixels), hidden[-1][:, :1])
        torch.testing.assert_close(penult(pixels), hidden[-2])
    assert patch.image_size == 16 and patch.image_mean == [0.5, 0.5, 0.5]
    # Token counts read from the config agree with what a forward returns.
    for t in (patch, cls, every):
        assert t(pixels).shape[1:] == (t.num_tokens, t.hidden_size)


def test_seeded_init_is_repeatable_and_seed_dependent():
    a, b = tower(**tiny_vision_config()), tower(**tiny_vision_config())
    c = tower(**tiny_vision_config(init_seed=1))
    wa, wb, wc = (next(t.model.parameters()) for t in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize(
    "model_type,has_cls,tokens", [("clip_vision_model", True, 16), ("siglip_vision_model", False, 16)]
)
def test_clip_and_siglip_towers(model_type, has_cls, tokens):
    init = {"model_type": model_type, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": 16, "patch_size": 4}
    t = tower(source="hf", init_config=init, dtype="fp32")
    assert t.has_cls is has_cls and t.num_tokens == tokens and t.hidden_size == 32
    if not has_cls:
        with pytest.raises(ValueError, match="no class token"):
            tower(source="hf", init_config=init, select_tokens="cls")


def test_pool_tokens_2d_and_1d():
    x = torch.arange(16, dtype=torch.float32).view(1, 16, 1)
    pooled = pool_tokens(x, 4)  # 4x4 grid -> 2x2: mean of each 2x2 block
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool_tokens(x, 8).shape == (1, 8, 1)
    assert pool_tokens(x, 0) is x


def _save_tiny_cnn(path, wrap=True, seed=3):
    torch.manual_seed(seed)
    net = TinyCNN(width=24, patch=4, image_size=16)
    state = {"module." + k: v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 7} if wrap else state, path)
    return net


def test_custom_module_with_checkpoint_loads(tmp_path):
    ckpt = tmp_path / "checkpoint_1112.pth"
    reference = _save_tiny_cnn(ckpt)
    t = tower(**tiny_custom_vision_config(str(ckpt)))
    for name, value in reference.state_dict().items():
        assert torch.equal(t.model.state_dict()[name], value), name
    assert t.num_tokens == 16 and t.hidden_size == 24
    assert t.load_report == {"missing": [], "unexpected": [], "mismatched": []}
    reference.eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        t.eval()
        torch.testing.assert_close(t(pixels), reference(pixels).flatten(2).transpose(1, 2))


def test_custom_module_explicit_checkpoint_key(tmp_path):
    ckpt = tmp_path / "ck.pth"
    net = TinyCNN()
    torch.save({"weights": net.state_dict()}, ckpt)
    t = tower(**tiny_custom_vision_config(str(ckpt), checkpoint_key="weights"))
    assert torch.equal(t.model.stem.weight, net.stem.weight)
    with pytest.raises(KeyError, match="no entry 'ema'"):
        tower(**tiny_custom_vision_config(str(ckpt), checkpoint_key="ema"))


def test_mismatched_checkpoint_fails_clearly_unless_partial(tmp_path):
    ckpt = tmp_path / "bad.pth"
    other = TinyCNN(width=16)  # every conv has another shape
    state = other.state_dict()
    state["head.weight"] = torch.zeros(3)  # unexpected
    del state["mix.bias"]  # missing
    torch.save(state, ckpt)
    with pytest.raises(ValueError) as err:
        tower(**tiny_custom_vision_config(str(ckpt)))
    msg = str(err.value)
    assert "model.vision.checkpoint" in msg and str(ckpt) in msg
    assert "missing keys" in msg and "mix.bias" in msg
    assert "unexpected keys" in msg and "head.weight" in msg
    assert "mismatched keys" in msg and "stem.weight: checkpoint (16, 3, 4, 4) vs model (24, 3, 4, 4)" in msg
    assert "allow_partial_load" in msg
    t = tower(**tiny_custom_vision_config(str(ckpt), allow_partial_load=True))
    assert "mix.bias" in t.load_report["missing"] and "head.weight" in t.load_report["unexpected"]


def test_checkpoint_with_code_is_refused(tmp_path):
    ckpt = tmp_path / "pickled.pth"
    torch.save({"state_dict": TinyCNN()}, ckpt)  # a whole module object: needs unpickling code
    with pytest.raises(ValueError, match="weights_only=True"):
        tower(**tiny_custom_vision_config(str(ckpt)))


def test_custom_class_import_errors_name_the_key():
    with pytest.raises(ImportError, match="model.vision.custom_class='helpers.custom_vision:Nope'"):
        tower(**tiny_custom_vision_config(custom_class="helpers.custom_vision:Nope"))


def test_fingerprints(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 100)
    first = path_fingerprint(str(tmp_path))
    assert first == path_fingerprint(str(f.parent))
    f.write_bytes(b"b" * 100)
    assert path_fingerprint(str(tmp_path)) != first
    assert config_fingerprint({"a": 1}, 0) != config_fingerprint({"a": 1}, 1)
