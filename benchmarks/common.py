"""What every benchmark shares: this host's `profile --quick` figures, engine start-up, the
measured file each run writes (`benchmarks/measured/<name>.json`), and markdown formatting.

A measured file is the record a docs table is generated from (`benchmarks.tables`): it must
name where and when it ran (host, date) and how (command, config), beside its result. This
module never measures anything itself but the host profile, and holds no benchmark's logic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MEASURED_DIR = REPO / "benchmarks" / "measured"
HOST_FIGURES = ("fixed_ms", "prefill_tokens_ms", "decodes_ms")  # the three `profile --quick` names


# --- the host ----------------------------------------------------------------------------------

def host_profile(db: str | None = None, measure: bool = True) -> dict[str, Any] | None:
    """This host's `profile --quick` figures (ms): fixed per step, per prefill token, per decode,
    and the other coefficients, beside the device the profile is keyed by. About a minute:
    run it before a benchmark's engines start, never beside them. `db`: the store to keep the
    profile in, for the benchmark's servers to load (None: a temporary one). `measure` False:
    the profile `db` already holds (the one its servers load), as it was measured; None if it
    holds none."""
    with tempfile.TemporaryDirectory() as tmp:
        db = db or f"sqlite:///{tmp}/profile.db"
        if measure:
            subprocess.run([sys.executable, "-m", "conserve_bench.cli", "profile", "--quick", "--db", db],
                           check=True, capture_output=True)
        from conserve_bench.errors import ProfileNotFoundError
        from conserve_bench.profiling.profiler import show_profile
        from conserve_bench.store import Store

        try:
            profile, _ = show_profile(Store(db), "smollm2-135m")
        except ProfileNotFoundError:
            if measure:
                raise
            return None
    coefficients = dict(zip(profile.model.to_dict()["features"], profile.model.coefficients))
    return {"device": profile.key.device, **{f"{k}_ms": round(v * 1e3, 3) for k, v in coefficients.items()}}


def host_line(host: dict[str, Any] | None) -> str:
    """'2-core Xeon, `profile --quick` 43.1 ms fixed per step, ...' (what is known of it)."""
    if not host:
        return "an unrecorded host"
    figures = [host.get(k) for k in HOST_FIGURES]
    device = host.get("device") or "host not named"
    if all(f is None for f in figures):
        return device
    fixed, prefill, decode = (_g(f) for f in figures)
    return (f"{device}, `profile --quick` {fixed} ms fixed per step, {prefill} ms per prefill token, "
            f"{decode} ms per decode")


def _g(value) -> str:
    return "?" if value is None else f"{value:g}"


# --- engines -----------------------------------------------------------------------------------

def start_engine(model, *, step_log: str | Path | None = None, policy=None, connector=None, **fields):
    """An in-process engine of `model` (`resolve_model`'s). With a `step_log`, a `policy`
    (`PolicyConfig`) or a `connector` (`ConnectorConfig`), vLLM loads ConserveScheduler (and the
    connector): `vllm_plugin.overrides.engine_overrides`. `fields`: other `EngineConfig` fields."""
    from conserve_bench.engine.local import start_engine as start

    if step_log is None and policy is None and connector is None:
        return start(model, **fields)
    from conserve_bench.vllm_plugin.overrides import engine_overrides

    return start(model, **engine_overrides(step_log=step_log, policy=policy, connector=connector), **fields)


# --- the measured file -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Measured:
    """One benchmark run as committed under benchmarks/measured/. `host`: `host_profile()`'s
    figures (None: not profiled); `source`: set when the numbers were transcribed from an older
    document rather than written by the run; `notes`: what the record lacks or qualifies."""

    benchmark: str
    date: str | None
    command: str | None
    host: dict[str, Any] | None
    config: dict[str, Any]
    result: dict[str, Any]
    source: str | None = None
    notes: str | None = None

    @classmethod
    def read(cls, path: str | Path) -> Measured:
        data = json.loads(Path(path).read_text())
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown fields {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None or k not in ("source", "notes")}


def measured_path(name: str) -> Path:
    return MEASURED_DIR / f"{name}.json"


def add_measured_args(parser: argparse.ArgumentParser, name: str) -> None:
    """`--measured PATH` (where the run's record goes) and `--no-profile` (skip the host's
    `profile --quick`), the same in every benchmark."""
    parser.add_argument("--measured", default=str(measured_path(name)),
                        help=f"Where the run's record goes [benchmarks/measured/{name}.json]; "
                             "give another path for a smoke run.")
    parser.add_argument("--no-profile", action="store_true",
                        help="Skip this host's `profile --quick` (about a minute) before the run.")


def measure_host(args: argparse.Namespace) -> dict[str, Any] | None:
    return None if getattr(args, "no_profile", False) else host_profile()


def write_measured(name: str, result: dict[str, Any], args: argparse.Namespace | dict,
                   host: dict[str, Any] | None, path: str | Path | None = None) -> Path:
    """Write one run's record (`Measured`) to `path` [benchmarks/measured/<name>.json]."""
    config = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    path = Path(path or getattr(args, "measured", None) or measured_path(name))
    record = Measured(benchmark=name, date=time.strftime("%Y-%m-%d %H:%M"),
                      command=shlex.join(["python", "-m", f"benchmarks.{name}", *sys.argv[1:]]),
                      host=host, config=_plain(config), result=result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record.to_dict(), indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return path


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able entries of a config (argparse namespaces may carry live objects)."""
    plain = (str, int, float, bool, list, tuple, dict, type(None))
    return {k: v for k, v in config.items() if isinstance(v, plain) and k not in ("measured", "no_profile")}


# --- markdown ----------------------------------------------------------------------------------

def md_table(header: tuple[str, ...] | list[str], rows: list[tuple[str, ...]] | list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def num(value, digits: int = 0, scale: float = 1.0) -> str:
    """`value * scale` with `digits` decimals and thousands separators; '-' for None."""
    return "-" if value is None else f"{value * scale:,.{digits}f}"


def pct(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def times(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def yes(value) -> str:
    return "-" if value is None else ("yes" if value else "**no**")
