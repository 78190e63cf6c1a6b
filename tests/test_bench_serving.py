"""scripts/bench_serving.py end to end on the CPU at a tiny size: the default scenarios run, rows and files are written."""
import json
from pathlib import Path

import pytest
from cli import load_script

pytest.importorskip("litserve", reason="the serve extra is not installed (pip install -e .[serve])")


@pytest.mark.slow
def test_bench_serving_runs_every_scenario(tmp_path, monkeypatch):
    bench = load_script("bench_serving", monkeypatch)
    monkeypatch.chdir(tmp_path)
    # full-compiled is left out: its package build (a minute or more here) is tested in test_compiled_export.py
    rows = bench.main(["--configs", "tiny", "--devices", "cpu", "--scenarios", ",".join(bench.DEFAULT_SCENARIOS),
                       "--requests", "3", "--warmup", "1", "--batch-users", "16", "--throughput-batches", "2",
                       "--out", str(tmp_path / "results" / "serving")])
    scenarios = [(r.scenario, r.transport.split(",")[0]) for r in rows]
    assert [s for s, _ in scenarios] == ["throughput-host"] * 4 + ["full", "hit-199+1", "hit-100+1", "slide",
                                         "throughput-engine",
                                         "throughput-engine", "throughput", "throughput", "http-full",
                                         "http-hit-199+1"]
    assert all(r.cuda_graphs == "-" for r in rows)  # the CPU has no CUDA graphs
    by_name = {r.scenario: r for r in rows}
    assert all(r.requests == 3 and r.p50_ms > 0 for r in rows if not r.scenario.startswith("throughput"))
    assert "cache hit x3" in by_name["hit-199+1"].path and "window slid" in by_name["slide"].path
    assert "cache hit x3" in by_name["http-hit-199+1"].path
    assert all(r.users_per_s > 0 for r in rows if r.scenario.startswith("throughput"))
    assert "whole window, cache off" in by_name["throughput-engine"].path
    assert [r.transport for r in rows[:4]] == [f"{call}, histories as {form}, device step stubbed"
                                               for form in ("lists", "arrays")
                                               for call in ("infer_batch(), cache off", "recommend()")]
    assert len(json.loads((tmp_path / "results" / "serving.json").read_text())) == len(rows)
    assert (tmp_path / "results" / "serving.csv").read_text().count("\n") == len(rows) + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # nothing else written


def test_bench_serving_full_compiled_builds_the_package_of_its_export(tmp_path, monkeypatch):
    """The full-compiled scenario exports the model and asks for its package on the bench's device;
    the build itself (a minute or more on a CPU) is replaced here and tested in test_compiled_export.py."""
    import hstu.serving.compiled

    bench = load_script("bench_serving", monkeypatch)
    builds = []
    monkeypatch.setattr(hstu.serving.compiled, "compile_export",
                        lambda folder, device, k: builds.append((Path(folder).name, device, k)))
    rows = bench.main(["--configs", "tiny", "--devices", "cpu", "--scenarios", "full-compiled", "--requests", "2",
                       "--warmup", "1", "--out", str(tmp_path / "serving")])
    assert builds == [("export", "cpu", bench.K)]
    assert [(r.scenario, r.requests) for r in rows] == [("full-compiled", 2)]


def test_device_steps_stub_is_undone_on_exit(monkeypatch):
    """The host-only scenario's stubs (the static-shape step and the model's recommend) are gone afterwards."""
    from hstu.inference import Recommender
    from hstu.serving import static_shapes
    from hstu.serving.engine import serving_kernel_flags

    bench = load_script("bench_serving", monkeypatch)
    model = bench.build_model(bench.CONFIGS["tiny"], serving_kernel_flags("cpu"))
    recommender = Recommender(model, list(range(1, 301)), device="cpu")
    real_step, real_recommend = static_shapes.run, model.recommend
    with bench.device_steps_stubbed(recommender):
        assert static_shapes.run is not real_step and model.recommend != real_recommend
    assert static_shapes.run is real_step
    assert "recommend" not in vars(model) and model.recommend == real_recommend


@pytest.mark.parametrize("scenario", ["full", "full-compiled", "http-full"])
def test_whole_window_scenarios_send_one_full_history_and_no_priming_request(scenario, monkeypatch):
    bench = load_script("bench_serving", monkeypatch)
    histories = bench.Histories("synthetic", 300, "unused")
    sent = []
    call, prime = bench.scenario_calls(scenario, histories, lambda user, items, times: sent.append(len(items)), 200)
    call(0)
    assert prime is None and sent == [200]


