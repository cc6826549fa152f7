"""`python -m conserve_bench.cli`: the `conserve-bench` console script."""

# NOTE: everything under the guard: vLLM's CPU build spawns its engine-core and worker
# processes, which import this module again (as __mp_main__); they must neither run the command
# a second time nor pay for importing the CLI
if __name__ == "__main__":
    from conserve_bench.cli import main

    main()
