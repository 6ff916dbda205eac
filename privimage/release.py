"""The release: the only part of a run directory that may be published (DESIGN.md "Privacy boundaries").

``privimage export RUN_DIR`` (and ``privimage run`` at its end) writes ``RUN_DIR/release/``::

    model.safetensors        the fine-tuned EMA weights of the UNet, nothing else; metadata: the format name,
                             the UNet config (JSON) and EDM's sigma_data. A GAN run (kind "gan"): the EMA
                             generator's weights only (the discriminator, the DP-trained network, stays private
                             in the checkpoint); metadata: the format name and the GAN config (JSON)
    config.json              the public run config
    privacy.json, PRIVACY.md the privacy statement: ε, δ, accountant, each mechanism with its σ/q/steps/C/K,
                             the composition with evaluation releases, and what the guarantee does NOT cover
    query/                   the DP query's outputs: histogram.npy (noisy) and selected_labels.json
    samples.png              the grid of samples drawn from model.safetensors (``privimage sample``)
    report.json, report.md, figures/   the publishable evaluation report (``privimage evaluate``)

Everything in it is a DP output or computed from DP outputs and public data only. What stays private: the
checkpoints (they hold the Poisson sampler's seed, the DP noise generator's state and the secret key of the
diffusion randomness), logs (noiseless losses over drawn sensitive batches), ``private/`` (the private
report, cached statistics of real images), ``budget.json`` and ``evaluation_ledger.json`` are public in
content but are the run's working state (their numbers are in privacy.json).

The export is the only code that reads the private fine-tune checkpoint for publication; ``privimage sample``
and ``privimage evaluate`` read the release. It refuses an unfinished fine-tune and a checkpoint whose steps
``budget.json`` does not count.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from privimage.errors import RunDirError
from privimage.io import atomic_write, save_json
from privimage.rundir import RunDir

__all__ = ["GAN_MODEL_FORMAT", "MODEL_FORMAT", "RELEASE_DIR", "export_release", "load_release_denoiser",
           "load_release_generator", "refresh_privacy_statement"]

RELEASE_DIR = RunDir.RELEASE
MODEL_FORMAT = "privimage.edm-unet.v1"
GAN_MODEL_FORMAT = "privimage.gan-generator.v1"


def export_release(run_dir: RunDir | str | Path, *, log=print) -> Path:
    """Write ``run_dir/release/`` from the finished fine-tune (module docstring); returns the folder."""
    from privimage.privacy import FINETUNE

    run = RunDir.of(run_dir)
    state = run.load_checkpoint("finetune", model_kind=None)
    ckpt_path = run.checkpoint_path("finetune")
    if state["step"] < state["steps"]:
        raise RunDirError(f"{ckpt_path} is at step {state['step']} of {state['steps']}: the fine-tune is not "
                          f"finished. Finish it (`privimage finetune {run.path} --resume`) before exporting.")
    counted = run.load_budget().spent.get(FINETUNE, 0) if run.budget_path.is_file() else 0
    if counted < state["step"]:
        raise RunDirError(f"{run.budget_path} counts {counted} fine-tune steps but {ckpt_path} is at step "
                          f"{state['step']}: the ledger does not cover the model, so it is not exported.")
    if state["kind"] == "gan-finetune":
        _save_generator(state["ema"]["module"], state["gan"], run.release_model_path)
    else:
        _save_weights(state["ema"]["module"], state["unet"], run.release_model_path)
    if run.config_path.is_file():  # checked, then copied as it is (config.json is public)
        run.load_config()
        _copy(run.config_path, run.release_config_path)
    else:
        save_json(state.get("config") or {}, run.release_config_path)
    _copy_public_outputs(run)
    mechanism = _public_mechanism(state["mechanism"])
    _write_statement(run, mechanism)
    log(f"release: {run.release_dir} (model.safetensors, config.json, privacy.json, PRIVACY.md"
        + (", samples.png" if run.release_samples_path.is_file() else "") + ")")
    return run.release_dir


def _copy_public_outputs(run: RunDir) -> None:
    copies = {run.histogram_path: run.release_query_dir / run.histogram_path.name,
              run.selection_path: run.release_query_dir / run.selection_path.name,
              run.grid_path: run.release_samples_path}
    for src, dst in copies.items():
        if src.is_file():
            _copy(src, dst)


def _copy(src: Path, dst: Path) -> None:
    with atomic_write(dst) as f, open(src, "rb") as g:
        shutil.copyfileobj(g, f)


def _save_weights(ema_state: dict, unet: dict, path: Path) -> None:
    """The EMA denoiser's UNet tensors (``net.`` prefix dropped) as safetensors, atomically."""
    from safetensors.torch import save

    from privimage.diffusion import SIGMA_DATA

    tensors = {k[len("net."):]: v.detach().cpu().contiguous().clone() for k, v in sorted(ema_state.items())
               if k.startswith("net.")}  # sorted: the same weights give the same bytes
    metadata = {"format": MODEL_FORMAT, "unet_config": json.dumps(unet, sort_keys=True),
                "sigma_data": repr(SIGMA_DATA), "weights": "ema"}
    with atomic_write(path) as f:
        f.write(save(tensors, metadata=metadata))


