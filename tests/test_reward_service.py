"""Any reward as a service (``python -m fastcps.rewards.serve``) and the ``remote`` reward, its client: on
localhost, free ports, each server a process of its own session that ``multi_run.stop`` kills whole.

- concurrent clients get their own scores, none lost, in batches the service really merged;
- malformed requests are answered 4xx naming the fault, a reward that raises 500 with its message, and the
  service keeps serving; a raise in a merged batch fails only the request that caused it;
- the start-up check: no service listening fails every rank fast, naming the URL, before any model loads;
- a training run with the remote reward survives the service's restart (the client retries), and stops
  with exit 3 naming the URL when the service stays away longer than the retries.
"""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from multi_run import child_env, free_port, start, stop
from serve_support import identity_images, prompts_of

from fastcps.rewards import RewardFailed, check_services
from fastcps.rewards.remote import RemoteReward, RemoteRewardError
from fastcps.rewards.service import wire


TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
MAX_BODY_MB = 0.05  # 52 KB: a 16x16 request of 20 images is 15 KB, the "too large" one 60 KB


def service_env() -> dict:
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env["PYTHONPATH"]])  # serve_support's test reward
    return env


def serve(port: int, reward: str, *extra: str, log: Path) -> subprocess.Popen:
    """``python -m fastcps.rewards.serve`` in its own session, its output to ``log`` (a pipe nobody reads
    could fill and stall it)."""
    cmd = [sys.executable, "-m", "fastcps.rewards.serve", "--reward", reward, "--port", str(port), *extra]
    with open(log, "a") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=service_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> dict:
    """The service's /health once its reward is ready (imports and a load on a loaded 2-core machine)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, f"the service exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            health = get(url + "/health", timeout=2)
            if health["ready"]:
                return health
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the service was not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def post(url: str, body: bytes, timeout: float = 30.0) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/score", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def identity_service(tmp_path_factory):
    """One service of the identity reward: batches of up to 8 images, waiting up to 100 ms for a batch to
    fill, 30 ms per reward call (requests queue up meanwhile)."""
    port, log = free_port(), tmp_path_factory.mktemp("service") / "service.log"
    proc = serve(
        port,
        "serve_support:IdentityReward",
        "--args",
        '{"delay_s": 0.03}',
        "--max-batch",
        "8",
        "--max-wait-ms",
        "100",
        "--max-body-mb",
        str(MAX_BODY_MB),
        log=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield url
    finally:
        stop(proc)


def test_concurrent_clients_get_their_own_scores_from_merged_batches(identity_service):
    url = identity_service
    before = get(url + "/health")
    threads, rounds = 8, 4
    results, errors = {}, []

    def client(t: int) -> None:
        # requests of 1..3 images; every fourth of another image size (batched apart: one tensor a batch)
        remote = RemoteReward(url=url, batch_size=64, timeout_s=60, retries=0)
        for r in range(rounds):
            ids = [1000 * t + 10 * r + j for j in range(1 + (t + r) % 3)]
            prompts, meta = prompts_of(ids)
            try:
                got = remote(identity_images(ids, size=8 if r == 3 else 16, seed=t), prompts, meta)
                results[(t, r)] = (ids, got.tolist())
            except Exception as err:  # noqa: BLE001 (reported below with the thread's request)
                errors.append(f"thread {t} round {r}: {err}")

    pool = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=120)
    assert not errors, errors
    assert len(results) == threads * rounds
    for ids, got in results.values():
        assert got == [float(k) for k in ids]  # each image's own id: its own request, prompt and metadata
    after = get(url + "/health")
    requests = after["requests"] - before["requests"]
    images = after["images"] - before["images"]
    batches = after["batches"] - before["batches"]
    assert requests == threads * rounds and images == sum(len(ids) for ids, _ in results.values())
    # merged: fewer reward calls than requests, and some call scored more images than any request holds
    assert batches < requests / 2, (batches, requests)
    assert 3 < after["largest_batch"] <= 8

    # one request of 20 images: scored in pieces of --max-batch 8, returned whole and in order
    ids = list(range(500, 520))
    got = RemoteReward(url=url, batch_size=64)(identity_images(ids), *prompts_of(ids))
    assert got.tolist() == [float(k) for k in ids]
    assert get(url + "/health")["largest_batch"] <= 8


def test_malformed_requests_are_answered_4xx_and_the_service_keeps_serving(identity_service):
    url = identity_service
    ids = [1, 2]
    good = wire.encode(identity_images(ids), *prompts_of(ids))
    header, pixels = good.split(b"\n", 1)

    def with_header(**change) -> bytes:
        h = {**json.loads(header), **change}
        return json.dumps({k: v for k, v in h.items() if v is not None}).encode() + b"\n" + pixels

    too_large = wire.encode(identity_images(list(range(80))), *prompts_of(list(range(80))))
    cases = [
        (b"not a header line", 400, "no header line"),
        (b"{not json\n" + pixels, 400, "header line is not JSON"),
        (b"[1, 2]\n" + pixels, 400, "must be a JSON object"),
        (with_header(shape=[2, 4, 16, 16]), 400, "'shape' must be [B, C, H, W] with C 1 or 3"),
        (with_header(dtype="float32"), 400, "'dtype' must be \"uint8\""),
        (
            with_header(shape=[2, 3, 16, 15]),
            400,
            "needs 1440 bytes of uint8 pixels after the header, got 1536",
        ),
        (with_header(prompts=["image 1"]), 400, "2 images (shape [2, 3, 16, 16]) but 1 prompts"),
        (with_header(metadata=[{}, {}, {}]), 400, "but 3 metadata"),
        (with_header(prompts=None), 400, "'prompts' must be a list of strings"),
        (with_header(extra=1), 400, "unknown header keys ['extra']"),
        (too_large, 413, "larger than the service's limit"),
        (wire.encode(identity_images(ids), ["raise", "image 2"], [{}, {"id": 2}]), 500, "asked this reward"),
    ]
    for body, status, says in cases:
        code, answer = post(url, body)
        assert (code, says in answer["detail"]) == (status, True), (says, code, answer)
        assert post(url, good) == (200, {"scores": [1.0, 2.0]})  # still serving

    # the client names the URL and the service's message, without retrying a request that cannot succeed
    with pytest.raises(RemoteRewardError, match=rf"{url} answered POST /score with HTTP 500: .*asked this"):
        RemoteReward(url=url, retries=3, backoff_s=30)(identity_images([1]), ["raise"], [{}])


def test_a_raise_in_a_merged_batch_fails_only_the_request_that_caused_it(identity_service):
    url = identity_service
    bodies = {
        "bad": wire.encode(identity_images([7]), ["raise"], [{}]),
        "good": wire.encode(identity_images([8, 9]), *prompts_of([8, 9])),
    }
    answers, before = {}, get(url + "/health")
    pool = [threading.Thread(target=lambda k=k: answers.update({k: post(url, bodies[k])})) for k in bodies]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=60)
    assert answers["good"] == (200, {"scores": [8.0, 9.0]})
    assert (
        answers["bad"][0] == 500
        and "ValueError: a prompt asked this reward to raise" in answers["bad"][1]["detail"]
    )
    assert get(url + "/health")["requests"] - before["requests"] == 2


def test_health_and_the_start_up_check_of_a_running_service(identity_service):
    url = identity_service
    health = RemoteReward(url=url).check()
    assert health["reward"] == "serve_support:IdentityReward" and health["args"] == {"delay_s": 0.03}
    assert health["device"] == "cpu" and health["ready"] and health["max_batch"] == 8
    check_services([("remote", {"url": url, "serves": "serve_support:IdentityReward"})])
    with pytest.raises(
        RewardFailed, match=r"serves 'serve_support:IdentityReward', the config expects 'pickscore'"
    ):
        check_services([("remote", {"url": url, "name": "pick", "serves": "pickscore"})])


def test_the_start_up_check_with_no_service_fails_fast_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RewardFailed) as err:
        check_services(
            [("digit", {}), ("remote", {"url": url, "name": "pick", "retries": 2, "backoff_s": 0.1})]
        )
    took = time.monotonic() - t0
    msg = str(err.value)
    assert (
        f"reward 'pick' is not available: RemoteRewardError: the reward service at {url} did not answer"
        in msg
    )
    assert "after 3 attempts" in msg and "ConnectionRefusedError" in msg, msg
    assert 0.3 <= took < 10, took  # the backoff waited 0.1 + 0.2 s, and nothing longer


# --- training runs with the remote reward (the digits toy) ------------------------------------------------


def remote_run(tmp_path: Path, url: str, epochs: int, **client) -> list[str]:
    from test_trainer import CONFIG, TINY, sets

    reward = {
        "name": "remote",
        "weight": 1.0,
        "args": {"url": url, "name": "digit", "timeout_s": 30, **client},
    }
    overrides = TINY + [f"output_dir={tmp_path}", "name=run", f"train.num_epochs={epochs}"]
    return ["--config", CONFIG] + sets(overrides + [f"rewards={json.dumps([reward])}"])


def wait_scored(url: str, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    """Until the run's first images were scored by the service at ``url`` (the run is under way)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, f"the run exited {proc.returncode}:\n{proc.communicate()[0][-4000:]}"
        try:
            if get(url + "/health", timeout=2)["images"] > 0:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("the run scored nothing")


