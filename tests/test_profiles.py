"""Stored latency profiles: round trip through the store, and never a profile from elsewhere."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from conserve_bench.errors import ProfileNotFoundError
from conserve_bench.sched.latency import FEATURES, FitError, LatencyModel
from conserve_bench.profiling.profiles import (Profile, ProfileKey, current_key, profile_for,
                                           refit_for, require_profile, save_profile, save_refit)
from conserve_bench.sched.refit import RefitStatus

from .conftest import cli

KEY = ProfileKey("smollm2-135m", "float32", "AMD EPYC (2 CPUs)", "0.32.0", 1)
MODEL = LatencyModel((0.04, 2e-3, 2.4e-3, 4e-6, 1e-6, 8e-4, 0.0),
                     FitError(0.05, 0.1, 0.2, num_samples=80))
HOLDOUT = FitError(0.06, 0.12, 0.3, num_samples=25)


def stored(store, key=KEY, model=MODEL) -> Profile:
    profile = Profile(key, model, num_samples=105, holdout_error=HOLDOUT)
    save_profile(store, profile)
    return profile


def test_profile_round_trips_through_the_store(store):
    saved = stored(store)
    loaded = profile_for(store, KEY)
    assert loaded is not None and loaded.created_at is not None
    assert replace(loaded, created_at=None) == saved
    assert loaded.train_error == MODEL.fit_error


def test_profiling_again_replaces_the_profile_of_that_key(store):
    stored(store)
    newer = LatencyModel((0.03, 1e-3, 2e-3, 3e-6, 1e-6, 7e-4, 0.0))
    stored(store, model=newer)
    assert profile_for(store, KEY).model == newer
    assert len(store.list_profiles()) == 1


@pytest.mark.parametrize("field, value", [("device", "NVIDIA H100 80GB HBM3"),
                                          ("vllm_version", "0.33.0"), ("dtype", "bfloat16"),
                                          ("parallel_size", 2)])
def test_a_profile_from_another_key_is_never_used(store, caplog, field, value):
    stored(store, replace(KEY, **{field: value}))
    with caplog.at_level(logging.WARNING, logger="conserve_bench.profiling.profiles"):
        assert profile_for(store, KEY) is None
    assert field in caplog.text and repr(value) in caplog.text
    with pytest.raises(ProfileNotFoundError) as error:
        require_profile(store, KEY)
    assert "\n" not in str(error.value) and field in str(error.value)


def test_no_profile_at_all_is_none_without_a_warning(store, caplog):
    stored(store, replace(KEY, model="other-model"))
    with caplog.at_level(logging.WARNING):
        assert profile_for(store, KEY) is None
    assert caplog.text == ""


def test_a_profile_of_an_older_latency_model_is_measured_again_not_used(store, caplog):
    """A store profiled before the `mixed` feature (version 1, six features): `serve` profiles
    again (profile_for: None, one warning), `profile --show` says why in one line."""
    older = {**MODEL.to_dict(), "version": 1, "features": list(FEATURES[:-1]),
             "coefficients": list(MODEL.coefficients[:-1])}
    store.save_profile(KEY.to_dict(), older, num_samples=105, fit_error={"holdout": None})
    status = RefitStatus(FitError(0.2, 0.3, 0.5, 96), FitError(0.02, 0.05, 0.1, 96), True, MODEL, 1, 200)
    store.save_refit(KEY.to_dict(), {**status.to_dict(), "refit": older})
    with caplog.at_level(logging.WARNING, logger="conserve_bench.profiling.profiles"):
        assert profile_for(store, KEY) is None
    assert "predates" in caplog.text and "conserve-bench profile" in caplog.text
    assert refit_for(store, KEY) is None
    with pytest.raises(ProfileNotFoundError, match="predates") as error:
        require_profile(store, KEY)
    assert "\n" not in str(error.value)
    stored(store)  # profiled again: used
    assert profile_for(store, KEY).model == MODEL


def test_key_differences_name_each_field():
    other = replace(KEY, device="x", parallel_size=2)
    assert KEY.differences(KEY) == []
    assert [d.split(":")[0] for d in KEY.differences(other)] == ["device", "parallel_size"]


def test_current_key_names_this_machine_and_vllm():
    key = current_key("smollm2-135m", "float32")
    assert key.device and key.device != "unknown"
    assert key.vllm_version.startswith("0.32.0")


def test_a_live_refit_is_kept_under_its_profiles_key_until_the_next_profile(store):
    stored(store)
    refit = LatencyModel((0.05, 2.5e-3, 2.4e-3, 4e-6, 1e-6, 8e-4, 0.0), FitError(0.02, 0.04, 0.1, 300))
    status = RefitStatus(FitError(0.2, 0.3, 0.5, 96), FitError(0.02, 0.05, 0.1, 96), True, refit,
                         num_refits=4, num_steps=700)
    save_refit(store, KEY, status)
    found, created_at = refit_for(store, KEY)
    assert found == status and created_at > 0
    assert refit_for(store, replace(KEY, device="other")) is None
    stored(store)  # profiling again: the old refit was fitted around the old profile
    assert refit_for(store, KEY) is None


@pytest.mark.parametrize("num_cpus, env, reserved, device", [
    (2, None, 0, "(2 CPUs, 0 reserved)"),      # a small host gives the model every CPU
    (32, None, None, "(32 CPUs)"),             # a large one keeps vLLM's default
    (2, "1", 1, "(2 CPUs, 1 reserved)"),       # the user's setting wins
])
def test_cpus_held_back_from_the_model_come_from_the_host_and_key_its_profiles(
        monkeypatch, num_cpus, env, reserved, device):
    import os

    import torch

    from conserve_bench.config import EngineConfig
    from conserve_bench.engine.local import RESERVED_CPU_ENV, engine_environment, reserved_cpus

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(num_cpus)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # engine_environment sets defaults
    if env is None:
        os.environ.pop(RESERVED_CPU_ENV, None)
    else:
        os.environ[RESERVED_CPU_ENV] = env
    assert reserved_cpus() == reserved
    assert current_key("smollm2-135m", "float32").device.endswith(device)
    engine_environment(EngineConfig(model_path="m", model_name="m"))  # what vLLM will read
    assert os.environ.get(RESERVED_CPU_ENV) == (None if reserved is None else str(reserved))


def test_a_malformed_reserved_cpu_setting_is_one_line(tmp_path):
    out = cli("profile", "--show", "--db", f"sqlite:///{tmp_path / 'store.db'}",
              env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "two"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: VLLM_CPU_NUM_OF_RESERVED_CPU must be a whole number of CPUs, got 'two'"]