def test_results_keep_a_dotted_out_name_and_never_replace_another_runs(tmp_path, monkeypatch):
    """<out>.json / .csv add their suffix (h200.run1 stays itself); files that another run wrote while this
    one ran are kept, and this run's results go beside them."""
    bench = load_script("bench_serving", monkeypatch)
    row = bench.Row("tiny", "cpu", "cpu", "-", "-", "full", "in process", 1, p50_ms=1.0, p99_ms=1.0)
    bench.write_results([row], tmp_path / "h200.run1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h200.run1.csv", "h200.run1.json"]
    bench.write_results([row, row], tmp_path / "h200.run1")  # as if another run had written them meanwhile
    written = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("h200.run1.") and p.name.count(".") == 3)
    assert len(written) == 2 and len(json.loads((tmp_path / "h200.run1.json").read_text())) == 1


@pytest.mark.parametrize("option, value, message", [
    ("--requests", "0", "--requests: at least 1, got 0"),
    ("--throughput-batches", "0", "--throughput-batches: at least 1, got 0"),
    ("--batch-users", "0", "--batch-users: at least 1, got 0"),
    ("--cpu-threads", "-1", "--cpu-threads: at least 1, got -1"),
    ("--time-limit", "0", "--time-limit: seconds > 0, got 0.0"),
    ("--devices", "gpu", "--devices: a comma-separated subset of cuda,cpu, got 'gpu'"),
    ("--interaction", "yes", "--interaction: a comma-separated subset of on,off, got 'yes'"),
    ("--cuda-graphs", ",", "--cuda-graphs: a comma-separated subset of on,off, got ','"),
])
def test_a_bad_choice_is_refused_in_one_line_before_anything_runs(option, value, message, tmp_path, monkeypatch,
                                                                   capsys):
    bench = load_script("bench_serving", monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--configs", "tiny", "--scenarios", "full", "--requests", "1", "--warmup", "1", option, value,
                    "--out", str(tmp_path / "serving")])
    assert exit_.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")
    assert not list(tmp_path.iterdir())


def test_cuda_is_refused_where_torch_sees_no_cuda_device(tmp_path, monkeypatch, capsys):
    bench = load_script("bench_serving", monkeypatch)
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--configs", "tiny", "--scenarios", "full", "--devices", "cuda",
                    "--out", str(tmp_path / "serving")])
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert exit_.value.code == 2
    assert last_line.endswith("error: --devices: cuda named, but torch sees no CUDA device here")


def test_an_out_under_a_file_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    bench = load_script("bench_serving", monkeypatch)
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "deeper" / "serving"
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--configs", "tiny", "--devices", "cpu", "--scenarios", "full", "--out", str(out)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: --out {out}: {tmp_path}/file is a file, not a folder")


def test_an_out_that_holds_another_runs_results_is_refused(tmp_path, monkeypatch, capsys):
    bench = load_script("bench_serving", monkeypatch)
    (tmp_path / "serving.csv").write_text("earlier results\n")
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--configs", "tiny", "--devices", "cpu", "--scenarios", "full", "--out", str(tmp_path / "serving")])
    assert exit_.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: --out {tmp_path}/serving: {tmp_path}/serving.csv already there (another run's results); name a new --out")
    assert (tmp_path / "serving.csv").read_text() == "earlier results\n" and not (tmp_path / "serving.json").exists()


def test_a_missing_ml1m_cache_stops_the_run_before_any_config_is_timed(tmp_path, monkeypatch):
    """The ML-1M cache is looked for before the first config runs, wherever ml1m sits in --configs."""
    bench = load_script("bench_serving", monkeypatch)
    timed = []
    monkeypatch.setattr(bench, "in_process_rows", lambda *args, **kwargs: timed.append(args[1]) or [])
    monkeypatch.setattr(bench, "http_rows", lambda *args, **kwargs: [])
    with pytest.raises(SystemExit, match=r"^--data-dir .*: no parsed ML-1M cache "):
        bench.main(["--configs", "tiny,ml1m-hstu-large", "--scenarios", "full", "--devices", "cpu",
                    "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "serving")])
    assert timed == [] and not list(tmp_path.glob("serving*"))
