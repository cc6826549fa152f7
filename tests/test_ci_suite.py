"""`ci` config files: every malformed key is one line naming file and key, exit 2, nothing written."""

from __future__ import annotations

import copy

import pytest
import yaml

from conserve_bench.ci.suite import CIConfigError, job_run_key, load_configs

VALID = {
    "model": "smollm2-135m",
    "limit": 5,
    "num_fewshot": 0,
    "tasks": {"mmlu_local_anatomy": {"metrics": {"acc": {"baseline": 0.4, "atol": 0.05}}}},
}
T = "tasks.mmlu_local_anatomy"
M = f"{T}.metrics.acc"


def mutated(path: str, value):
    """VALID with the value at dotted `path` replaced (or removed, for `...`)."""
    doc = copy.deepcopy(VALID)
    *parents, last = path.split("|")
    node = doc
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return doc


A = "tasks|mmlu_local_anatomy"
ACC = f"{A}|metrics|acc"

# (mutation path, new value, expected "key: problem" start of the message after the file name)
MALFORMED = [
    ("model", ..., "model: required"),
    ("model", 3, "model: required"),
    ("limt", 3, "limt: unknown key"),
    ("limit", 0, "limit: must be a whole number >= 1"),
    ("limit", "ten", "limit: must be a whole number >= 1"),
    ("num_fewshot", -1, "num_fewshot: must be a whole number >= 0"),
    ("gen_kwargs", "greedy", "gen_kwargs: must be a mapping"),
    ("data_dir", 5, "data_dir: must be text"),
    ("provenance", 3, "provenance: must be a mapping"),
    ("tasks", ..., "tasks: required"),
    ("tasks", ["mmlu_local_anatomy"], "tasks: must be a mapping"),
    ("tasks", {}, "tasks: at least one task"),
    (A, 5, f"{T}: must be a mapping"),
    (f"{A}|metricz", {}, f"{T}.metricz: unknown key"),
    (f"{A}|limit", 1.5, f"{T}.limit: must be a whole number >= 1"),
    (f"{A}|num_fewshot", True, f"{T}.num_fewshot: must be a whole number >= 0"),
    (f"{A}|gen_kwargs", [1], f"{T}.gen_kwargs: must be a mapping"),
    (f"{A}|samples", [], f"{T}.samples: must be a non-empty list"),
    (f"{A}|samples", [1, 1], f"{T}.samples: lists a document twice"),
    (f"{A}|samples", [-1], f"{T}.samples: must be a whole number >= 0"),
    (f"{A}|task_hash", 5, f"{T}.task_hash: must be text"),
    (f"{A}|metrics", ..., f"{T}.metrics: required"),
    (f"{A}|metrics", {}, f"{T}.metrics: at least one metric"),
    (f"{A}|metrics", ["acc", "acc,none"], f"{T}.metrics: names a metric twice"),
    (f"{A}|metrics", [3], f"{T}.metrics: metric names must be text"),
    (ACC, 0.4, f"{M}: must be a mapping"),
    (f"{ACC}|baseline", ..., f"{M}.baseline: required"),
    (f"{ACC}|baseline", "high", f"{M}.baseline: must be a number"),
    (f"{ACC}|baseline", float("nan"), f"{M}.baseline: must be a number"),
    (f"{ACC}|atol", ..., f"{M}: a tolerance is required"),
    (f"{ACC}|atol", -0.1, f"{M}.atol: must be 0 or more"),
    (f"{ACC}|rtol", 0.1, f"{M}: give atol or rtol, not both"),
    (f"{ACC}|tolerance", 0.1, f"{M}.tolerance: unknown key"),
    (f"{ACC}|wilson", 1.5, f"{M}.wilson: a confidence between 0 and 1"),
    (f"{ACC}|wilson", "yes", f"{M}.wilson: must be a number"),
    (f"{ACC}|higher_is_better", "yes", f"{M}.higher_is_better: must be true or false"),
    (f"{ACC}|n", 0, f"{M}.n: must be a whole number >= 1"),
    (f"{ACC}|stderr", -1, f"{M}.stderr: must be 0 or more"),
]


