"""The release: the only part of a run directory that may be published (DESIGN.md "Privacy boundaries").

``privimage export RUN_DIR`` (and ``privimage run`` at its end) writes ``RUN_DIR/release/``::

    model.safetensors        the fine-tuned EMA weights of the UNet, nothing else; metadata: the format name,
                             the UNet config (JSON) and EDM's sigma_data
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
import shutil
from pathlib import Path

import torch

from privimage.io import atomic_write, save_json

__all__ = ["MODEL_FORMAT", "RELEASE_DIR", "export_release", "load_release_denoiser", "refresh_privacy_statement"]

RELEASE_DIR = "release"
MODEL_FORMAT = "privimage.edm-unet.v1"
_COPIED = {"query/histogram.npy": "query/histogram.npy", "query/selected_labels.json": "query/selected_labels.json",
           "samples/grid.png": "samples.png"}


def export_release(run_dir: str | Path, *, log=print) -> Path:
    """Write ``run_dir/release/`` from the finished fine-tune (module docstring); returns the folder."""
    from privimage.privacy import FINETUNE
    from privimage.train import load_checkpoint

    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoints" / "finetune.pt"
    state = load_checkpoint(ckpt_path)
    if state["step"] < state["steps"]:
        raise ValueError(f"{ckpt_path} is at step {state['step']} of {state['steps']}: the fine-tune is not "
                         f"finished. Finish it (`privimage finetune {run_dir} --resume`) before exporting.")
    budget_path = run_dir / "budget.json"
    counted = json.loads(budget_path.read_text())["spent"].get(FINETUNE, 0) if budget_path.is_file() else 0
    if counted < state["step"]:
        raise ValueError(f"{budget_path} counts {counted} fine-tune steps but {ckpt_path} is at step "
                         f"{state['step']}: the ledger does not cover the model, so it is not exported.")
    out = run_dir / RELEASE_DIR
    _save_weights(state["ema"]["module"], state["unet"], out / "model.safetensors")
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else \
        state.get("config")
    save_json(config or {}, out / "config.json")
    _copy_public_outputs(run_dir, out)
    mechanism = {k: state["mechanism"][k] for k in _FINETUNE_KEYS}
    _write_statement(run_dir, mechanism)
    log(f"release: {out} (model.safetensors, config.json, privacy.json, PRIVACY.md"
        + (", samples.png" if (out / "samples.png").is_file() else "") + ")")
    return out


def _copy_public_outputs(run_dir: Path, out: Path) -> None:
    for src, dst in _COPIED.items():
        if (run_dir / src).is_file():
            with atomic_write(out / dst) as f, open(run_dir / src, "rb") as g:
                shutil.copyfileobj(g, f)


def _save_weights(ema_state: dict, unet: dict, path: Path) -> None:
    """The EMA denoiser's UNet tensors (``net.`` prefix dropped) as safetensors, atomically."""
    from safetensors.torch import save

    from privimage.diffusion import SIGMA_DATA

    tensors = {k[len("net."):]: v.detach().cpu().contiguous().clone() for k, v in ema_state.items()
               if k.startswith("net.")}
    metadata = {"format": MODEL_FORMAT, "unet_config": json.dumps(unet, sort_keys=True),
                "sigma_data": repr(SIGMA_DATA), "weights": "ema"}
    with atomic_write(path) as f:
        f.write(save(tensors, metadata=metadata))


def load_release_denoiser(run_dir: str | Path, *, device="cpu"):
    """The EDM denoiser of ``run_dir/release/model.safetensors`` (eval mode)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from privimage.diffusion import EDMDenoiser
    from privimage.models import UNet, UNetConfig

    path = Path(run_dir) / RELEASE_DIR / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: export the release first (`privimage export {run_dir}`).")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {MODEL_FORMAT!r}.")
    net = UNet(UNetConfig.from_dict(json.loads(meta["unet_config"])))
    net.load_state_dict(tensors)
    return EDMDenoiser(net, sigma_data=float(meta["sigma_data"])).to(device).eval()


# ------------------------------------------------------------------------------------------------------------
# The privacy statement

_FINETUNE_KEYS = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "num_noise", "expected_batch_size",
                  "num_examples", "secure")

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
             "sampling, the DP noise and the diffusion randomness came from the PUBLIC seed, so anyone with "
             "config.json can replay them. Do not publish this model as private.")


def _statement(run_dir: Path, finetune: dict) -> dict:
    from privimage.privacy import QUERY
    from privimage.evaluate.privacy import generator_privacy, load_evaluation_ledger, privacy_summary

    summary = privacy_summary(generator_privacy(run_dir), load_evaluation_ledger(run_dir), secure=finetune["secure"])
    gen, total = summary["generator"], summary["total"]
    mechanisms = {"finetune": {"mechanism": "DP-SGD: Poisson-subsampled Gaussian on per-image clipped gradients "
                                            "(the K noise draws of an image clipped together)", **finetune}}
    query = gen["plan"].get(QUERY) if gen else None
    selected = Path(run_dir) / "query" / "selected_labels.json"
    if query:
        info = json.loads(selected.read_text()) if selected.is_file() else {}
        mechanisms["query"] = {"mechanism": "Gaussian on the top-k vote histogram (one release)",
                               "noise_multiplier": query["noise_multiplier"], "releases": gen["ledger"].get(QUERY, 0),
                               **{k: info[k] for k in ("top_k", "l2_sensitivity", "noise_std") if k in info}}
    return {"guarantee": "(epsilon, delta)-differential privacy of everything in release/ with respect to adding "
                         "or removing one sensitive training image" if finetune["secure"] else TEST_MODE,
            "private": bool(finetune["secure"]),
            "epsilon": total["epsilon"] if total else None, "delta": total["delta"] if total else None,
            "epsilon_budget": gen["epsilon_budget"] if gen else None,
            "training": {k: gen[k] for k in ("epsilon_spent", "accountant", "ledger")} if gen else None,
            "evaluation": {k: summary["evaluation"][k] for k in ("epsilon", "releases")},
            "composition": summary["composition"], "mechanisms": mechanisms,
            "not_covered": ([TEST_MODE] if not finetune["secure"] else []) + NOT_COVERED}


def _statement_markdown(s: dict) -> str:
    lines = ["# Privacy statement", ""]
    if not s["private"]:
        lines += [f"**{TEST_MODE}**", ""]
    eps = "unknown" if s["epsilon"] is None else f"{s['epsilon']:.4g}"
    lines += [f"Guarantee: {s['guarantee']}." if s["private"] else "Guarantee: none (test mode).", "",
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


def _write_statement(run_dir: Path, finetune: dict) -> None:
    statement = _statement(run_dir, finetune)
    out = run_dir / RELEASE_DIR
    save_json(statement, out / "privacy.json")
    with atomic_write(out / "PRIVACY.md", "w") as f:
        f.write(_statement_markdown(statement))


def refresh_privacy_statement(run_dir: str | Path) -> None:
    """Rewrite an existing release's privacy statement from the current ledgers (after an evaluation that
    released more); the fine-tune's mechanism is taken from the statement itself. No release: nothing."""
    path = Path(run_dir) / RELEASE_DIR / "privacy.json"
    if path.is_file():
        finetune = json.loads(path.read_text())["mechanisms"]["finetune"]
        _write_statement(Path(run_dir), {k: finetune[k] for k in _FINETUNE_KEYS})
