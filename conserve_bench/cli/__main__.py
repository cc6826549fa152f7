"""`python -m conserve_bench.cli`: the `conserve-bench` console script."""

from conserve_bench.cli import main

# NOTE: the guard matters: vLLM's CPU build spawns its processes, which import this module
# again (as __mp_main__) and must not run the command a second time
if __name__ == "__main__":
    main()
