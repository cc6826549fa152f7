"""PNG plots of a `bench` run (matplotlib, headless): latency CDFs and offline throughput.

Reads the same records and counter samples as the report; draws, writes one file per
figure, and computes nothing the report does not already state.
"""

from __future__ import annotations

from pathlib import Path

from conserve_bench.bench.summary import PhaseResult

SMOOTH_S = 2.0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # NOTE: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(phases: list[PhaseResult], path: Path, config: dict) -> Path:
    """TTFT and TBT CDFs, one line per policy, with the SLOs as vertical lines."""
    plt = _pyplot()
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name, slo in ((axes[0], "TTFT", config["ttft_slo_ms"]), (axes[1], "TBT", config["tbt_slo_ms"])):
        for phase in phases:
            done = [r for r in phase.records if r.completed]
            values = [r.ttft_s for r in done] if name == "TTFT" else [g for r in done for g in r.tbt_s]
            if values:
                xs = sorted(v * 1e3 for v in values)
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=phase.policy)
        ax.axvline(slo, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo:.0f} ms")
        ax.set(xscale="log", xlabel=f"{name} (ms, client side)", ylabel="fraction of samples",
               title=f"online {name}", ylim=(0, 1.02))
        # NOTE: on a log axis spanning less than a decade or two matplotlib labels the minor
        # ticks too, and their labels run into each other: label 1-2-5 steps only.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_offline_throughput(phases: list[PhaseResult], path: Path) -> Path:
    """Offline tokens/s over time per phase, online arrivals as ticks along the bottom; one
    y-axis for all phases, so their heights compare at a glance."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(phases), 1, figsize=(10, 1.9 * len(phases) + 0.6), sharex=True,
                             sharey=True, squeeze=False)
    for ax, phase in zip(axes[:, 0], phases):
        ts, rates = _smoothed_rates(phase.samples)
        ax.plot(ts, rates, label=f"offline tok/s ({SMOOTH_S:g} s mean)")
        arrivals = [r.arrival_s for r in phase.records]
        if arrivals:
            ax.plot(arrivals, [0] * len(arrivals), "|", color="tab:red", markersize=12, label="online arrivals")
        ax.axvline(phase.window_s, color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel("tok/s")
        ax.set_title(phase.policy, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[0, 0].set_ylim(bottom=0)  # NOTE: shared by every panel (counters never go down)
    axes[-1, 0].set_xlabel("seconds since t=0 (the eval job is running)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smoothed_rates(samples) -> tuple[list[float], list[float]]:
    """Tokens/s over the SMOOTH_S before each sample (the counters move in commit batches)."""
    ts, rates, start = [], [], 0
    for b in samples[1:]:
        while samples[start].t_s < b.t_s - SMOOTH_S:
            start += 1
        a = samples[start]
        if b.t_s > a.t_s:
            ts.append(b.t_s)
            rates.append((b.tokens - a.tokens) / (b.t_s - a.t_s))
    return ts, rates
