"""Recommending with a trained run: `prorec recommend` (prorec/recommend.py) and the Ray Serve app
(prorec/serve.py, prorec/serve_app.py), on a finished tiny run. Both must return exactly the lists
the evaluation wrote to eval/predictions.parquet."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prorec.cli import main as cli
from prorec.config import load_config
from prorec.serve import BadRequest, free_port, parse_request, serve_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from prorec.pipeline import run_pipeline

    run = tmp_path_factory.mktemp("serve") / "run"
    run_pipeline(load_config(REPO / "jobs" / "configs" / "tiny.yaml"), run)
    return run


def _test_users(run: Path) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(user ids, histories as item ids, the evaluation's predicted item ids) of the test split."""
    items = pq.read_table(run / "data" / "items.parquet").to_pydict()
    id_of = dict(zip(items["item_idx"], items["item_id"]))
    test = pq.read_table(run / "data" / "test.parquet").to_pydict()
    preds = pq.read_table(run / "eval" / "predictions.parquet").to_pydict()
    assert preds["user_id"] == test["user_id"]
    return test["user_id"], [[id_of[i] for i in h] for h in test["history"]], preds["items"]


def test_recommend_reproduces_the_evaluation_from_jsonl_and_parquet(tiny_run, tmp_path, capsys):
    users, histories, expected = _test_users(tiny_run)
    jsonl = tmp_path / "users.jsonl"
    jsonl.write_text("".join(json.dumps({"user_id": u, "history": h}) + "\n" for u, h in zip(users, histories)))
    parquet = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user_id": users, "history": histories}), parquet)
    for src in (jsonl, parquet):
        out = tmp_path / f"recs_{src.suffix[1:]}.parquet"
        assert cli(["recommend", str(tiny_run), "--input", str(src), "--output", str(out)]) == 0
        got = pq.read_table(out).to_pydict()
        assert got["user_id"] == users
        assert got["items"] == expected  # every user, every position
        assert all(len(s) == len(i) and s == sorted(s, reverse=True) for s, i in zip(got["scores"], got["items"]))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["users"] == len(users)
    # --k and --beam: a shorter list is the prefix of the longer one at the same beam.
    out = tmp_path / "k5.parquet"
    assert cli(["recommend", str(tiny_run), "--input", str(jsonl), "--output", str(out), "--k", "5"]) == 0
    assert pq.read_table(out).column("items").to_pylist() == [e[:5] for e in expected]


def test_recommend_refuses_bad_input_naming_the_line(tiny_run, tmp_path, capsys):
    _, histories, _ = _test_users(tiny_run)
    good = json.dumps({"user_id": "a", "history": histories[0]})
    cases = {
        "unknown": (good + "\n" + json.dumps({"user_id": "b", "history": [histories[1][0], "NOPE"]}) + "\n",
                    r"users.jsonl:2: unknown item id\(s\) 'NOPE'.*--skip-unknown"),
        "empty": (json.dumps({"user_id": "c", "history": []}) + "\n", r"users.jsonl:1: the history of user 'c' is empty"),
        "malformed": (good + "\n{not json\n", r"users.jsonl:2: not a JSON object"),
        "keys": (json.dumps({"user": "d", "items": []}) + "\n", r"users.jsonl:1: needs the keys user_id and history"),
    }
    for name, (text, message) in cases.items():
        src = tmp_path / "users.jsonl"
        src.write_text(text)
        assert cli(["recommend", str(tiny_run), "--input", str(src), "--output", str(tmp_path / "o.parquet")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert __import__("re").search(message, err), (name, err)
    # --skip-unknown drops the unknown id, counts it, and keeps the user.
    src = tmp_path / "users.jsonl"
    src.write_text(cases["unknown"][0])
    assert cli(["recommend", str(tiny_run), "--input", str(src), "--output", str(tmp_path / "o.parquet"),
                "--skip-unknown"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1])["unknown_items_dropped"] == 1
    assert "dropped 1 unknown item id(s)" in out.err
    assert pq.read_table(tmp_path / "o.parquet").num_rows == 2
    # k above the beam, and a run whose evaluation never finished.
    assert cli(["recommend", str(tiny_run), "--input", str(src), "--output", str(tmp_path / "o.parquet"),
                "--k", "21"]) == 2
    assert "--k 21 must be in [1, the beam 20]" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    manifest["stages"]["eval"]["status"] = "running"
    (unfinished / "manifest.json").write_text(json.dumps(manifest))
    assert cli(["recommend", str(unfinished), "--input", str(src), "--output", str(tmp_path / "o.parquet")]) == 2
    assert "its evaluation did not finish" in capsys.readouterr().err


class _FakeRec:
    """What parse_request reads of a Recommender."""

    class cfg:
        beam_size = 20

    def unknown(self, ids):
        return [i for i in ids if i not in ("a", "b") and not i.startswith("x")]

    def indices(self, ids):
        return [{"a": 1, "b": 2}.get(i, 3) for i in ids]


@pytest.mark.parametrize("body, status, message", [
    (b"{nope", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"history": ["a", "zz"], "k": 3}).encode(), 422, "unknown item ids"),
    (json.dumps({"history": ["a"], "k": 0}).encode(), 422, "k must be an integer in [1, 20]"),
    (json.dumps({"history": ["a"], "k": 21}).encode(), 422, "k must be"),
    (json.dumps({"history": ["a"], "k": True}).encode(), 422, "k must be"),
    (json.dumps({"history": "a"}).encode(), 422, "history must be a list"),
    (json.dumps({"history": ["a"], "exclude": [3]}).encode(), 422, "exclude must be a list"),
    (json.dumps({"history": ["a"], "kk": 3}).encode(), 422, "unknown field"),
    (b"[" * 100_000, 400, "not JSON"),  # nested too deep for the parser: a 400, not a 500
    (json.dumps({"history": ["a"], "exclude": [f"x{i}" for i in range(1001)]}).encode(), 422, "at most 1000"),
    (b" " * (1 << 20 | 1), 413, "at most"),
])
def test_bad_requests_get_their_status(body, status, message):
    with pytest.raises(BadRequest) as e:
        parse_request(body, _FakeRec())
    assert e.value.status == status and message in str(e.value.detail)


