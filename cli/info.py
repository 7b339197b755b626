"""``oneencoder info``: what a model directory holds."""

from __future__ import annotations

from pathlib import Path

import typer

from oneencoder.checkpoint import modality_from_meta, read_meta, verify_files
from oneencoder.config import projection_from_dict
from oneencoder.errors import OneEncoderError

from ._common import echo, user_errors


def backbone_status(name: str, info: dict) -> str:
    """Whether the backbone the model was trained on is installed here, unchanged."""
    try:
        installed = modality_from_meta(name, info, check_weights=False).weights_sha256()
    except OneEncoderError as e:
        return f"backbone missing: {e}"
    if installed != info["weights_sha256"]:
        return f"backbone changed: installed weights sha256 {installed[:12]}... != recorded {info['weights_sha256'][:12]}..."
    return "backbone present, checksum OK"


@user_errors
def info(model: Path = typer.Argument(..., help="Model directory.")) -> None:
    """List modalities with their backbones, the stage history and its metrics; verify checksums.

    Example:  oneencoder info outputs/demo/model
    """
    meta = read_meta(model)  # checked: every key used below is there, with its type
    verify_files(model, meta)
    p = projection_from_dict(meta["projection"], f"{model}: projection")
    echo(f"{model}: d_model={meta['d_model']}, projection {p.layers} layer(s) x {p.heads} heads, "
         f"{len(meta['files'])} files, checksums OK")
    echo("modalities:")
    for name, m in meta["modalities"].items():
        echo(f"  {name:10s} backbone={m['backbone']}  dim={m['feature_dim']}  tokens<={m['max_tokens']}  "
             f"preprocess={m['preprocess_version']}  [{backbone_status(name, m)}]")
        if m.get("class"):
            dist = f" from {m['distribution']} {m.get('distribution_version', '')}" if m.get("distribution") else ""
            echo(f"  {'':10s} class={m['class']}{dist}")
    echo("stages:")
    for s in meta["stages"]:
        echo(f"  {s['name']:12s} {'+'.join(s['pair'])}  trained={','.join(s['trainable'])}  "
             f"n_train={s.get('n_train')}  {s.get('time', '')}")
        for key in [k for k in s if (k == "test" or k.startswith("test[")) and isinstance(s[k], dict)]:
            for direction, metrics in s[key].items():
                numbers = metrics if isinstance(metrics, dict) else {}
                shown = [k for k in ("R@1", "R@5", "R@10", "MRR") if isinstance(numbers.get(k), (int, float))]
                echo(f"    {key} {direction}: " + "  ".join(f"{k}={metrics[k]:.3f}" for k in shown))