@pytest.mark.slow
def test_a_run_survives_the_service_restarting(tmp_path):
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "service.log"
    service = serve(port, "digit", log=log)
    run = None
    try:
        wait_ready(url, service, log)
        # retries wait 0.25, 0.5, ... 32 s (64 s in all): longer than the restart below takes
        run = start(
            [sys.executable, "-m", "fastcps.train"] + remote_run(tmp_path, url, 4, retries=8, backoff_s=0.25),
            child_env(),
        )
        wait_scored(url, run)
        stop(service)  # killed mid-run
        time.sleep(2.0)  # the run asks meanwhile and is refused
        service = serve(port, "digit", log=log)
        wait_ready(url, service, log)
        out = run.communicate(timeout=400)[0]
        assert run.returncode == 0, out[-6000:]
        assert "failed (ConnectionRefusedError" in out and "retry 1/8" in out, out[-6000:]
        assert get(url + "/health")["images"] > 0  # the run went on scoring with the new service
    finally:
        for proc in (run, service):
            if proc is not None:
                stop(proc)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "reward/digit/mean" in r] == [1, 2, 3, 4]  # every epoch ran


@pytest.mark.slow
def test_a_run_stops_with_exit_3_when_the_service_stays_away(tmp_path):
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "service.log"
    service = serve(port, "digit", log=log)
    run = None
    try:
        wait_ready(url, service, log)
        run = start(
            [sys.executable, "-m", "fastcps.train"] + remote_run(tmp_path, url, 50, retries=2, backoff_s=0.2),
            child_env(),
        )
        wait_scored(url, run)
        stop(service)
        t0 = time.monotonic()
        out = run.communicate(timeout=120)[0]
        took = time.monotonic() - t0
    finally:
        for proc in (run, service):
            if proc is not None:
                stop(proc)
    assert run.returncode == 3, out[-6000:]
    assert f"the reward service at {url} did not answer POST /score after 3 attempts" in out, out[-6000:]
    assert "[fastcps] stopped: reward 'digit' raised RemoteRewardError" in out
    assert took < 60, took  # 0.2 + 0.4 s of backoff, then the process's exit