def _save_generator(ema_state: dict, gan: dict, path: Path) -> None:
    """The EMA generator's tensors (spectral norm's parametrisations and power-iteration vectors included, so
    the loaded generator computes exactly what the EMA did) as safetensors, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sorted(ema_state.items())}
    metadata = {"format": GAN_MODEL_FORMAT, "gan_config": json.dumps(gan, sort_keys=True), "weights": "ema"}
    with atomic_write(path) as f:
        f.write(save(tensors, metadata=metadata))


def _read_release(run: RunDir, fmt: str, build):
    """``build(metadata, tensors)`` of ``release/model.safetensors`` in format ``fmt``; errors name the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from privimage.rundir import read_file

    def read(path: Path):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a foreign file
            raise ValueError(f"not a readable safetensors file: {err}") from None
        if meta.get("format") != fmt:
            raise ValueError(f"format {meta.get('format')!r}, expected {fmt!r} (config.json's kind and the "
                             f"release disagree?)")
        return build(meta, tensors)

    return read_file(run.release_model_path, read, missing=f"export the release first (`privimage export {run.path}`)",
                     fix=f"delete {run.release_dir} and run `privimage export {run.path}`")


def load_release_generator(run_dir: RunDir | str | Path, *, device="cpu"):
    """The GAN generator of ``run_dir/release/model.safetensors`` (a GAN run's release), in eval mode."""
    from privimage.models.gan import Generator

    def build(meta: dict, tensors: dict):
        return Generator.from_state(json.loads(meta["gan_config"]), tensors).to(device)

    return _read_release(RunDir.of(run_dir), GAN_MODEL_FORMAT, build)


def load_release_denoiser(run_dir: RunDir | str | Path, *, device="cpu"):
    """The EDM denoiser of ``run_dir/release/model.safetensors`` (eval mode)."""
    from privimage.diffusion import EDMDenoiser
    from privimage.models import UNet, UNetConfig

    def build(meta: dict, tensors: dict):
        net = UNet(UNetConfig.from_dict(json.loads(meta["unet_config"])))
        net.load_state_dict(tensors)
        return EDMDenoiser(net, sigma_data=float(meta["sigma_data"])).to(device).eval()

    return _read_release(RunDir.of(run_dir), MODEL_FORMAT, build)


# ------------------------------------------------------------------------------------------------------------
# The privacy statement

_FINETUNE_KEYS = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "num_noise", "expected_batch_size",
                  "num_examples", "secure")
#: A GAN fine-tune's mechanism: no noise draws (num_noise); the model kind and the generator's schedule instead.
_GAN_FINETUNE_KEYS = tuple(k for k in _FINETUNE_KEYS if k != "num_noise") + ("model", "d_steps_per_g_step")
_MECHANISM_TEXT = {
    "diffusion": "DP-SGD: Poisson-subsampled Gaussian on per-image clipped gradients (the K noise draws of an image "
                 "clipped together)",
    "gan": "DP-SGD on the discriminator: Poisson-subsampled Gaussian on per-image clipped gradients (each sensitive "
           "image paired with one fake from secret per-record draws, clipped together); the generator is updated "
           "from the noisy discriminator only (post-processing, no privacy cost)"}


def _public_mechanism(m: dict) -> dict:
    """The public keys of a fine-tune's recorded mechanism (a checkpoint's, or an earlier statement's)."""
    return {k: m[k] for k in (_GAN_FINETUNE_KEYS if m.get("model") == "gan" else _FINETUNE_KEYS)}


NOT_COVERED = [
    "delta: with probability up to delta the epsilon bound may fail; delta should be below 1/N.",
    "The guarantee is for adding or removing ONE sensitive image; several images of one person are protected "
    "only as a group (epsilon grows with the group size).",
    "Public inputs are assumed public: the config (settings and seeds of public work), the sensitive data set's "
    "size N and class count, the public data, the query classifier trained on it, and the choice of settings.",
    "Metrics computed on the sensitive training data without noise are not in the release (see the private "
    "report); metrics on held-out test images are computed without noise: epsilon says nothing about the test "
    "images.",
    "Timing: the wall time of fine-tune steps grows with the drawn (private) batch sizes; logs and timings stay "
    "private.",
    "Floating-point attacks on the Gaussian sampler (Mironov 2012) are not defended against.",
]
TEST_MODE = ("NOT PRIVATE: the run used the non-secure test mode (finetune.secure_noise = false). The Poisson "
             "sampling, the DP noise and the per-record randomness (diffusion noise, or the GAN's fakes) came from "
             "the PUBLIC seed, so anyone with config.json can replay them. Do not publish this model as private.")


