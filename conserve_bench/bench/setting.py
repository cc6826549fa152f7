"""What one `bench` run is: its settings (`BenchSetting`, checked once) and its policies, each
entry `POLICY` or `POLICY:FLAGS` (`PolicyRun`)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace

from conserve_bench.config import DEFAULT_MODEL, ServePolicy
from conserve_bench.errors import ConserveError

ARRIVALS = ("trace", "gamma")


class BenchSettingError(ConserveError):
    pass


@dataclass(frozen=True)
class PolicyRun:
    """One `--policies` entry: `POLICY`, or `POLICY:FLAGS` to run it with its own `serve`
    flags (space-separated, after every `--serve-arg`), so one policy can run twice side by
    side: "conserve,conserve:--layer-preemption=off". The entry as written is its label."""

    label: str
    policy: ServePolicy
    serve_args: tuple[str, ...] = ()
    entry: str = ""  # the entry as written: the label, less `#N` in round N > 1 (`--rounds`)

    def __post_init__(self):
        if not self.entry:
            object.__setattr__(self, "entry", self.label)

    def in_round(self, num: int) -> PolicyRun:
        """This entry's run in round `num` (from 1) of `--rounds`: labelled `<entry>#<num>` after the first."""
        return replace(self, label=self.entry if num == 1 else f"{self.entry}#{num}")

    @classmethod
    def parse(cls, entry: str) -> PolicyRun:
        policy, _, flags = entry.partition(":")
        try:
            run = cls(entry.strip(), ServePolicy(policy.strip()), tuple(shlex.split(flags)))
        except ValueError:
            raise BenchSettingError(f"unknown policy {policy.strip()!r} in --policies entry {entry!r}: "
                                   f"use {ServePolicy.names()}") from None
        if run.serve_args[:1] and not run.serve_args[0].startswith("--"):
            raise BenchSettingError(f"--policies entry {entry!r}: after ':' come `serve` flags "
                                   "such as --layer-preemption=off")
        return run

    @property
    def folder(self) -> str:
        """The phase's folder name: the label, filesystem-safe."""
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", self.label)


@dataclass(frozen=True)
class BenchSetting:
    """One benchmark run. Token counts are scaled by `token_scale`, then capped."""

    policies: tuple[str, ...] = tuple(p.value for p in (ServePolicy.ONLINE_ONLY, ServePolicy.PRIORITY,
                                                         ServePolicy.CONSERVE))
    trace: str | None = None
    arrivals: str = "trace"  # "trace": the trace's own timestamps; "gamma": a Gamma process
    cv: float = 2.0  # Gamma inter-arrival CV (burstiness; 1 is Poisson)
    trace_offset: int = 0  # skip this many trace requests
    rate: float | None = None  # online requests/s; or
    load: float | None = 0.5  # a fraction of the measured online capacity
    duration_s: float = 30.0  # the replay window (and the offline throughput window)
    token_scale: float = 0.125
    max_context_tokens: int = 512
    max_generated_tokens: int = 64
    capacity_requests: int = 24
    capacity_concurrency: int = 8
    drain_timeout_s: float = 30.0  # wait for online requests after the last arrival
    offline_tasks: tuple[str, ...] = ("mmlu",)
    offline_limit: int | None = 20  # documents per task (MMLU: 57 subjects x 20 questions)
    num_fewshot: int | None = None
    data_dir: str | None = None
    long_prompts: int = 0  # extra offline generations with long prompts (KV-cache pressure)
    long_prompt_tokens: int = 1536
    long_generated_tokens: int = 128
    ttft_slo_ms: float | None = None  # None: from this machine's latency profile, as `serve`
    tbt_slo_ms: float | None = None
    max_offline_inflight: int = 32
    model: str = DEFAULT_MODEL
    server: str | None = None  # an existing server: phases run on it, nothing is restarted
    api_key: str | None = None
    seed: int = 0
    output_dir: str = "results"
    profile_db: str | None = None  # where this machine's latency profile is kept between runs
    serve_args: tuple[str, ...] = ()  # passed through to every `serve`
    kv_checkpoint_gib: float | None = None  # given to every conserve `serve`; None: its default
    rounds: int = 1  # the policies run this many times, alternated, and are pooled over rounds

    def __post_init__(self):
        if not self.policies:
            raise BenchSettingError(f"--policies is empty: use {ServePolicy.names()}")
        labels = [run.label for run in self.policy_runs]
        if len(set(labels)) < len(labels):
            raise BenchSettingError(f"--policies names an entry twice: {','.join(self.policies)}")
        if self.server and any(run.serve_args for run in self.policy_runs):
            raise BenchSettingError("with --server, a --policies entry cannot carry `serve` flags")
        if self.arrivals not in ARRIVALS:
            raise BenchSettingError(f"--arrivals must be one of {', '.join(ARRIVALS)}")
        if (self.rate is None) == (self.load is None):
            raise BenchSettingError("give exactly one of --rate and --load")
        if self.trace is None and self.arrivals == "trace":
            raise BenchSettingError("--trace is required unless --arrivals gamma")
        if not (isinstance(self.rounds, int) and self.rounds >= 1):
            raise BenchSettingError(f"--rounds must be >= 1, got {self.rounds!r}")
        if self.server and self.rounds > 1:
            raise BenchSettingError("--rounds alternates fresh servers: not with --server")
        if self.server and len(self.policies) != 1:
            raise BenchSettingError("with --server, --policies names the one policy that server runs")
        if min(self.rate or 1, self.load or 1, self.duration_s, self.token_scale, self.cv) <= 0:
            raise BenchSettingError("--rate, --load, --duration-s, --token-scale and --cv must be positive")

    @property
    def policy_runs(self) -> tuple[PolicyRun, ...]:
        """Every phase after the baseline, in run order: each entry once per round, the rounds
        one after another (online-only, conserve, online-only#2, conserve#2, ...)."""
        entries = [PolicyRun.parse(entry) for entry in self.policies]
        return tuple(run.in_round(num) for num in range(1, self.rounds + 1) for run in entries)
