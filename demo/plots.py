"""PNG figures of the demo and the benchmark (matplotlib, imported lazily, Agg backend: no display needed)."""

from __future__ import annotations

import math
import os

import numpy as np
from torch import Tensor


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_labelled_grid(rows: list[tuple[str, Tensor]], path: str, column_titles: list[str] | None = None,
                       scale: int = 3) -> str:
    """One PNG: each row a (label, images (N, 1|3, H, W) in [-1, 1]) pair, images side by side."""
    plt = _pyplot()
    columns = max(images.shape[0] for _, images in rows)
    height, width = rows[0][1].shape[-2:]
    figure, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.32 * scale + 1.6, len(rows) * 0.32 * scale),
                                squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(columns):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c < images.shape[0]:
                image = ((images[c].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
                axis.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            if c == 0:
                axis.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0 and column_titles and c < len(column_titles):
                axis.set_title(column_titles[c], fontsize=7)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def smooth(values: list[float], window: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(array) < window:
        return array
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, array[0]), array])
    return np.convolve(padded, kernel, mode="valid")


def save_training_curves(entries: list[dict], path: str, title: str = "") -> str:
    """The trainer's metrics.jsonl as one panel per quantity (raw, and a moving average)."""
    plt = _pyplot()
    panels = [("losses", ["loss_generator", "loss_fake", "loss_mean_variance_kl"]),
              ("update terms |CA|, |DM|", ["ca_magnitude", "dm_magnitude"]),
              ("gradient norms", ["grad_norm_student", "grad_norm_fake"]),
              ("student output mean", ["gen_mean"]),
              ("student output variance, per student step", ["gen_var"]),
              ("re-noise levels", ["tau_ca", "tau_dm"])]
    for entry in entries:
        if entry.get("gen_std") is not None:  # null: a non-finite value (trainer.outputs.metrics_line)
            entry["gen_var"] = entry["gen_std"] ** 2
    steps = [entry["step"] for entry in entries]
    figure, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    window = max(1, len(entries) // 25)
    for axis, (name, keys) in zip(axes.flat, panels):
        for key in keys:
            if not entries or any(key not in entry for entry in entries):
                continue
            values = [math.nan if entry[key] is None else entry[key] for entry in entries]
            if key == "gen_var" and all("student_step" in entry for entry in entries):
                # one line per student step: a late step that washes out or saturates its images shows here
                for index in sorted({int(entry["student_step"]) for entry in entries}):
                    picked = [(s, v) for s, v, e in zip(steps, values, entries) if int(e["student_step"]) == index]
                    xs, ys = zip(*picked)
                    axis.plot(xs, smooth(list(ys), max(1, window // 4)), label=f"step {index + 1}")
                continue
            line, = axis.plot(steps, values, alpha=0.25, linewidth=0.8)
            axis.plot(steps, smooth(values, window), color=line.get_color(), label=key)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("generator update", fontsize=8)
        if axis.lines:
            axis.legend(fontsize=7)
        if name in ("losses", "gradient norms") and axis.lines:
            axis.set_yscale("log")
    figure.suptitle(title or "training curves (logs/metrics.jsonl)")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def save_metric_curves(series: dict[str, list[list[dict]]], metrics: list[tuple[str, str]], path: str,
                       title: str = "", floors: dict[str, float] | None = None, columns: int = 3) -> str:
    """Benchmark figure (as the paper's Fig. 2/3): per variant, the mean over seeds of each metric against the
    generator update, with the seed spread (min..max) shaded. `series[name]` is one history per seed."""
    plt = _pyplot()
    columns = min(columns, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False)
    for axis, (key, label) in zip(axes.flat, metrics):
        for index, (name, histories) in enumerate(series.items()):
            colour = f"C{index % 10}"  # one colour per variant in every panel (the shading must not shift the cycle)
            steps = [entry["step"] for entry in histories[0]]
            values = np.array([[entry.get(key, np.nan) for entry in h[:len(steps)]] for h in histories], dtype=float)
            mean = np.nanmean(values, axis=0)
            axis.plot(steps, mean, marker=".", label=name, color=colour)
            if len(histories) > 1:
                axis.fill_between(steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=colour,
                                  alpha=0.15)
        if floors and key in floors:
            axis.axhline(floors[key], color="gray", linestyle="--", linewidth=1, label="teacher noise floor")
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("generator update", fontsize=8)
        if key.endswith("frechet"):
            axis.set_yscale("log")
    for axis in list(axes.flat)[len(metrics):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path



QUALITY_PANELS = (("frechet", "Frechet to the 50-step CFG teacher"), ("accuracy_texture", "texture accuracy"))


def save_quality_against_calls(rows: dict[str, dict], path: str, floor: float | None = None,
                               metrics: tuple[tuple[str, str], ...] = QUALITY_PANELS) -> str:
    """Quality against network calls: one line per sampler ('<sampler> <k> steps (<n> calls)' rows; students,
    rows whose name starts with 'student', as stars); Frechet with its bootstrap interval (a band), or with
    `<metric>_sd` (a student's spread over training seeds) as error bars, on log axes."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    lines: dict[str, list[tuple[int, dict]]] = {}
    for name, row in rows.items():
        if "calls" not in row:
            continue
        sampler = row.get("line", name.split(" ")[0])
        lines.setdefault(sampler, []).append((row["calls"], row))
    for axis, (key, label) in zip(axes[0], metrics):
        for sampler, points in sorted(lines.items()):
            points.sort(key=lambda point: point[0])
            calls = [c for c, _ in points]
            values = [row[key] for _, row in points]
            student = sampler.startswith("student")
            style = dict(marker="*", markersize=14, linestyle="--") if student else dict(marker="o")
            drawn = axis.plot(calls, values, label=sampler, **style)[0]
            interval = f"{key}_interval"
            if all(f"{key}_sd" in row for _, row in points):
                axis.errorbar(calls, values, yerr=[row[f"{key}_sd"] for _, row in points], fmt="none", capsize=4,
                              color=drawn.get_color())
            elif all(interval in row for _, row in points):
                low = [row[interval][0] for _, row in points]
                high = [row[interval][1] for _, row in points]
                axis.fill_between(calls, low, high, alpha=0.15, color=drawn.get_color())
        if key == "frechet":
            axis.set_yscale("log")
            if floor:
                axis.axhline(floor, color="grey", linestyle=":", label="noise floor")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("network calls per image")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
