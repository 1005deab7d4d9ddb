"""FD-DINOv2 on a tiny random Dinov2 saved with save_pretrained: the features equal dgm-eval's
preprocessing written out with torchvision, the distance is the project's Fréchet distance, the
weights' hash is recorded, and missing or pickled weights are refused with the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _eval_models import tiny_dinov2
from PIL import Image

from imagegen.evaluate import dinov2 as D
from imagegen.evaluate.fid import fd_from_features
from imagegen.evaluate.hf_models import ModelWeightsMissingError
from imagegen.hashing import file_sha256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny-dinov2")


def _folder(path, seed, n=6, size=40):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / f"{i:02d}.png")
    return path


def test_features_equal_dgm_eval_preprocessing(model_dir, tmp_path, one_torch_thread):
    import torchvision.transforms as TF
    from transformers import Dinov2Model

    folder = _folder(tmp_path / "a", 0)
    ext = D.dinov2_extractor(model_dir)
    feats = D.dinov2_features(folder, ext, batch_size=4, num_workers=0)
    assert feats.dtype == np.float64 and feats.shape == (6, 32)
    # dgm-eval's DINOv2Encoder.transform, written out with torchvision, then the model's CLS token after the norm
    tf = TF.Compose([TF.Resize((224, 224), TF.InterpolationMode.BICUBIC), TF.ToTensor(),
                     TF.Normalize(D.IMAGENET_MEAN, D.IMAGENET_STD)])
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in sorted(folder.glob("*.png"))])
    ref_model = Dinov2Model.from_pretrained(model_dir).eval()
    with torch.no_grad():  # transformers' last_hidden_state is after the final layer norm
        cls = ref_model(pixel_values=x).last_hidden_state[:, 0]
    assert np.allclose(feats, cls.numpy(), atol=1e-4)


def test_fd_dinov2_value_name_and_weights_hash(model_dir, tmp_path, one_torch_thread):
    a, b = _folder(tmp_path / "a", 1), _folder(tmp_path / "b", 2)
    with pytest.warns(UserWarning, match="at least 33 samples"):  # 6 samples of 32-d features
        out = D.fd_dinov2(a, b, model_dir, num_workers=0)
    f = out["features"]
    assert out["value"] == pytest.approx(fd_from_features(f["generated"], f["reference"]))
    assert out["value"] > 0 and out["feature_dim"] == 32 and out["n_generated"] == 6
    assert len(out["flags"]) == 2 and "at least 33" in out["flags"][0]
    sha = file_sha256(model_dir / "model.safetensors")
    assert out["weights"]["weights"] == {"model.safetensors": sha}
    assert out["metric"] == f"FD-DINOv2-tiny-dinov2-{sha[:12]}" and "224x224" in out["preprocessing"]
    # a cached reference feature array gives the same number
    with pytest.warns(UserWarning):
        again = D.fd_dinov2(a, f["reference"], model_dir, num_workers=0)
    assert again["value"] == pytest.approx(out["value"])


def test_missing_and_pickled_weights_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ModelWeightsMissingError, match="does not exist"):
        D.dinov2_extractor(tmp_path / "nope")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelWeightsMissingError, match="pickled weights"):
        D.dinov2_extractor(pickled)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelWeightsMissingError, match="facebook/dinov2-large.*HF_HUB_OFFLINE"):
        D.dinov2_extractor("facebook/dinov2-large")
