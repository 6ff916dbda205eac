"""What every released file is checked for (tests/privimage/test_release.py, and the GAN's run in
tests/privimage/pipeline/test_gan_run.py): no secret in any encoding, no private key name in any JSON file or
in the safetensors names and metadata."""

import json
from pathlib import Path

from safetensors import safe_open

#: JSON key paths allowed a name that is otherwise suspect, by file: the public config's seeds of public work
#: (DESIGN.md "Privacy boundaries"); in the public report, the seed of the CA classifier trained on the (public)
#: samples, the privacy section of the generator and whether its randomness was secure.
PUBLIC_KEYS = {"config.json": {("seed",), ("data", "seed")},
               "report.json": {("metrics", "classification_accuracy", "config", "seed"), ("options", "ca", "seed"),
                               ("privacy", "generator"), ("privacy", "secure_randomness")}}
FORBIDDEN_KEY_PARTS = ("sampler", "generator", "optimizer", "secret", "randomness", "rng", "state", "loss",
                       "images_per_s", "img_s", "nonfinite", "exp_avg", "log")


def key_encodings(key: int) -> dict[str, bytes]:
    """Every plausible way a 64-bit key could be written into a file."""
    return {"decimal": str(key).encode(), "hex": f"{key:x}".encode(), "HEX": f"{key:X}".encode(),
            "hex, 16 digits": f"{key:016x}".encode(), "HEX, 16 digits": f"{key:016X}".encode(),
            "little-endian bytes": key.to_bytes(8, "little"), "big-endian bytes": key.to_bytes(8, "big")}


def json_paths(obj, prefix=()):
    """Every (key path, value) in a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,), v
            yield from json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for v in obj:
            yield from json_paths(v, prefix)


def assert_release_holds_no_secret(release: Path, secrets: dict[str, bytes]) -> None:
    """No value of ``secrets`` (what -> bytes) in any file of ``release``; no private key name in its JSON files
    (seeds only where the public config keeps them) or its safetensors names and metadata."""
    for path in release.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for what, value in secrets.items():
                assert value not in blob, (path, what)
    for path in release.rglob("*.json"):
        for keys, value in json_paths(json.loads(path.read_text())):
            name = keys[-1].lower()
            if keys in PUBLIC_KEYS.get(path.name, ()):
                continue
            assert "seed" not in name, (path, keys)
            if path.name != "config.json":  # the config's keys are RunConfig's settings (log_every, ...): public
                assert not any(part in name for part in FORBIDDEN_KEY_PARTS), (path, keys)
    with safe_open(str(release / "model.safetensors"), framework="pt") as f:
        for name in [*f.keys(), *f.metadata()]:
            assert not any(part in name.lower() for part in (*FORBIDDEN_KEY_PARTS, "seed", "ema.")), name
