"""lm-eval integration: the `conserve` model backend.

`register()` adds `conserve` to lm-eval's model registry lazily ("module:Class"), so that
`lm_eval --model conserve` and `simple_evaluate(model="conserve")` find it without importing
vLLM until a model is actually built.
"""


def register() -> None:
    from lm_eval.api.registry import model_registry

    if "conserve" not in model_registry:
        model_registry.register("conserve", target="conserve_bench.harness.lm:ConserveLM")
