"""``oneencoder info``: what a model directory holds."""

from __future__ import annotations

from pathlib import Path

import typer

from oneencoder.checkpoint import read_meta, verify_files

from ._common import echo, user_errors


@user_errors
def info(model: Path = typer.Argument(..., help="Model directory.")) -> None:
    """List modalities with their backbones, the stage history and its metrics; verify checksums.

    Example:  oneencoder info outputs/demo/model
    """
    meta = read_meta(model)
    verify_files(model, meta)
    p = meta["projection"]
    echo(f"{model}: d_model={meta['d_model']}, projection {p['layers']} layer(s) x {p['heads']} heads, "
         f"{len(meta['files'])} files, checksums OK")
    echo("modalities:")
    for name, m in meta["modalities"].items():
        echo(f"  {name:10s} backbone={m['backbone']}  dim={m['feature_dim']}  tokens<={m['max_tokens']}  "
             f"preprocess={m['preprocess_version']}")
    echo("stages:")
    for s in meta["stages"]:
        echo(f"  {s['name']:12s} {'+'.join(s['pair'])}  trained={','.join(s['trainable'])}  "
             f"n_train={s.get('n_train')}  {s.get('time', '')}")
        for key in [k for k in s if k == "test" or k.startswith("test[")]:
            for direction, metrics in s[key].items():
                shown = [k for k in ("R@1", "R@5", "R@10", "MRR") if k in metrics]
                echo(f"    {key} {direction}: " + "  ".join(f"{k}={metrics[k]:.3f}" for k in shown))