def write(tmp_path, doc, name="nightly.yaml"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def assert_refused(run_cli, tmp_path, config_args, expected: str, exit_code: int = 2):
    db, out, junit = tmp_path / "ci.db", tmp_path / "results", tmp_path / "junit.xml"
    code, stdout, stderr = run_cli("ci", *config_args, "--db", f"sqlite:///{db}", "--output", out,
                                   "--junit", junit, "--summary", tmp_path / "summary.md")
    lines = stderr.strip().splitlines()
    assert code == exit_code and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert stdout == ""
    assert not db.exists() and not out.exists() and not junit.exists()
    assert not (tmp_path / "summary.md").exists()


@pytest.mark.parametrize("path, value, expected", MALFORMED, ids=[m[2].split(":")[0] + f"={m[1]!r}" for m in MALFORMED])
def test_every_malformed_key_is_one_line_exit_2_nothing_written(run_cli, tmp_path,
                                                                path, value, expected):
    config = write(tmp_path, mutated(path, value))
    assert_refused(run_cli, tmp_path, [config], f"{config}: {expected}")


@pytest.mark.parametrize("text, expected", [
    ("tasks: [unclosed", "not valid YAML at line"),
    ("- just\n- a list\n", "(top level): must be a mapping"),
    ("", "(top level): must be a mapping, got nothing"),
])
def test_unreadable_files(run_cli, tmp_path, text, expected):
    config = write(tmp_path, text)
    assert_refused(run_cli, tmp_path, [config], f"{config}: {expected}")


def test_wilson_is_refused_for_a_metric_that_is_not_a_proportion(run_cli, tmp_path):
    doc = mutated(f"{A}|metrics", {"word_perplexity": {"baseline": 30.0, "rtol": 0.1, "wilson": 0.95}})
    config = write(tmp_path, doc)
    assert_refused(run_cli, tmp_path, [config],
                   f"{T}.metrics.word_perplexity.wilson: word_perplexity is not a proportion")
    doc = mutated(f"{ACC}|wilson", 0.95)
    doc["tasks"]["mmlu_local_anatomy"]["metrics"]["acc"]["higher_is_better"] = False
    assert_refused(run_cli, tmp_path, [write(tmp_path, doc)], f"{M}.wilson: gates a proportion from below")


def test_samples_and_limit_on_one_task(run_cli, tmp_path):
    doc = mutated(f"{A}|samples", [0, 2])
    doc["tasks"]["mmlu_local_anatomy"]["limit"] = 3
    config = write(tmp_path, doc)
    assert_refused(run_cli, tmp_path, [config], f"{config}: {T}.samples: give samples or limit, not both")


def test_bad_paths_and_flags(run_cli, tmp_path):
    config = write(tmp_path, VALID)
    assert_refused(run_cli, tmp_path, [tmp_path / "nope.yaml"], "nope.yaml: no such file or directory")
    (tmp_path / "empty").mkdir()
    assert_refused(run_cli, tmp_path, [tmp_path / "empty"], "no .yaml or .yml file")
    assert_refused(run_cli, tmp_path, [config, "--time-budget", "soon"], "--time-budget: 'soon'")
    assert_refused(run_cli, tmp_path, [config, "--deadline", "tomorrow"], "--deadline: 'tomorrow'")
    assert_refused(run_cli, tmp_path, [config, "--run-key", " "], "--run-key: must not be empty")


@pytest.mark.parametrize("change, expected", [
    (("tasks", {"mmlu_local_anatomie": {"metrics": ["acc"]}}), "tasks.mmlu_local_anatomie: unknown task"),
    (("data_dir", "no/such/dir"), "data_dir: data directory"),
    (("model", "/no/such/model"), "model: "),
    ((f"{A}|samples", [0, 100000]), f"{T}.samples: index 100000 is past the task's"),
])
def test_what_only_lm_eval_knows_is_checked_before_anything_runs(run_cli, tmp_path, data_dir,
                                                                 change, expected):
    doc = mutated(*change)
    doc.setdefault("data_dir", data_dir)
    doc["tasks"] = {k: {**v, "metrics": {"acc": {"baseline": 0.4, "atol": 0.1}}} for k, v in doc["tasks"].items()}
    config = write(tmp_path, doc)
    assert_refused(run_cli, tmp_path, [config], f"{config}: {expected}")


def test_an_unreachable_server_is_infrastructure_exit_3(run_cli, tmp_path):
    from conserve_bench.store.pgcluster import free_port

    config = write(tmp_path, VALID)
    assert_refused(run_cli, tmp_path, [config, "--server", f"http://127.0.0.1:{free_port()}", "--server-wait", "0.3"],
                   "cannot reach http://127.0.0.1:", exit_code=3)
    assert_refused(run_cli, tmp_path, [config, "--server", "127.0.0.1:8000"], "not an http:// or https:// URL")


def test_a_valid_file_and_a_directory_of_them(tmp_path):
    doc = copy.deepcopy(VALID)
    doc["tasks"]["mmlu_local_marketing"] = {"num_fewshot": 5, "metrics": ["acc"]}
    doc["tasks"]["mmlu_local_astronomy"] = {"samples": [7, 3], "metrics": {"acc": {"baseline": 0.5, "rtol": 0.1}}}
    write(tmp_path, doc, "a.yaml")
    write(tmp_path, VALID, "b.yml")
    (tmp_path / "notes.txt").write_text("not a config")
    with pytest.raises(CIConfigError, match="metrics.acc.baseline: required"):
        load_configs([str(tmp_path)])
    a, b = load_configs([str(tmp_path)], needs_baselines=False)
    assert [c.path for c in (a, b)] == [str(tmp_path / "a.yaml"), str(tmp_path / "b.yml")]
    anatomy, marketing, astronomy = a.tasks
    assert (anatomy.limit, anatomy.num_fewshot, anatomy.metrics[0].name) == (5, 0, "acc,none")
    assert (marketing.limit, marketing.num_fewshot, marketing.metrics[0].baseline) == (5, 5, None)
    assert (astronomy.limit, astronomy.samples, astronomy.metrics[0].tolerance()) == (None, (3, 7), pytest.approx(0.05))
    specs = a.job_specs()  # one job per distinct settings, in file order
    assert [(s.tasks, s.limit, s.num_fewshot, s.samples) for s in specs] == [
        (("mmlu_local_anatomy",), 5, 0, None), (("mmlu_local_marketing",), 5, 5, None),
        (("mmlu_local_astronomy",), None, 0, {"mmlu_local_astronomy": [3, 7]})]
    keys = [job_run_key("nightly-1", s) for s in specs]
    assert len(set(keys)) == 3 and all(k.startswith("nightly-1/") for k in keys)
    [b_again] = load_configs([str(tmp_path / "b.yml")], needs_baselines=False)  # the same file, read anew
    assert job_run_key("nightly-1", b_again.job_specs()[0]) == job_run_key("nightly-1", b.job_specs()[0])
