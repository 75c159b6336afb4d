"""What a search leaves in --save besides the profile: one CSV row per trial and a plot of the allocation."""
from __future__ import annotations

import csv
import io
from typing import Any

from .io import atomic_path, write_text
from .profile import Profile


def trial_row(t) -> dict[str, Any]:
    ua = t.user_attrs
    return {"number": t.number, "state": t.state.name, "value": t.value,
            "windows": ua.get("windows"), "stage": ua.get("stage"), "elite_mean": ua.get("elite_mean"),
            "pruner": ua.get("pruner"), "trial_seconds": ua.get("trial_seconds"),
            "eval_seconds": ua.get("eval_seconds"), "mean_sparsity": ua.get("mean_sparsity"),
            "realized_sparsity": ua.get("realized_sparsity"), "kv_avg_bits": ua.get("kv_avg_bits"),
            "feasible": ua.get("feasible"), "duplicate_of": ua.get("duplicate_of"),
            "layer_sparsity": ua.get("layer_sparsity"), "key_bits": ua.get("key_bits"),
            "value_bits": ua.get("value_bits")}


def write_trials_csv(path: str, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    cols = list(rows[0]) if rows else ["number"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (" ".join(f"{x:g}" for x in v) if isinstance(v, list) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


def plot_profile(path: str, profile: Profile, title: str) -> None:
    """Per-layer sparsity bars (target dashed) and, when present, KV bits per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(profile.num_layers))
    has_kv = profile.key_bits is not None
    fig, axes = plt.subplots(2 if has_kv else 1, 1, figsize=(max(6, 0.3 * len(layers) + 2), 5 if has_kv else 3),
                             sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.bar(layers, profile.sparsity or [0] * len(layers), color="tab:blue")
    if profile.target_sparsity is not None:
        ax.axhline(profile.target_sparsity, color="k", ls="--", lw=1, label=f"target {profile.target_sparsity:g}")
        ax.legend(loc="upper right")
        spread = max(abs(s - profile.target_sparsity) for s in (profile.sparsity or [profile.target_sparsity]))
        ax.set_ylim(max(0, profile.target_sparsity - spread - 0.05), min(1, profile.target_sparsity + spread + 0.05))
    ax.set_ylabel("sparsity")
    ax.set_title(title)
    if has_kv:
        axes[1][0].bar(layers, profile.key_bits, color="tab:orange", label="keys")
        if profile.value_bits is not None and profile.value_bits != profile.key_bits:
            axes[1][0].step(layers, profile.value_bits, where="mid", color="tab:green", label="values")
            axes[1][0].legend(loc="upper right")
        axes[1][0].set_ylabel("KV bits")
    axes[-1][0].set_xlabel("decoder layer")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
