"""`python -m conserve_bench.cli`: the `conserve-bench` console script."""

# NOTE: the guard matters: vLLM spawns its engine-core process (the worker runs in it, see
# `engine.local.executor_backend`), which imports this module again (as __mp_main__) and must
# not run the command a second time
if __name__ == "__main__":
    from conserve_bench.cli import main

    main()
