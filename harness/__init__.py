"""lm-eval integration: the `conserve` model backend.

`register()` adds `conserve` to lm-eval's model registry lazily ("module:Class"), so that
`lm_eval --model conserve` and `simple_evaluate(model="conserve")` find it without importing
vLLM until a model is actually built.
`lm.ConserveLM` is the plain adapter (what a job's run hands lm-eval), `modelargs` the
model_args it takes (lm-eval `vllm`'s), `backends` where its requests are computed, and
`session` the job, runner and engine an lm-eval run opens in its own process
(`--model conserve`).

NOTE: lm-eval 0.4.13 discovers models only through this registry (no entry points), so a
plain `lm_eval` never sees `conserve`; `conserve-bench lm-eval ARGS` registers it first and
then runs lm-eval's own command line with ARGS (`run_lm_eval`).
"""


def register() -> None:
    import lm_eval.models  # noqa: F401  (lm-eval's own backends, registered lazily)
    from lm_eval.api.registry import model_registry

    # NOTE: lm-eval imports `lm_eval.models` only while its registry is empty; registering
    # `conserve` first would otherwise hide `hf`, `vllm`, `local-completions`, ...
    if "conserve" not in model_registry:
        model_registry.register("conserve", target="conserve_bench.harness.lm:ConserveLM")


def run_lm_eval(args: list[str]) -> None:
    """lm-eval's own command line (`lm_eval ARGS`) with `conserve` registered.

    Every argument reaches lm-eval unchanged. Without `--include_path`, the task folder
    shipped with conserve-bench (e.g. `mmlu_local_*`) is added, so its tasks resolve by name.
    """
    import sys

    from lm_eval.__main__ import cli_evaluate

    from conserve_bench.tasks import TASKS_DIR

    register()
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args = [*args, "--include_path", str(TASKS_DIR)] if _is_run(args) else list(args)
    saved, sys.argv = sys.argv, ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


def _is_run(args: list[str]) -> bool:
    """Whether lm-eval will treat `args` as `run` (its default) rather than `ls`/`validate`."""
    return bool(args) and args[0] not in ("ls", "validate", "-h", "--help")