@pytest.mark.slow
def test_two_ranks_with_no_service_exit_3_at_start_up_naming_the_url(tmp_path):
    from test_trainer import CONFIG, TINY, sets

    url = f"http://127.0.0.1:{free_port()}"
    reward = [{"name": "remote", "args": {"url": url, "retries": 1, "backoff_s": 0.1}}]
    two = ["train.prompts_per_epoch=3", "train.rollout_batch_size=6", "train.minibatch_size=3"]
    args = sets(TINY + two + [f"output_dir={tmp_path}", f"rewards={json.dumps(reward)}"])
    port, procs = free_port(), []
    try:
        for rank in range(2):
            env = child_env(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
            procs.append(start([sys.executable, "-m", "fastcps.train", "--config", CONFIG] + args, env))
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            stop(p)
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 3, f"rank {rank} exited {p.returncode}:\n{log[-3000:]}"
        assert f"reward 'remote' is not available: RemoteRewardError: the reward service at {url}" in log, log
        assert "ConnectionRefusedError" in log and "eval/" not in log


def test_the_trainer_checks_the_service_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from test_trainer import CONFIG, TINY, sets

    import fastcps.trainer
    from fastcps.train import main

    def no_model(*a, **k):
        raise AssertionError("a model was built before the reward service was checked")

    monkeypatch.setattr(fastcps.trainer, "build_policy", no_model)
    url = f"http://127.0.0.1:{free_port()}"
    reward = [{"name": "remote", "args": {"url": url, "name": "pick", "retries": 0}}]
    t0 = time.monotonic()
    rc = main(["--config", CONFIG] + sets(TINY + [f"output_dir={tmp_path}", f"rewards={json.dumps(reward)}"]))
    assert rc == 3 and time.monotonic() - t0 < 60
    err = capsys.readouterr().err
    assert (
        f"[fastcps] stopped: reward 'pick' is not available: RemoteRewardError: the reward service at {url}"
        in err
    )


def test_remote_args_and_component_names():
    from fastcps.config import ConfigError, RunConfig, load_config

    digits = str(ROOT / "configs" / "digits_cps.json")
    with pytest.raises(ConfigError, match=r"rewards.0.args.url': the reward service's address must be http"):
        load_config(RunConfig, digits, ['rewards=[{"name": "remote"}]'])
    two = [
        {"name": "remote", "args": {"url": "http://a:1"}},
        {"name": "remote", "args": {"url": "http://b:1"}},
    ]
    with pytest.raises(
        ConfigError, match=r"appear once, got \['remote', 'remote'\] \(give each remote reward"
    ):
        load_config(RunConfig, digits, [f"rewards={json.dumps(two)}"])
    two[0]["args"]["name"] = "pick"
    cfg = load_config(RunConfig, digits, [f"rewards={json.dumps(two)}"])
    from fastcps.rewards import WeightedReward

    assert WeightedReward([(r.name, r.weight, r.args) for r in cfg.rewards]).weights == {
        "pick": 1.0,
        "remote": 1.0,
    }
    assert RemoteReward.files({"url": "http://a:1"}) == []
    with pytest.raises(ValueError, match="metadata is not JSON"):
        RemoteReward(url="http://a:1")(torch.zeros(1, 3, 4, 4), ["p"], [{"x": object()}])


def test_the_overhead_bench_runs_and_the_service_scores_as_in_process(tmp_path):
    """bench/bench_reward_service.py on tiny images: a registered reward by name through the service gives
    exactly the in-process scores (the images travel losslessly), and the CSV has its columns."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_reward_service as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    out = tmp_path / "reward_service.csv"
    rows = bench.main(["--sizes", "16,24", "--repeats", "2", "--warmup", "1", "--csv", str(out)])
    assert [(r["image_size"], r["scores_equal"]) for r in rows] == [(16, True), (24, True)]
    import csv

    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.COLUMNS and len(list(reader)) == 2


def test_the_service_exits_2_on_bad_arguments_and_3_when_its_reward_cannot_load(tmp_path):
    env = service_env()
    serve_cmd = [sys.executable, "-m", "fastcps.rewards.serve", "--port", str(free_port())]
    cases = [
        (["--reward", "digt"], 2, "unknown reward 'digt'; did you mean 'digit'?"),
        (
            ["--reward", "digit", "--args", '{"weightz": 1}'],
            2,
            "--args of reward 'digit': weightz: Extra inputs",
        ),
        (["--reward", "digit", "--args", "{weights}"], 2, "--args is not JSON"),
        (
            ["--reward", "digit", "--args", json.dumps({"weights": str(tmp_path / "none.safetensors")})],
            3,
            "reward 'digit' could not load, stopping: FileNotFoundError: digit classifier weights not found",
        ),
    ]
    for args, code, says in cases:
        r = subprocess.run(serve_cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert (r.returncode, says in r.stderr) == (code, True), (args, r.returncode, r.stderr[-2000:])


def test_while_the_reward_loads_health_says_so_and_clients_wait(tmp_path):
    port, log = free_port(), tmp_path / "service.log"
    url = f"http://127.0.0.1:{port}"
    proc = serve(port, "serve_support:IdentityReward", "--args", '{"load_s": 4}', log=log)
    try:
        t0 = time.monotonic()
        while True:  # the service answers before its reward has loaded
            assert time.monotonic() - t0 < 120 and proc.poll() is None, log.read_text()
            try:
                health = get(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.05)
        assert health["ready"] is False and health["error"] is None, health
        ids = [3, 4]
        code, answer = post(url, wire.encode(identity_images(ids), *prompts_of(ids)))
        assert code == 503 and "is still loading" in answer["detail"]
        # meanwhile a client retries its 503s (backoff 0.5, 1, 2, 4 s) and the start-up check polls /health:
        # both go on once the reward is ready
        scored = {}
        remote = RemoteReward(url=url, retries=6, backoff_s=0.5)
        client = threading.Thread(
            target=lambda: scored.update(got=remote(identity_images(ids), *prompts_of(ids)))
        )
        client.start()
        assert RemoteReward(url=url, timeout_s=60).check()["ready"]
        assert time.monotonic() - t0 >= 3  # it waited for the load
        client.join(timeout=60)
        assert scored["got"].tolist() == [3.0, 4.0]
    finally:
        stop(proc)
