"""`python -m conserve_bench.cli`: the `conserve-bench` console script."""

# NOTE: the guard matters: vLLM's CPU build spawns its engine-core and worker processes, which
# import this module again (as __mp_main__) and must not run the command a second time
if __name__ == "__main__":
    from conserve_bench.cli import main

    main()
