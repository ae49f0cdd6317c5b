"""The demo's figures (matplotlib, Agg backend): attention heatmaps, mass by factor type, training curves."""
from __future__ import annotations

COLORS = {"vanilla": "tab:gray", "cat": "tab:red"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attention_maps(path: str, maps: dict, tokens: list[str], title: str) -> str:
    """Side-by-side heatmaps of one sample's layer/head-averaged attention map per method (paper fig. 5).

    ``maps``: method -> (T, T) array. Colours are on a square-root scale so small masses stay visible."""
    import numpy as np
    from matplotlib.colors import PowerNorm

    plt = _plt()
    fig, axes = plt.subplots(1, len(maps), figsize=(7.5 * len(maps), 7.5), squeeze=False)
    T = len(tokens)
    tokens = [t if len(t) <= 16 else t[:14] + "…" for t in tokens]  # a whole-sentence token would crowd the axes
    for ax, (method, m) in zip(axes[0], maps.items()):
        m = np.asarray(m)[:T, :T]
        im = ax.imshow(m, cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=max(float(m.max()), 1e-6)))
        ax.set_title(f"{method}: averaged attention (layers x heads)")
        ax.set_xticks(range(T), tokens, rotation=90, fontsize=5)
        ax.set_yticks(range(T), tokens, fontsize=5)
        ax.set_xlabel("key token")
        ax.set_ylabel("query row")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


def factor_mass(path: str, per_method: dict, kinds=("causal", "spurious", "irrelevant")) -> str:
    """Box plots of the answer row's attention mass on each factor type, per method (paper fig. 3).

    ``per_method``: method -> {kind: list of per-sample masses (OOD samples, all seeds)}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(per_method))
    for i, (method, masses) in enumerate(per_method.items()):
        pos = [k + (i - (len(per_method) - 1) / 2) * width for k in range(len(kinds))]
        bp = ax.boxplot([masses[k] for k in kinds], positions=pos, widths=width * 0.9, patch_artist=True,
                        showfliers=False)
        for box in bp["boxes"]:
            box.set_facecolor(COLORS.get(method, "tab:blue"))
            box.set_alpha(0.6)
        ax.plot([], [], color=COLORS.get(method, "tab:blue"), lw=8, alpha=0.6, label=method)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylabel("attention mass at the answer row")
    ax.set_title("Where the answer row looks (OOD test, layer/head average)")
    ax.legend()
    return _save(plt, fig, path)


def training_curves(path: str, curves: dict) -> str:
    """LM loss, Re-Attention loss and mean ratio R over training steps; ``curves``: method -> list over
    seeds of logged points (dicts with step, lm_loss, attn_loss, ratio_mean: CATTrainer's log keys)."""
    plt = _plt()
    keys = [("lm_loss", "LM loss (answer tokens)", True), ("attn_loss", "Re-Attention hinge loss", False),
            ("ratio_mean", "mean ratio R = C/N at annotated rows", True)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    for ax, (key, label, logy) in zip(axes, keys):
        for method, runs in curves.items():
            for j, run in enumerate(runs):
                ax.plot([p["step"] for p in run], [p[key] for p in run], color=COLORS.get(method, "tab:blue"),
                        alpha=0.8, lw=1, label=method if j == 0 else None)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        if logy:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def variant_accuracy(path: str, per_method: dict) -> str:
    """Grouped bars: accuracy per test variant and method (mean over seeds, dots = seeds);
    ``per_method``: method -> {variant: list of per-seed accuracies}."""
    plt = _plt()
    variants = list(next(iter(per_method.values())))
    colors = {"zero_shot": "tab:purple", "vanilla": "tab:gray", "capt": "tab:green", "capt_order": "tab:olive"}
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(per_method)
    for i, (method, accs) in enumerate(per_method.items()):
        xs = [k + (i - (len(per_method) - 1) / 2) * width for k in range(len(variants))]
        means = [100 * sum(accs[v]) / len(accs[v]) for v in variants]
        ax.bar(xs, means, width * 0.9, color=colors.get(method, "tab:blue"), alpha=0.8, label=method)
        for x, v in zip(xs, variants):
            ax.plot([x] * len(accs[v]), [100 * a for a in accs[v]], "k.", ms=4)
    ax.axhline(50, color="k", lw=0.8, ls=":", label="chance")
    ax.set_xticks(range(len(variants)), variants)
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    ax.set_title("Deduction test variants: accuracy per method (bars: mean, dots: seeds)")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)
