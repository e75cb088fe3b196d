"""Throughput against N and against K, one panel pair per (op, dtype), one line per implementation
(matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections import Counter


def _rate(row):
    for key, unit in (("gflops", "GFLOP/s"), ("gbps", "GB/s"), ("bases_per_s", "bases/s")):
        if row.get(key) is not None:
            return row[key], unit
    return None, None


def _scalar_k(shape):
    k = shape.get("K")
    return sum(k) if isinstance(k, list) else k


def plot_results(rows: list[dict], path: str, title: str = "") -> str:
    """Write a PNG to `path`: for each (op, device, dtype), throughput against N at the most
    measured K (left) and against K at the most measured N (right). Returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = {}
    for r in rows:
        if "N" in r["shape"]:
            groups.setdefault((r["op"], r["device"], r["dtype"]), []).append(r)
    if not groups:
        raise ValueError("no results with an N dimension to plot")
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.2 * len(groups)), squeeze=False)
    for ax_row, ((op, device, dtype), grp) in zip(axes, groups.items()):
        common_k = Counter(_scalar_k(r["shape"]) for r in grp).most_common(1)[0][0]
        common_n = Counter(r["shape"]["N"] for r in grp if _scalar_k(r["shape"]) != common_k).most_common(1)
        sweeps = [("N", lambda r: _scalar_k(r["shape"]) == common_k, f"K={common_k}")]
        if common_n:
            n0 = common_n[0][0]
            sweeps.append(("K", lambda r, n0=n0: r["shape"]["N"] == n0, f"N={n0}"))
        for ax, (axis, keep, fixed) in zip(ax_row, sweeps):
            unit = None
            for impl in dict.fromkeys(r["backend"] for r in grp):
                pts = sorted(
                    ((r["shape"]["N"] if axis == "N" else _scalar_k(r["shape"])), _rate(r)[0])
                    for r in grp if r["backend"] == impl and keep(r)
                )
                unit = unit or next((_rate(r)[1] for r in grp), None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(axis)
            ax.set_ylabel(unit or "")
            ax.set_title(f"{op} {device} {dtype} ({fixed})", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        if len(sweeps) == 1:
            ax_row[1].set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
