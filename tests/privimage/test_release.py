"""The release (issue 13, item 2): only DP outputs and public data leave the run directory.

A secure fine-tune is exported, then every file of release/ is inspected: tensor names, safetensors metadata,
JSON keys (recursively) and raw bytes, for generator state, seeds, the secret key, optimizer state, the
sampler and statistics computed on sensitive data.
"""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from privimage.data import load_dataset
from privimage.engine import Mechanism, PrivacyBudget
from privimage.privacy import FINETUNE, QUERY
from privimage.io import save_json
from privimage.models import UNet
from privimage.models.unet import PRESETS, UNetConfig
from privimage.release import export_release, load_release_denoiser
from privimage.config import FinetuneConfig
from privimage.train import finetune, load_checkpoint
from release_checks import assert_release_holds_no_secret, key_encodings
from threads import one_torch_thread

UNET = replace(PRESETS["tiny"], nf=8, ch_mult=(1,), attn_resolutions=(8,), resolution=8, num_classes=5)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run directory with a finished SECURE fine-tune (2 steps) and the DP query's outputs, exported."""
    run = tmp_path_factory.mktemp("run")
    data = load_dataset("embedded", split="sensitive", size=24, resolution=8, seed=3)
    save_json({"name": "test", "seed": 5, "data": {"seed": 0, "sensitive": "embedded:sensitive,size=24"},
               "finetune": {"secure_noise": True, "max_grad_norm": 1e-2}}, run / "config.json")
    budget = PrivacyBudget(8.0, 1e-4, plan={QUERY: Mechanism(5.0), FINETUNE: Mechanism(1.0, 0.25, 2)})
    budget.spend(QUERY)
    save_json(budget.state_dict(), run / "budget.json")
    save_json({"selected_labels": [1, 2], "top_k": 1, "l2_sensitivity": 1.0, "noise_std": 5.0},
              run / "query" / "selected_labels.json")
    np.save(run / "query" / "histogram.npy", np.array([3.5, -1.25]))
    with one_torch_thread():  # a module fixture runs outside the function-scoped fixture of that name
        finetune(run, FinetuneConfig(physical_batch_size=8, num_noise=2, max_grad_norm=1e-2, lr=1e-3, log_every=1),
                 images=data.images, labels=data.labels, unet=UNET, budget=budget, init_state=None, seed=5,
                 log=lambda *_: None)
        export_release(run, log=lambda *_: None)
    return run


def test_the_release_holds_the_ema_weights_config_and_privacy_statement_only(exported):
    release = exported / "release"
    assert {str(p.relative_to(release)) for p in release.rglob("*") if p.is_file()} == {
        "model.safetensors", "config.json", "privacy.json", "PRIVACY.md", "query/histogram.npy",
        "query/selected_labels.json"}
    state = load_checkpoint(exported / "checkpoints" / "finetune.pt")
    with safe_open(str(release / "model.safetensors"), framework="pt") as f:
        names, metadata = set(f.keys()), f.metadata()
        tensors = {name: f.get_tensor(name) for name in names}
    assert names == set(UNet(UNET).state_dict())  # the UNet's own parameters and buffers, nothing else
    for name, tensor in tensors.items():  # the EMA weights, not the last iterate
        assert torch.equal(tensor, state["ema"]["module"][f"net.{name}"]), name
    assert any(not torch.equal(t, state["model"][n]) for n, t in tensors.items())
    assert set(metadata) == {"format", "unet_config", "sigma_data", "weights"} and metadata["weights"] == "ema"
    assert UNetConfig.from_dict(json.loads(metadata["unet_config"])) == UNET
    den = load_release_denoiser(exported)
    assert all(torch.equal(p, tensors[n]) for n, p in den.net.state_dict().items())

    statement = json.loads((release / "privacy.json").read_text())
    assert statement["private"] is True and statement["delta"] == 1e-4
    assert 0 < statement["epsilon"] <= 8.0 and statement["training"]["ledger"] == {QUERY: 1, FINETUNE: 2}
    ft = statement["mechanisms"]["finetune"]
    assert (ft["noise_multiplier"], ft["sample_rate"], ft["steps"], ft["max_grad_norm"], ft["num_noise"]) == (
        1.0, 0.25, 2, 1e-2, 2)
    assert statement["mechanisms"]["query"]["noise_multiplier"] == 5.0
    assert any("delta" in n for n in statement["not_covered"])
    assert "NOT PRIVATE" not in (release / "PRIVACY.md").read_text()


def test_no_secret_or_sensitive_statistic_is_in_any_released_file(exported):
    release = exported / "release"
    state = load_checkpoint(exported / "checkpoints" / "finetune.pt")
    key = state["loss_randomness"]["key"]
    assert isinstance(key, int) and state["loss_randomness"]["secure"]
    secrets = {"sampler seed": str(state["sampler"]["seed"]).encode(),
               "sampler seed (hex)": f"{state['sampler']['seed']:x}".encode(),
               **{f"diffusion key ({how})": value for how, value in key_encodings(key).items()},
               "noise generator state": bytes(state["noise_generator"][1000:1032].tolist())}
    # A step whose Poisson batch drew no record logs a loss of 0.0 (the sum over no rows): it tells nothing of any
    # record, and "0.0" is in any text that writes a zero, so only nonzero losses are looked for.
    secrets.update({f"logged loss {row['loss']}": repr(row["loss"]).encode() for row in state["log"] if row["loss"]})
    assert_release_holds_no_secret(release, secrets)


def test_export_refuses_an_unfinished_fine_tune_and_an_uncounted_checkpoint(exported, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(exported, run)
    shutil.rmtree(run / "release")
    state = load_checkpoint(run / "checkpoints" / "finetune.pt")
    budget = json.loads((run / "budget.json").read_text())
    save_json({**budget, "spent": {QUERY: 1, FINETUNE: 1}}, run / "budget.json")
    with pytest.raises(ValueError, match="counts 1 fine-tune steps but .* is at step 2"):
        export_release(run, log=lambda *_: None)
    torch.save({**state, "step": 1}, run / "checkpoints" / "finetune.pt")
    with pytest.raises(ValueError, match="at step 1 of 2: the fine-tune is not finished"):
        export_release(run, log=lambda *_: None)
    assert not (run / "release").exists()
    with pytest.raises(FileNotFoundError, match="export the release first"):
        load_release_denoiser(run)