def _statement(run: RunDir, finetune: dict) -> dict:
    from privimage.privacy import NON_PRIVATE_NOTE, QUERY
    from privimage.evaluate.privacy import generator_privacy, load_evaluation_ledger, privacy_summary
    from privimage.preflight import large_delta_note

    summary = privacy_summary(generator_privacy(run.path), load_evaluation_ledger(run.path), secure=finetune["secure"])
    gen, total = summary["generator"], summary["total"]
    large_delta = large_delta_note(total["delta"] if total else None, finetune.get("num_examples")) if total else None
    mechanisms = {"finetune": {"mechanism": _MECHANISM_TEXT[finetune.get("model", "diffusion")], **finetune}}
    query = gen["plan"].get(QUERY) if gen else None
    if query:
        info = run.load_selection() if run.selection_path.is_file() else {}
        mechanisms["query"] = {"mechanism": "Gaussian on the top-k vote histogram (one release)",
                               "noise_multiplier": query["noise_multiplier"], "releases": gen["ledger"].get(QUERY, 0),
                               **{k: info[k] for k in ("top_k", "l2_sensitivity", "noise_std") if k in info}}
    non_private = gen is not None and math.isinf(gen["epsilon_budget"])  # the sweep's reference point
    not_private = [NON_PRIVATE_NOTE] if non_private else [TEST_MODE] if not finetune["secure"] else []
    return {"guarantee": not_private[0] if not_private else "(epsilon, delta)-differential privacy of everything "
                         "in release/ with respect to adding or removing one sensitive training image",
            "private": not not_private,
            "epsilon": total["epsilon"] if total else None, "delta": total["delta"] if total else None,
            "epsilon_budget": gen["epsilon_budget"] if gen else None,
            "training": {k: gen[k] for k in ("epsilon_spent", "accountant", "ledger")} if gen else None,
            "evaluation": {k: summary["evaluation"][k] for k in ("epsilon", "releases")},
            "composition": summary["composition"], "mechanisms": mechanisms,
            "large_delta": large_delta, "not_covered": not_private + ([large_delta] if large_delta else [])
            + NOT_COVERED}


def _statement_markdown(s: dict) -> str:
    lines = ["# Privacy statement", ""]
    if not s["private"]:
        lines += [f"**{s['guarantee']}**", ""]
    if s.get("large_delta"):
        lines += [f"**{s['large_delta']}**", ""]
    eps = "unknown" if s["epsilon"] is None else f"{s['epsilon']:.4g}"
    lines += [f"Guarantee: {s['guarantee']}." if s["private"] else "Guarantee: none.", "",
              f"- epsilon = **{eps}** at delta = **{s['delta']:g}**" if s["delta"] is not None else "- epsilon unknown",
              f"- training: epsilon {s['training']['epsilon_spent']:.4g} ({s['training']['accountant']} "
              f"accountant, upper bound; releases: "
              + ", ".join(f"{k} {n}" for k, n in s["training"]["ledger"].items()) + ")" if s["training"] else
              "- training: unknown",
              f"- evaluation: epsilon {s['evaluation']['epsilon']:.4g} in {len(s['evaluation']['releases'])} "
              f"release(s); composition: {s['composition']}", "", "## Mechanisms", ""]
    for name, m in s["mechanisms"].items():
        lines.append(f"- **{name}**: {m['mechanism']}; " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                                                                     f"{k} {v}" for k, v in m.items()
                                                                     if k != "mechanism"))
    lines += ["", "## Not covered", ""] + [f"- {n}" for n in s["not_covered"]] + [""]
    return "\n".join(lines)


def _write_statement(run: RunDir, finetune: dict) -> None:
    statement = _statement(run, finetune)
    save_json(statement, run.release_privacy_path)
    with atomic_write(run.release_statement_path, "w") as f:
        f.write(_statement_markdown(statement))


def refresh_privacy_statement(run_dir: RunDir | str | Path) -> None:
    """Rewrite an existing release's privacy statement from the current ledgers (after an evaluation that
    released more); the fine-tune's mechanism is taken from the statement itself. No release: nothing."""
    from privimage.rundir import read_file

    run = RunDir.of(run_dir)
    if run.release_privacy_path.is_file():
        statement = read_file(run.release_privacy_path, lambda p: json.loads(p.read_bytes())["mechanisms"]["finetune"],
                              missing="", fix=f"delete {run.release_dir} and run `privimage export {run.path}`")
        _write_statement(run, _public_mechanism(statement))