def test_a_good_request_becomes_a_query_in_item_indices():
    q = parse_request(json.dumps({"history": ["a", "b"], "exclude": ["b"], "k": 4}).encode(), _FakeRec())
    assert (q.history, q.exclude, q.k) == ([1, 2], [2], 4)
    assert parse_request(b'{"history": []}', _FakeRec()).k == 10  # the default k


def test_write_config_is_a_valid_serve_deploy_config(tiny_run, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "serve.yaml"
    assert cli(["serve", str(tiny_run), "--write-config", str(out), "--replicas", "2", "--beam", "30"]) == 0
    import yaml

    conf = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(conf) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(conf)
    app = conf["applications"][0]
    assert conf["http_options"]["host"] == "127.0.0.1"  # private unless told otherwise
    assert app["import_path"] == "prorec.serve:build_app" and app["args"]["beam"] == 30 and app["args"]["replicas"] == 2
    assert serve_config(tiny_run, "0.0.0.0", 9000, {})["http_options"] == {"host": "0.0.0.0", "port": 9000}


def _call(url: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_serve_app_answers_like_the_evaluation_and_survives_bad_requests(ray_session, tiny_run):
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from prorec.serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"run_dir": str(tiny_run), "max_batch_size": 8}), name="prorec", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert _call(f"{url}/healthz") == (200, {"status": "ok"})
        status, info = _call(f"{url}/info")
        assert status == 200 and info["n_items"] == 120 and info["k"] == 16 and info["beam_size"] == 20
        users, histories, expected = _test_users(tiny_run)
        # 64 users at once, so that @serve.batch groups them: each still gets the evaluation's list.
        n = 64
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda h: _call(f"{url}/recommend", json.dumps({"history": h, "k": 20}).encode()),
                                    histories[:n]))
        assert all(s == 200 for s, _ in answers)
        assert [a["items"] for _, a in answers] == expected[:n]
        bad = [(b"{nope", 400), (json.dumps({"history": ["NOPE"]}).encode(), 422),
               (json.dumps({"history": histories[0], "k": 21}).encode(), 422),
               (json.dumps({"history": histories[0], "k": 0}).encode(), 422), (b"x" * (2 << 20), 413)]
        for body, status in bad:
            assert _call(f"{url}/recommend", body)[0] == status
            assert _call(f"{url}/healthz")[0] == 200  # still up
        status, a = _call(f"{url}/recommend", json.dumps({"history": []}).encode())
        assert status == 200 and a["popular"] is True and len(a["items"]) == 10
        long = histories[0] * 10
        status, a = _call(f"{url}/recommend", json.dumps({"history": long, "k": 5}).encode())
        assert status == 200 and a["truncated"] == len(long) - info["max_history"]
        status, a = _call(f"{url}/recommend", json.dumps({"history": histories[0], "k": 20,
                                                          "exclude": expected[0][:3]}).encode())
        assert status == 200 and len(a["items"]) == 20 and not set(a["items"]) & set(expected[0][:3])
    finally:
        serve.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prorec_serve_direct_answers_on_its_own_port_like_the_evaluation(tiny_run, tmp_path):
    """`prorec serve RUN --direct` as a user runs it (its own process, its own Ray): the replica itself
    listens on --port (127.0.0.1), answers /healthz, /info and the evaluation's lists, refuses a
    bad request and stays up; Ctrl-C stops it. --direct with --write-config is refused."""
    import os
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prorec.cli", "serve", str(tiny_run), "--direct", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 200
        while True:
            try:
                if _call(f"{url}/healthz") == (200, {"status": "ok"}):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        status, info = _call(f"{url}/info")
        assert status == 200 and info["n_items"] == 120
        users, histories, expected = _test_users(tiny_run)
        for h, want in list(zip(histories, expected))[:10]:
            status, a = _call(f"{url}/recommend", json.dumps({"history": h, "k": 20}).encode())
            assert status == 200 and a["items"] == want
        assert _call(f"{url}/recommend", b"{nope")[0] == 400 and _call(f"{url}/healthz")[0] == 200
        for _ in range(60):  # the replica answers before `serve.run` returns and the command says where it serves
            if "direct ingress" in (tmp_path / "serve.log").read_text():
                break
            time.sleep(0.5)
        assert "direct ingress" in (tmp_path / "serve.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with pytest.raises(SystemExit, match="--direct and --write-config"):
        cli(["serve", str(tiny_run), "--direct", "--write-config", str(tmp_path / "s.yaml")])
    with pytest.raises(SystemExit, match="where Ray starts its workers"):
        cli(["serve", str(tiny_run), "--direct", "--port", "12000"])


@pytest.mark.ray
def test_ray_processes_give_serves_proxy_time_to_start(ray_session, monkeypatch):
    """The tests' Ray was started after patient_proxy_start (conftest), as `prorec serve` and
    serve_load.py start theirs: its worker processes, Serve's controller among them, read the longer
    proxy ready check under the name Serve reads. A value the user set is kept."""
    import os

    from prorec.serve import patient_proxy_start

    key = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
    expected = os.environ[key]  # "30", or the developer's own value, which setdefault kept

    def in_a_worker():
        from ray.serve._private import constants

        return os.environ.get(key), constants.PROXY_READY_CHECK_TIMEOUT_S

    seen, serve_reads = ray_session.get(ray_session.remote(num_cpus=0)(in_a_worker).remote())
    assert seen == expected and serve_reads == float(expected)
    monkeypatch.setenv(key, "12")
    patient_proxy_start()
    assert os.environ[key] == "12"
    monkeypatch.delenv(key)
    patient_proxy_start()
    assert os.environ[key] == "30"


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_recommend_on_ray_data_gives_the_in_process_lists(ray_session, tiny_run, tmp_path):
    from prorec.recommend import recommend_file

    users, histories, expected = _test_users(tiny_run)
    src = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user_id": users, "history": histories}), src)
    summary = recommend_file(tiny_run, src, tmp_path / "ray.parquet", k=20, use_ray=True, num_actors=2)
    got = pq.read_table(tmp_path / "ray.parquet").to_pydict()
    assert summary["users"] == len(users) and got["user_id"] == users
    assert got["items"] == expected  # actors, batches and order change nothing


def test_a_long_history_keeps_its_older_items_out_of_the_list_and_popular_never_pads(tiny_run):
    from prorec.recommend import Query, Recommender

    rec = Recommender(tiny_run, beam=150)  # wider than the catalogue (120 items): the beam returns every item
    old = list(range(1, 41))  # 40 items; the model reads only the last max_history of them
    long, empty = rec.recommend([Query(old, 50), Query([], 150)])
    assert len(old) > rec.max_history and long.truncated == len(old) - rec.max_history
    assert not set(long.items) & {rec.item_ids[i] for i in old}  # the older ones are the user's too
    assert empty.popular and len(empty.items) == 120 and "None" not in empty.items


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_serve_load_benchmark_runs_on_the_tiny_run(tiny_run, tmp_path):
    """benchmarks/serve_load.py end to end at a tiny size (its own process and Ray, as a user runs it),
    so that the load test cannot rot: every cell answered without errors, the offline baseline measured
    before and after the cells, and the goals' ratios taken from the stricter of the two."""
    import os
    import subprocess
    import sys

    results = tmp_path / "results"
    # --direct: the replica answers on its own port, its code on the main event loop, under concurrent load.
    cmd = [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--run", str(tiny_run), "--settings", "5:plain",
           "--concurrency", "1", "4", "--requests", "24", "--single", "8", "--max-seconds", "30", "--name", "tiny",
           "--results", str(results), "--allow-dirty", "--direct", "--batch-wait-ms", "0"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, as a user runs it
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=380, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((results / "tiny.json").read_text())
    cells = res["rows"]
    assert [(r["batching"], r["concurrency"]) for r in cells] == [(True, 1), (True, 4), (False, 1), (False, 4)]
    assert all(r["requests"] == 24 and r["errors"] == 0 and r["rps"] > 0 for r in cells)
    base = res["offline"]["beam 5, generator alone"]
    before, after = base["before"], base["after"]
    assert base["offline_users_per_s"] == max(before["offline_users_per_s"], after["offline_users_per_s"]) > 0
    assert base["single_user_ms_median"] == min(before["single_user_ms_median"], after["single_user_ms_median"]) > 0
    md = (results / "tiny.md").read_text()
    assert "| beam 5, generator alone | on | 4 | 24 |" in md and "before / after" in md and "direct ingress" in md
    assert (results / "tiny.png").stat().st_size > 1000
