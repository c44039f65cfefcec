"""The experiment grid: results table, ratios against FedAvg, and resuming without redoing cells."""

import json

from prismfl import grid, rundir


def result(fid: float, up: float, size: int) -> dict:
    return {"domain_fid": fid, "precision": 0.5, "recall": 0.25, "density": 1.0, "coverage": 0.5, "class_kl": 0.1,
            "model_bytes": size, "train": {"upload_bytes_per_round": up, "curve": []}}  # fmt: skip


def test_table_mean_and_sample_std_and_ratios():
    results = {
        grid.Cell("fashion-mnist", "shards", "prism", 0): result(100.0, 1e6, 170_000),
        grid.Cell("fashion-mnist", "shards", "prism", 1): result(120.0, 1e6, 170_000),
        grid.Cell("fashion-mnist", "shards", "fedavg", 0): result(50.0, 32e6, 5_440_000),
        grid.Cell("fashion-mnist", "shards", "fedavg", 1): result(60.0, 32e6, 5_440_000),
    }
    text = grid.results_markdown(results, "# head")
    assert "### fashion-mnist, shards partition (up to 2 seeds; mean ± standard deviation)" in text
    # mean 110, sample standard deviation sqrt(((100-110)^2 + (120-110)^2) / 1) = 14.142...
    assert "| prism | 2 | 110.0 ± 14.1 | 0.500 ± 0.000 |" in text
    assert "| 1.000 MB | 170 kB |" in text
    assert "domain FID x2.00 (worse), 32.0x fewer upload bytes per round, a 32.0x smaller final model" in text


def test_a_finished_cell_is_not_run_again(tmp_path, monkeypatch):
    import prismfl.eval.evaluate as report
    import prismfl.fl.simulate as simulate

    calls = []

    def fake_train(cfg, out, resume=False, log=None):
        calls.append((cfg.train.method, cfg.seed, cfg.data.dataset, cfg.partition.scheme, resume))
        out.mkdir(parents=True, exist_ok=True)
        for rnd in (1, 2):
            rundir.append_metrics(out, {"round": rnd, "upload_bytes": 10 * rnd, "download_bytes": 0, "seconds": 1.0,
                                       "domain_fid": 100.0 / rnd})  # fmt: skip

    monkeypatch.setattr(simulate, "train", fake_train)
    monkeypatch.setattr(report, "evaluate", lambda out, n: {"domain_fid": 42.0, "n": n})
    cells = grid.cells(["mnist"], ["iid"], ["prism", "fedavg", "prism-nomada"], [3])
    first = grid.run_grid(cells, "configs/smoke.toml", [], tmp_path, samples=7, log=lambda *_: None)
    assert calls == [("prism", 3, "mnist", "iid", False), ("fedavg", 3, "mnist", "iid", False),
                     ("prism", 3, "mnist", "iid", False)]  # fmt: skip
    saved = json.loads((tmp_path / "mnist" / "iid" / "prism" / "seed-3" / grid.EVAL_FILE).read_text())
    assert saved["n"] == 7 and saved["train"]["upload_bytes_per_round"] == 15.0
    assert saved["train"]["curve"] == [[1, 100.0, 10], [2, 50.0, 30]]  # FID against cumulative bytes
    again = grid.run_grid(cells, "configs/smoke.toml", [], tmp_path, samples=7, log=lambda *_: None)
    assert len(calls) == 3  # read back, not trained again
    assert all(json.dumps(again[c]) == json.dumps(first[c]) for c in cells)


def test_report_only_reads_finished_cells_and_refuses_an_empty_grid(tmp_path, run_cli):
    cells = grid.cells(["mnist"], ["iid"], ["prism", "fedavg"], [0, 1])
    done = cells[0].path(tmp_path)
    done.mkdir(parents=True)
    (done / grid.EVAL_FILE).write_text(json.dumps(result(10.0, 1.0, 100)))
    assert list(grid.finished(cells, tmp_path)) == [cells[0]]
    report = tmp_path / "r.md"
    args = ["grid", "--config", "configs/smoke.toml", "--datasets", "mnist", "--partitions", "iid",
            "--methods", "prism,fedavg", "--seeds", "0,1", "--out", str(tmp_path), "--report", str(report)]  # fmt: skip
    code, out, err = run_cli(*args, "--report-only")
    assert code == 0, err
    assert "1 of 4 cells finished" in out
    assert "| prism | 1 | 10.0 |" in report.read_text() and report.with_suffix(".png").exists()
    code, _, err = run_cli(*args[:-4], "--out", str(tmp_path / "empty"), "--report", str(report), "--report-only")
    assert code == 2 and "no finished cell" in err


def test_curves_of_a_central_only_cell_plot_without_an_empty_legend(tmp_path):
    import warnings

    central = result(25.0, 0.0, 100)
    central["train"]["curve"] = [[1, 40.0, 0], [2, 30.0, 0]]  # no upload: nothing on the bytes panel
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when a legend has no labelled artist
        grid.plot_curves({grid.Cell("fashion-mnist", "shards", "central", 0): central}, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
