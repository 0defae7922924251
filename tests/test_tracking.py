"""Issue 25, item 5: MLflow tracking, against a local sqlite store and a real `mlflow server` on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import tiny_job
from test_resilience import StopRun, run_fit

from orchestrator.cli import main

mlflow = pytest.importorskip("mlflow")


def experiment_runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_a_run_logs_params_metrics_artifacts_and_its_model_and_a_resume_continues_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # the experiment's artifacts in tmp_path: an sqlite store puts them in ./mlruns of the cwd otherwise
    mlflow.MlflowClient(uri).create_experiment("digits", artifact_location=(tmp_path / "artifacts").as_uri())
    job = tiny_job(tmp_path / "runs", "tracked", scaling={"num_workers": 1}, schedule={"epochs": 2, "warmup_epochs": 0},
                   run={"mlflow": {"tracking_uri": uri, "experiment": "digits"}})
    with pytest.raises(StopRun):
        run_fit(job, stop_after_epoch=0)
    first = json.loads((tmp_path / "runs" / "tracked" / "mlflow.json").read_text())["run_id"]
    assert run_fit(job)["status"] == "completed"
    client, runs = experiment_runs(uri, "digits")
    assert [r.info.run_id for r in runs] == [first]                           # the resume went on in the same run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["optim.base_lr"] == "0.1"
    assert run.data.params["plan.global_batch_size"] == "8" and run.data.params["model.arch"] == "resnet18"
    history = client.get_metric_history(first, "val_acc1")
    assert len(history) == 2 and sorted(m.step for m in history) == [9, 18]  # one per epoch, at its optimizer step
    assert client.get_metric_history(first, "lr/rest:norm/bias")               # step LRs, names MLflow takes
    artifacts = {a.path for a in client.list_artifacts(first)}
    assert {"summary.json", "plan.json", "spec.yaml", "metrics.parquet"} <= artifacts   # the CLI adds the report
    models = client.search_logged_models([run.info.experiment_id])
    assert len(models) == 1 and json.loads(models[0].params["classes"]) == ["0", "1", "2"]
    assert str(models[0].status).endswith("READY")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_real_tracking_server_through_mlflow_tracking_uri(tmp_path, write_job, monkeypatch, capsys):
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    # a clean environment: what earlier tests of the session left in os.environ (Ray's, MLflow client settings)
    # is not the server's business
    clean = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=clean, cwd=tmp_path)
    try:
        deadline = time.time() + 240                                          # a loaded machine: slow to import
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # loopback: never through a proxy
        while True:
            try:
                direct.open(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, \
                    f"mlflow server did not start: {(tmp_path / 'server.log').read_text(errors='replace')[-2000:]}"
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        job = write_job(tiny_job(tmp_path / "runs", "served", scaling={"num_workers": 1},
                                 schedule={"epochs": 1, "warmup_epochs": 0}))
        assert main(["train", str(job), "--local"]) == 0
        assert "mlflow" not in capsys.readouterr().out                          # no warning
        client, runs = experiment_runs(f"http://127.0.0.1:{port}", "orchestrator")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "val_acc1" in runs[0].data.metrics
        assert {"summary.json", "report"} <= {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_a_tracking_server_that_is_down_costs_a_warning_not_the_run(tmp_path, write_job, capsys):
    job = write_job(tiny_job(tmp_path / "runs", "untracked", scaling={"num_workers": 1},
                             schedule={"epochs": 1, "warmup_epochs": 0},
                             run={"mlflow": {"tracking_uri": f"http://127.0.0.1:{_free_port()}"}}))
    started = time.perf_counter()
    assert main(["train", str(job), "--local"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("warning: mlflow: cannot reach http://127.0.0.1:") == 1 and "tracking is off for this run" in out
    assert json.loads((tmp_path / "runs" / "untracked" / "summary.json").read_text())["status"] == "completed"
    assert time.perf_counter() - started < 120                                   # no minutes of retries


def test_a_dropped_connection_is_retried_not_the_end_of_tracking(monkeypatch):
    """The CI failure of stop 30: the server closed a keep-alive connection as log-batch went out
    (RemoteDisconnected), and with no retries tracking went off for the rest of the run."""
    import http.server
    import threading

    from orchestrator.train.tracking import SHORT_RETRIES, MlflowLog

    for name, value in SHORT_RETRIES.items():                                 # what open_tracking sets
        monkeypatch.setenv(name, value)
    requests_seen: list[str] = []

    class DropsTheFirst(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            requests_seen.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            if len(requests_seen) == 1:
                self.close_connection = True                                    # no reply: RemoteDisconnected
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DropsTheFirst)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        warnings: list[str] = []
        log = MlflowLog(mlflow.MlflowClient(f"http://127.0.0.1:{server.server_port}"), "a" * 32, warnings.append)
        log.step(0, 1.5, {"rest": 0.1})
        log.step(1, 1.4, {"rest": 0.1})
        assert warnings == [] and log.live
        assert requests_seen == ["/api/2.0/mlflow/runs/log-batch"] * 3                # the dropped one, again, then step 2
    finally:
        server.shutdown()
